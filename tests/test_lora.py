"""LoRA (bond/lora.py): adapters on the frozen base, the base as the reference, through the runner.

Model-level checks on a small gated, rotary, grouped-query config; run-level checks on the tiny
J-BOND run of tests/test_train.py (its shared reference cache), where the adapters are the only
trained weights, the anchor's EMA acts on them, and resume after SIGKILL is exact.
"""

import dataclasses
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import config_base, lora, population, train
from bond.checkpoint import Checkpointer, abstract_like
from bond.config_base import load_config
from bond.context import build_context
from bond.metrics import read_metrics
from bond.models import load_pretrained, logits, save_pretrained
from bond.models.transformer import LORA_TARGETS, TransformerConfig, init_params
from bond.step import compute_params, model_params
from bond.validation import ConfigError, validate
from test_train import cache_dir, cli_args, run_cli, start_and_stop, tiny  # noqa: F401 (cache_dir is a fixture)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pretrained"
QUIET = lambda _: None

BASE = TransformerConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=16, gated_mlp=True,
                         norm="rms_norm", position_embedding="rope", num_kv_heads=2, qkv_bias=False, out_bias=False,
                         mlp_bias=False)
ADAPTED = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_targets=LORA_TARGETS)


def perturbed(adapters, scale=0.1, seed=3):
    """Adapters moved away from B = 0 (as after training), so that they change the model."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def tokens_and_mask():
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 1, 32)
    return tokens, jnp.ones_like(tokens)


def test_lora_model_starts_at_its_base_and_merging_is_exact():
    """At initialisation (B = 0) base ∪ adapters computes the base's logits exactly; the base tree
    alone under the adapted config is the plain model; once the adapters move, folding them into
    the weights (`lora.merged`, what export writes) gives the adapted logits to float32 rounding."""
    base = init_params(BASE, jax.random.key(0))
    adapters = lora.init_adapters(ADAPTED, jax.random.key(1))
    tokens, mask = tokens_and_mask()
    plain = logits(BASE, base, tokens, mask)
    np.testing.assert_array_equal(logits(ADAPTED, lora.with_adapters(base, adapters), tokens, mask), plain)
    np.testing.assert_array_equal(logits(ADAPTED, base, tokens, mask), plain)

    moved = lora.with_adapters(base, perturbed(adapters))
    adapted_logits = logits(ADAPTED, moved, tokens, mask)
    assert float(jnp.max(jnp.abs(adapted_logits - plain))) > 0.1
    np.testing.assert_allclose(logits(BASE, lora.merged(ADAPTED, moved), tokens, mask), adapted_logits, atol=1e-5)
    # One adapter per target and layer, A [fan_in, r] and B [r, fan_out]; the split round-trips.
    assert lora.count(moved) == 2 * sum(4 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32),
                                                                  (32, 64), (32, 64), (64, 32)])
    assert jax.tree.structure(lora.base_of(moved)) == jax.tree.structure(base)


def test_lora_targets_choose_the_adapted_projections():
    only_queries = dataclasses.replace(BASE, lora_rank=2, lora_targets=("q_proj", "down_proj"))
    paths = {"/".join(str(k.key) for k in p) for p, _ in
             jax.tree_util.tree_flatten_with_path(lora.init_adapters(only_queries, jax.random.key(0)))[0]}
    assert paths == {f"blocks_{i}/{m}/{ab}" for i in (0, 1) for m in ("attn/query/lora", "mlp/fc_out_lora")
                     for ab in ("a", "b")}
    with pytest.raises(ValueError, match="gate_proj"):
        dataclasses.replace(BASE, gated_mlp=False, lora_rank=2, lora_targets=("gate_proj",))
    with pytest.raises(ValueError, match="unknown"):
        dataclasses.replace(BASE, lora_rank=2, lora_targets=("w_q",))


def test_lora_merged_export_loads_with_the_adapted_logits(tmp_path):
    """save_pretrained of base ∪ adapters writes the merged weights: the folder loads (here with
    bond's loader, whose logits equal HF transformers' on these fixtures, tests/test_pretrained.py;
    with transformers installed, in transformers too) and computes the adapted model's logits."""
    config, base = load_pretrained(FIXTURES / "llama", dtype="float32")
    adapted = dataclasses.replace(config, lora_rank=4, lora_alpha=8.0, lora_targets=LORA_TARGETS)
    params = lora.with_adapters(base, perturbed(lora.init_adapters(adapted, jax.random.key(0)), scale=0.05))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 1, config.vocab_size)
    mask = jnp.ones_like(tokens)
    expected = np.asarray(logits(adapted, params, tokens, mask))
    assert np.max(np.abs(expected - np.asarray(logits(config, base, tokens, mask)))) > 1e-3
    save_pretrained(adapted, params, tmp_path / "merged")
    loaded_config, loaded = load_pretrained(tmp_path / "merged", dtype="float32")
    np.testing.assert_allclose(np.asarray(logits(loaded_config, loaded, tokens, mask)), expected, atol=1e-5)

    torch = pytest.importorskip("torch", reason="the HF cross-check needs torch: pip install -e '.[bench]'")
    transformers = pytest.importorskip("transformers", reason="the HF cross-check needs transformers: pip install -e '.[bench]'")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        hf = model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(hf, expected, atol=1e-4)


def test_lora_validation_names_the_field(cache_dir):
    for field, value, message in [("rank", -1, "config.lora.rank"), ("targets", "q_proj,w_q", "config.lora.targets"),
                                  ("alpha", -2.0, "config.lora.alpha")]:
        c = tiny("j_bond", cache_dir)
        c.lora[field] = value
        with pytest.raises(ConfigError, match=message):
            validate(c, num_devices=1)
    c = tiny("j_bond", cache_dir, **{"lora.rank": 4, "lora.targets": "gate_proj"})  # the toy model has no gate
    with pytest.raises(ValueError, match="config.lora.targets names gate_proj"):
        build_context(c, QUIET)


def test_lora_run_trains_only_the_adapters_and_the_anchor_averages_them(cache_dir):
    """J-BOND with LoRA through the runner's step: the state holds the adapters alone (and Adam's
    moments for them alone), the policy starts exactly at the reference, which is the frozen base;
    after a step the adapters moved and the anchor's adapters are their EMA, (1 − η)·a₀ + η·θ₁."""
    c = tiny("j_bond", cache_dir, **{"lora.rank": 4, "lora.alpha": 8.0})
    context = build_context(c, QUIET)
    setup, state, reference = context.setup, context.state, context.fixed.reference
    assert not lora.adapters_of(reference)
    assert jax.tree.structure(state.params) == jax.tree.structure(lora.adapters_of(init_params(setup.model, jax.random.key(0))))
    assert jax.tree.structure(state.opt_state[-1].mu) == jax.tree.structure(state.params)
    batch = context.batch(0)
    tokens = batch.prompts
    policy = model_params(setup, compute_params(setup, state.params), reference)
    np.testing.assert_array_equal(logits(setup.model, policy, tokens, batch.prompt_mask),
                                  logits(setup.model, reference, tokens, batch.prompt_mask))

    before = jax.device_get(state)
    state, _ = context.step(state, batch, context.fixed, context.traced)
    after = jax.device_get(state)
    moved = lambda new, old: {"/".join(str(k.key) for k in path): float(np.max(np.abs(x))) for path, x in
                              jax.tree_util.tree_flatten_with_path(jax.tree.map(np.subtract, new, old))[0]}
    first = moved(after.params, before.params)
    # While B = 0, ∂L/∂A = xᵀ(∂L/∂h)Bᵀ = 0: the first step moves every B and no A (LoRA's own dynamics).
    assert all(v > 0 for k, v in first.items() if k.endswith("/b")) and all(v == 0 for k, v in first.items() if k.endswith("/a"))
    eta = c.anchor.eta
    jax.tree.map(lambda anchor, a0, p1: np.testing.assert_allclose(anchor, (1 - eta) * a0 + eta * p1, rtol=1e-6, atol=1e-8),
                 after.anchor_params, before.anchor_params, after.params)
    state, _ = context.step(state, context.batch(1), context.fixed, context.traced)
    assert all(v > 0 for v in moved(jax.device_get(state).params, after.params).values())


def test_lora_resume_after_sigkill_is_exact_and_checkpoints_name_their_base(cache_dir, tmp_path):
    """A LoRA run killed after its first checkpoints and rerun ends with an uninterrupted run's
    exact metrics; its checkpoints record the base they adapt (`lora.base_id` of the reference),
    and restoring them onto another base is refused."""
    args = lambda workdir: cli_args(workdir, cache_dir, steps=12) + ["--config.lora.rank=4"]
    uninterrupted = tmp_path / "uninterrupted"
    assert run_cli(args(uninterrupted), cache_dir).wait(timeout=600) == 0
    killed = tmp_path / "killed"
    assert start_and_stop(killed, cache_dir, signal.SIGKILL, after_step=7, args=args(killed)) == -signal.SIGKILL
    assert run_cli(args(killed), cache_dir).wait(timeout=600) == 0
    assert read_metrics(killed / "metrics.jsonl") == read_metrics(uninterrupted / "metrics.jsonl")

    c = tiny("j_bond", cache_dir, **{"lora.rank": 4, "steps": 12})
    context = build_context(c, QUIET)
    restored = Checkpointer(killed / "checkpoints", keep=3).restore_latest(abstract_like(context.state, context.shardings.state),
                                                                    QUIET)
    assert restored[0] == 12 and restored[2] == {"lora_base": lora.base_id(context.fixed.reference)}
    with pytest.raises(ValueError, match="belong to base"):
        lora.check_same_base(restored[2], lora.checkpoint_meta(context.setup.model, perturbed(context.fixed.reference, 1e-3)),
                             "here")


def test_lora_population_member_equals_its_separate_run(cache_dir, tmp_path):
    """Two LoRA members (seeds 0 and 1) as one population of vmapped adapters on the shared base:
    member 1 equals its own `train.run` (1e-5, the vmapped matmuls' rounding)."""
    fields = {"lora.rank": 4, "steps": 10, "eval.every": 5, "checkpoint.every": 5}
    configs = [tiny("j_bond", cache_dir, seed=s, **fields) for s in (0, 1)]
    workdirs = [tmp_path / "m0", tmp_path / "m1"]
    population.run_population(configs, workdirs, QUIET)
    train.run(tiny("j_bond", cache_dir, seed=1, **fields), tmp_path / "single", log=QUIET)
    rows, expected = read_metrics(workdirs[1] / "metrics.jsonl"), read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        for key in want:
            np.testing.assert_allclose(row[key], want[key], rtol=0, atol=1e-5, err_msg=f"step {row['step']} {key}")


def test_lora_config_variant_combines_with_the_others():
    """`lora` is rank 16 on every projection wherever it is given; the Gemma J-BOND config's own
    `lora` also lays the run out for one host (tensor parallel, 4 micro-batches), the others keep theirs."""
    c = load_config(f"{ROOT / 'configs' / 'pretrained' / 'j_bond_gemma.py'}:gemma_7b,lora")
    assert (c.lora.rank, c.lora.alpha, c.lora.targets, c.batch_size) == (16, 32.0, "all", 128)
    assert (tuple(c.mesh_shape), c.memory.micro_batches) == ((1, 1, -1), 4)
    toy, toy_lora = (load_config(f"{ROOT / 'configs' / 'j_bond.py'}{arg}") for arg in ("", ":lora"))
    assert (toy_lora.lora.rank, toy_lora.lora.alpha) == (16, 32.0)
    assert (toy_lora.mesh_shape, toy_lora.memory) == (toy.mesh_shape, toy.memory)


def test_lora_dry_run_holds_the_adapters_as_its_state(cache_dir):
    """The dry run of a LoRA run (`--dry_run`, here on the local device) compiles its step with the
    adapters and their Adam moments as the only state: the step's outputs (the new state) shrink to
    a small fraction of full fine-tuning's, and the sampler reads the base with the adapters."""
    from bond import dry_run

    spec = f"{ROOT / 'configs' / 'pretrained' / 'j_bond_gemma.py'}:tiny"
    # The generic variant keeps full fine-tuning's layout, so that per-device bytes compare.
    full, adapted = (dry_run.dry_run(c, log=QUIET) for c in (load_config(spec), config_base.lora(load_config(spec))))
    step = {line["program"]: line for line in full}, {line["program"]: line for line in adapted}
    assert all(line["fits"] for line in full + adapted)
    assert step[1]["train_step"]["output_gib"] < 0.5 * step[0]["train_step"]["output_gib"]
    assert step[1]["sampler"]["argument_gib"] > step[0]["sampler"]["argument_gib"]  # base + adapters


def test_lora_micro_batched_gradient_equals_the_whole_batch(cache_dir):
    """The adapters' gradient accumulated over 2 micro-batches through base ∪ adapters
    (`loss_and_grad(..., micro_batches=2, base=reference)`) equals the whole batch's, on the same
    J-BOND samples (adapters moved off B = 0 first, so that every adapter has a gradient)."""
    from bond.algorithms import Drawn
    from bond.step import draw_samples, loss_and_grad

    context = build_context(tiny("j_bond", cache_dir, **{"lora.rank": 4}), QUIET)
    setup, fixed, batch = context.setup, context.fixed, context.batch(0)
    trained = perturbed(compute_params(setup, context.state.params), scale=0.05)
    policy = model_params(setup, trained, fixed.reference)
    logp_params = {"reference": fixed.reference, "anchor": policy}
    draw = lambda key, count, source: draw_samples(setup, policy, batch.prompts, batch.prompt_mask, jax.random.key(key),
                                                   count, fixed.judges, source, logp_params,
                                                   setup.algorithm.reads_of(source))
    drawn = jax.jit(lambda: Drawn(draw(1, setup.plan.policy, "policy"), draw(2, setup.plan.anchor, "anchor"), None))()
    grad = lambda m: jax.jit(lambda t, d: loss_and_grad(setup, t, d, context.traced.hparams, jax.random.key(3), None,
                                                        batch.prompts.shape[1], None, m, fixed.reference)[1])
    grads = [grad(m)(trained, drawn) for m in (1, 2)]
    assert jax.tree.structure(grads[0]) == jax.tree.structure(trained)
    assert all(float(np.max(np.abs(g))) > 0 for g in jax.tree.leaves(grads[0]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)



def test_lora_variant_layout_takes_the_one_device_step():
    """The Gemma J-BOND config's `lora` variant (tensor parallel over the chips, 4 micro-batches),
    here on the tiny checkpoints over 4 fake devices (heads, MLP and vocabulary split 4 ways), takes
    the same J-BOND step as one device with the whole batch: metrics, and the adapters after Adam."""
    from bond.config_base import set_field

    def one_step(**fields):
        config = load_config(f"{ROOT / 'configs' / 'pretrained' / 'j_bond_gemma.py'}:tiny,lora")
        for field, value in fields.items():
            set_field(config, field, value)
        context = build_context(config, QUIET)
        before = jax.device_get(context.state.params)
        state, metrics = context.step(context.state, context.batch(0), context.fixed, context.traced)
        specs = {str(s.spec) for s in jax.tree.leaves(context.shardings.fixed.reference)}
        return dict(context.setup.mesh.shape), specs, before, *jax.device_get((state.params, metrics))

    mesh, specs, before, adapters, metrics = one_step(num_devices=4)
    assert mesh == {"data": 1, "fsdp": 1, "tensor": 4} and any("tensor" in spec for spec in specs)
    plain_mesh, _, _, plain_adapters, plain_metrics = one_step(**{"num_devices": 1, "memory.micro_batches": 1})
    assert plain_mesh == {"data": 1, "fsdp": 1, "tensor": 1}
    assert np.isfinite(metrics["loss"]) and metrics["loss"] != 0
    for name, value in plain_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    leaves = zip(jax.tree_util.tree_leaves_with_path(adapters), jax.tree.leaves(plain_adapters), jax.tree.leaves(before))
    moved = 0
    for (path, a), b, start in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        moved += int(np.any(a != start))
    assert moved > 0
