"""The dry run: a run's programs compiled ahead of time from shapes alone (bond/dry_run.py, bond/hlo.py)."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bond import dry_run, hlo, sharding
from bond.config_base import load_config
from bond.main import UsageError, parse_command_line
from bond.models.pretrained import abstract_pretrained, preset_names

TINY = "configs/pretrained/j_bond_gemma.py:tiny"


def closed_form_param_count(hf: dict) -> int:
    """Parameters of a Gemma/Llama config.json: embedding (+ untied head), per layer q/k/v/o, the gated
    MLP's three matrices and two norms, and the final norm."""
    d, layers, ff, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["intermediate_size"], hf["vocab_size"]
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or d // heads
    per_layer = d * heads * head_dim * 2 + 2 * d * kv * head_dim + 3 * d * ff + 2 * d
    head = 0 if hf.get("tie_word_embeddings", hf["model_type"] == "gemma") else vocab * d
    return vocab * d + head + layers * per_layer + d


@pytest.mark.parametrize("preset", ["gemma_2b", "gemma_7b", "llama3_8b"])
def test_dry_run_presets_have_the_released_shapes(preset):
    """A preset's abstract parameters hold exactly the closed-form count of its config.json (Gemma-2B:
    2,506,172,416), in bfloat16, without any weight file."""
    from bond.models.pretrained import read_shapes_config

    hf = read_shapes_config(f"preset:{preset}")
    _, params = abstract_pretrained(f"preset:{preset}")
    leaves = jax.tree.leaves(params)
    assert sum(math.prod(x.shape) for x in leaves) == closed_form_param_count(hf)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert preset in preset_names()


def test_dry_run_preset_paths_are_shapes_only():
    """A preset is not a checkpoint: loading weights from one fails, naming what it is for."""
    from bond.models import load_pretrained

    with pytest.raises(ValueError, match="shape preset"):
        load_pretrained("preset:gemma_2b")
    with pytest.raises(ValueError, match="presets are"):
        abstract_pretrained("preset:gemma_3b")


@pytest.fixture(scope="module")
def tiny_reports():
    """The tiny pretrained config's dry run on the local devices (its checkpoints' config.json only)."""
    return dry_run.dry_run(load_config(TINY), log=lambda *_: None)


def test_dry_run_reports_each_program_of_the_local_run(tiny_reports):
    step, sampler = tiny_reports
    assert [step["program"], sampler["program"]] == ["train_step", "sampler"]
    for line in tiny_reports:
        assert line["topology"] == "local" and line["fits"] is True
        parts = line["argument_gib"] + line["output_gib"] - line["alias_gib"] + line["temp_gib"]
        assert line["peak_gib"] == pytest.approx(parts, abs=2e-3)
        assert line["flops"] > 0 and line["largest_buffers"]
    # the train state is donated: the step's new state reuses its buffers
    assert step["alias_gib"] > 0
    # the step samples (1 policy + 2 anchor samples per prompt for J-BOND), scores and takes a gradient:
    # more work than drawing the same samples alone
    assert step["flops"] > sampler["flops"]


def test_dry_run_flops_count_every_micro_batch():
    """XLA counts a loop body once, and with memory.micro_batches = 4 every model pass runs in a loop
    over the micro-batches: the reported FLOPs are scaled back to the whole batch's (uncorrected, a
    quarter). The sampler is all loop: its count matches the plain one. The step does more work
    micro-batched (the loss's log-probs are computed once before the per-micro-batch backward passes)
    and its few updates outside the loop are scaled too: at or above the plain count, within 25% of it
    (uncorrected, under a third of it). One device, 8 prompts."""
    def reports(micro_batches: int) -> list[dict]:
        config = load_config(TINY)
        config.update(num_devices=1)
        config.memory.micro_batches = micro_batches
        return dry_run.dry_run(config, log=lambda *_: None)

    (step, sampler), (plain_step, plain_sampler) = reports(4), reports(1)
    assert sampler["flops"] == pytest.approx(plain_sampler["flops"], rel=0.01)
    assert plain_step["flops"] <= step["flops"] <= 1.25 * plain_step["flops"]


def test_dry_run_exit_status_is_one_when_a_program_does_not_fit(monkeypatch, tiny_reports, capsys):
    monkeypatch.setattr(dry_run, "dry_run", lambda *a, **k: [dict(r) for r in tiny_reports])
    assert dry_run.main(load_config(TINY)) == 0
    too_big = [dict(r, fits=False) if r["program"] == "sampler" else r for r in tiny_reports]
    monkeypatch.setattr(dry_run, "dry_run", lambda *a, **k: too_big)
    assert dry_run.main(load_config(TINY)) == 1
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_dry_run_reads_the_compilers_out_of_memory_refusal():
    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (93.96G) exceeds available HBM (15.75G).")
    assert dry_run.out_of_memory(error) == {"temp_gib": 93.96, "hbm_gib": 15.75}
    assert dry_run.out_of_memory(RuntimeError("something else")) is None


def test_dry_run_topology_names_are_checked():
    assert dry_run.parse_topology("v5e:2x4") == ("v5e", (2, 4, 1))
    assert dry_run.parse_topology("v5p:2x2x1") == ("v5p", (2, 2, 1))
    for bad in ("v5e", "v9:2x2", "v5e:2xfour", "v5e:0x4"):
        with pytest.raises(ValueError, match="--topology"):
            dry_run.parse_topology(bad)


def test_dry_run_flags(monkeypatch):
    assert parse_command_line(["bond", "--config=" + TINY, "--dry_run", "--topology=v5e:2x4"]) == ["bond"]
    with pytest.raises(UsageError):
        parse_command_line(["bond", "--config=" + TINY, "--dry_runs"])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="the TPU compiler ships in libtpu (.[tpu])")
def test_dry_run_compiles_for_a_tpu_topology_without_a_tpu():
    devices, chip = dry_run.target_devices("v5e:2x4")
    assert len(devices) == 8 and chip.hbm_gib == 15.75
    mesh = sharding.make_mesh((1, 8, 1), devices=devices)
    x = jax.ShapeDtypeStruct((1024, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    w = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    compiled = jax.jit(lambda x, w: x @ w).lower(x, w).compile()
    memory = dry_run.memory_report(compiled)
    # per chip: 1/8 of x's and of w's rows as arguments, 1/8 of the product's rows out
    assert memory["argument_gib"] == pytest.approx(2 * (128 * 8192 + 1024 * 8192) / 2**30, abs=2e-4)
    assert memory["output_gib"] == pytest.approx(2 * 128 * 8192 / 2**30, abs=2e-4)


def test_hlo_largest_buffers_and_loop_collectives_of_a_compiled_program():
    """On 8 CPU devices: a loop that gathers its (loop-carried, fsdp-sharded) weight at every iteration
    moves the full weight per iteration; the same loop carrying the gathered weight moves nothing inside."""
    mesh = sharding.make_mesh((1, 8, 1))
    sharded, whole = NamedSharding(mesh, P("fsdp", None)), NamedSharding(mesh, P())
    x = jnp.ones((16, 256), jnp.float32)
    w = jax.device_put(jnp.ones((256, 256), jnp.float32), sharded)

    def loop(x, w, gather_first):
        w = jax.lax.with_sharding_constraint(w, whole if gather_first else sharded)

        def body(i, carry):
            x, w = carry
            x = jnp.tanh(x @ jax.lax.with_sharding_constraint(w, whole))
            return x, jax.lax.with_sharding_constraint(w * 0.5, whole if gather_first else sharded)

        return jax.lax.fori_loop(0, 3, body, (x, w))

    texts = {g: jax.jit(loop, static_argnums=2).lower(x, w, g).compile().as_text() for g in (False, True)}
    assert hlo.loop_collective_bytes(texts[False]) >= 256 * 256 * 4
    assert hlo.loop_collective_bytes(texts[False], "test_dry_run.py") == hlo.loop_collective_bytes(texts[False])
    assert hlo.loop_collective_bytes(texts[False], "bond/sampling.py") == 0
    assert hlo.loop_collective_bytes(texts[True]) < 256 * 256 * 4 / 8
    biggest = hlo.largest_buffers(texts[True], count=1)[0]
    assert biggest["array"] == "f32[256,256]" and biggest["gib"] == pytest.approx(256 * 256 * 4 / 2**30, abs=1e-3)


def test_dry_run_sampler_splits_its_rows_as_the_step_does():
    """The dry run's sampler program is traced under the run's mesh, like the sampler inside the
    step: on 4 devices with mesh (1, 4, 1) each holds a quarter of the rows (8 prompts × 3 samples →
    6 rows in the decode loop) and, its weights gathered once, the decode loop moves no bytes."""
    import re

    from bond.context import build_context

    config = load_config(TINY)
    config.update(mesh_shape=(1, 4, 1), batch_size=8, num_devices=4)
    context = build_context(config, lambda *_: None, abstract=True, devices=jax.devices()[:4])
    text = dry_run.compile_sampler(context, 3).as_text()
    rows = {int(m.group(1)) for line in text.splitlines() if "mlp/fc_in/dot_general" in line
            for m in [re.search(r"= \w+\[(\d+),\d+,\d+\]", line)] if m}
    assert rows == {2, 6}  # the prefill's 8 prompts and the decode loop's 24 rows, each over 4 devices
    assert hlo.decode_loop_collective_bytes(text) == 0
