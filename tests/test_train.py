"""The experiment runner end to end: every algorithm, resume after a kill, sharding, validation.

Runs use a tiny budget (a one-layer model, 20 steps, exact evaluation on two prompts) and a
reference pretrained once per session into a shared cache.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bond import algorithms, train
from bond.config_base import load_config, set_field
from bond.context import build_context
from bond.models import response_rows
from bond.step import make_train_step
from bond.metrics import NonFiniteLossError, read_metrics
from bond.validation import ConfigError, validate
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {name: ROOT / "configs" / f"{name}.py" for name in algorithms.names() if (ROOT / "configs" / f"{name}.py").exists()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bond_cache"))


def tiny(name: str, cache_dir: str, **overrides):
    """The quick variant of configs/<name>.py, shrunk further for tests."""
    c = load_config(f"{CONFIGS[name]}:quick")
    c.cache_dir = cache_dir
    c.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64)
    c.reference.update(steps=300, corpus_size=4000, batch_size=64)
    c.steps = 20
    c.batch_size = 8
    c.eval.update(every=20, num_prompts=2)
    c.checkpoint.every = 10
    c.num_devices = 1
    for key, value in overrides.items():
        set_field(c, key, value)
    return c


def test_every_algorithm_has_a_config():
    assert sorted(CONFIGS) == algorithms.names()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_algorithm_runs_end_to_end(name, cache_dir, tmp_path):
    summary = train.run(tiny(name, cache_dir), tmp_path, log=lambda _: None)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    before, after = summary["before"], summary["after"]
    assert np.isfinite(after["eval/reward"]) and after["eval/kl_policy_ref"] > 0
    # The policy moved from the reference it started at.
    assert before["eval/kl_policy_ref"] == pytest.approx(0.0, abs=1e-4)
    assert (tmp_path / "summary.json").exists() and (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name", ["bond", "j_bond", "wind", "reinforce"])
def test_reward_rises(name, cache_dir, tmp_path):
    """Exact expected reward on the eval prompts after 40 steps exceeds the reference's by 0.1
    (the reward's standard deviation under the reference is about 0.5)."""
    c = tiny(name, cache_dir, steps=40, **{"eval.every": 40, "checkpoint.every": 40})
    summary = train.run(c, tmp_path, log=lambda _: None)
    assert summary["after"]["eval/reward"] > summary["before"]["eval/reward"] + 0.1
    assert summary["after"]["eval/win_rate_vs_ref"] > 0.52


def run_cli(args, cache_dir, **kwargs):
    env = {**os.environ, "BOND_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = xla_flags()  # a plain single-device process
    return subprocess.Popen([sys.executable, "-m", "bond.main", *args], env=env, cwd=ROOT, **kwargs)


def cli_args(workdir, cache_dir, steps=30):
    return [
        f"--config={CONFIGS['j_bond']}:quick", f"--workdir={workdir}", f"--config.cache_dir={cache_dir}",
        "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.d_ff=64", "--config.reference.steps=300", "--config.reference.corpus_size=4000",
        "--config.reference.batch_size=64", f"--config.steps={steps}", "--config.batch_size=8",
        "--config.eval.every=10", "--config.eval.num_prompts=2", "--config.checkpoint.every=5",
        "--config.log_every=1",
    ]


@pytest.fixture(scope="module")
def uninterrupted_run(cache_dir, tmp_path_factory):
    """The reference run of the interruption tests: the same command, never stopped."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert run_cli(cli_args(workdir, cache_dir), cache_dir).wait(timeout=600) == 0
    return read_metrics(workdir / "metrics.jsonl")


def start_and_stop(workdir, cache_dir, sig, after_step, args=None):
    """Starts the run (`cli_args`, or the command line `args`), sends `sig` once metrics of
    `after_step` are written; returns the exit code."""
    proc = run_cli(args or cli_args(workdir, cache_dir), cache_dir)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
        if any(r["step"] >= after_step for r in rows):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    return proc.wait(timeout=600)


def test_resume_after_sigkill_matches_uninterrupted_run(cache_dir, tmp_path, uninterrupted_run):
    """SIGKILL a run mid-way (any moment after its first checkpoint, a save may be under way),
    rerun the same command: the metrics equal an uninterrupted run's exactly."""
    assert start_and_stop(tmp_path, cache_dir, signal.SIGKILL, after_step=17) == -signal.SIGKILL
    assert run_cli(cli_args(tmp_path, cache_dir), cache_dir).wait(timeout=600) == 0
    assert read_metrics(tmp_path / "metrics.jsonl") == uninterrupted_run


def test_sigterm_saves_then_exits_and_resumes(cache_dir, tmp_path, uninterrupted_run):
    """SIGTERM: the run saves the step it completed (not only every-5 checkpoints), exits 0, and
    the rerun continues from there to the uninterrupted run's exact metrics."""
    assert start_and_stop(tmp_path, cache_dir, signal.SIGTERM, after_step=7) == 0
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    last_logged = max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl"))
    assert saved[-1] == last_logged and 7 <= last_logged < 30
    assert run_cli(cli_args(tmp_path, cache_dir), cache_dir).wait(timeout=600) == 0
    assert read_metrics(tmp_path / "metrics.jsonl") == uninterrupted_run


def test_sharded_run_equals_single_device_run(cache_dir, tmp_path):
    """The same run on 8 fake devices (mesh (2, 2, 2): data, FSDP and tensor axes at once) and on one
    device; tests/test_sharding.py checks single steps on the other meshes."""
    one = train.run(tiny("j_bond", cache_dir, steps=10), tmp_path / "one", log=lambda _: None)
    for mesh in [(2, 2, 2)]:
        c = tiny("j_bond", cache_dir, steps=10, num_devices=8, mesh_shape=mesh)
        sharded = train.run(c, tmp_path / f"mesh{mesh}", log=lambda _: None)
        for key, value in one["after"].items():
            np.testing.assert_allclose(sharded["after"][key], value, rtol=1e-4, atol=1e-5, err_msg=f"{mesh} {key}")


@pytest.mark.parametrize(
    "algorithm, field, value, message",
    [
        ("bond", "algorithm", "ppo", "config.algorithm='ppo' is not registered"),
        ("bond", "algo.n", 1.0, "config.algo.n=1.0 must be an integer >= 2"),
        ("bond", "algo.n", 4.5, "config.algo.n=4.5 must be an integer"),
        ("bond", "algo.beta", 1.5, "config.algo.beta=1.5 must be in [0, 1]"),
        ("bond", "anchor.eta", 0.0, "config.anchor.eta=0.0 must be in (0, 1]"),
        ("j_bond", "algo.gamma", -1.0, "config.algo.gamma=-1.0 must be >= 0"),
        ("bond", "algo.num_ref_samples", 0, "config.algo.num_ref_samples=0 must be an integer >= 1"),
        ("wind", "algo.wind_variant", "cube", "config.algo.wind_variant='cube' must be one of"),
        ("wind", "algo.num_samples", 1, "config.algo.num_samples=1 must be at least 2 for pairwise losses"),
        ("dpo", "algo.pref_beta", 0.0, "config.algo.pref_beta=0.0 must be > 0"),
        ("bond", "mesh_shape", (3, 1, 1), "config.mesh_shape"),
        ("bond", "batch_size", 12, "config.batch_size=12 must be divisible by the data axes"),
        ("bond", "num_devices", 64, "config.num_devices=64"),
        ("bond", "min_new_tokens", -1, "config.min_new_tokens=-1 must be an integer >= 0"),
        # Score-function and regression losses need samples of the policy itself.
        ("reinforce", "temperature", 0.7, "config.temperature=0.7: algorithm 'reinforce' estimates its gradient"),
        ("j_bond", "top_k", 5, "config.top_k=5: algorithm 'j_bond'"),
        ("wind", "top_p", 0.9, "config.top_p=0.9: algorithm 'wind'"),
        ("gdcpp", "min_new_tokens", 2, "set config.min_new_tokens=0 (or config.allow_biased_samples=True"),
    ],
)
def test_validation_names_the_field(algorithm, field, value, message, cache_dir):
    """Each bad value is named; the algo.* ones by the knob declarations of the algorithm that reads them."""
    c = tiny(algorithm, cache_dir)
    if field == "batch_size":
        c.num_devices, c.mesh_shape = 8, (8, 1, 1)
    set_field(c, field, value)
    with pytest.raises(ConfigError) as error:
        validate(c)
    assert message in str(error.value)


def test_non_plain_sampling_is_rejected_only_where_it_biases_the_gradient(cache_dir):
    """DPO learns from pairs of whatever samples it gets: tempered sampling is its choice. REINFORCE's
    estimate needs the policy's own samples, unless the config accepts the bias explicitly."""
    validate(tiny("dpo", cache_dir, temperature=0.7))
    with pytest.raises(ConfigError, match=r"config\.temperature=0\.7"):
        validate(tiny("reinforce", cache_dir, temperature=0.7))
    validate(tiny("reinforce", cache_dir, temperature=0.7, allow_biased_samples=True))


def test_validation_checks_only_the_knobs_the_algorithm_reads(cache_dir):
    """A knob the algorithm never reads is not its to check: J-BOND ignores algo.n (N of BOND)."""
    c = tiny("j_bond", cache_dir)
    c.algo.n = 1.0
    validate(c)
    c.algorithm = "bond"
    with pytest.raises(ConfigError, match=r"config\.algo\.n=1\.0"):
        validate(c)


def test_cli_config_error_is_one_line_and_exit_2(cache_dir, tmp_path):
    proc = run_cli([f"--workdir={tmp_path}", "--config.algo.beta=2.0"], cache_dir, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "config error: config.algo.beta=2.0 must be in [0, 1]" in err
    assert "Traceback" not in err


def test_reference_passes_only_the_metrics_read_run_on_logging_steps_only(cache_dir):
    """J-BOND's loss reads no reference log-probs (they feed the KL-to-reference metrics only): the
    step skips those passes except on logging steps, where the metrics equal those of the same
    algorithm declared to read every pass (`reads=None`), which computes them at every step."""
    context = build_context(tiny("j_bond", cache_dir, log_every=2), log=lambda _: None)
    setup = context.setup
    first_batch, second_batch = context.batch(0), context.batch(1)
    assert not first_batch.logging and second_batch.logging  # log_every=2: step 2 is logged, step 1 not
    step = jax.jit(make_train_step(setup))
    state1, first = step(context.state, first_batch, context.fixed, context.traced)
    _, logged = step(state1, second_batch, context.fixed, context.traced)
    reads_all = dataclasses.replace(setup, algorithm=dataclasses.replace(setup.algorithm, reads=None))
    _, always = jax.jit(make_train_step(reads_all))(state1, second_batch._replace(logging=first_batch.logging),
                                                    context.fixed, context.traced)
    for name in ("policy_kl_ref_estimate", "anchor_kl_ref_estimate"):
        assert np.isnan(first[name])  # step 1 of log_every=2: not logged, not computed
        assert np.isfinite(always[name]) and always[name] != 0
        np.testing.assert_allclose(logged[name], always[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logged["loss"], always["loss"], rtol=1e-6)


def fixed_logprobs_read_by_loss(loss, inputs: algorithms.LossInputs) -> set[str]:
    """The fixed log-prob fields ("<set>.<field>") that `loss` reads, found by tracing it with those
    arrays as its only inputs and following its outputs back through the operations that compute
    them (nothing is evaluated; an operation with a needed output needs all its operands)."""
    names = [(s, f) for s in algorithms.SAMPLE_SETS for f in algorithms.FIXED_LOGPROBS if getattr(inputs, s) is not None]

    def loss_of(*values):
        replaced = {s: getattr(inputs, s) for s, _ in names}
        for (s, f), value in zip(names, values):
            replaced[s] = replaced[s]._replace(**{f: value})
        return loss(inputs._replace(**replaced))

    jaxpr = jax.make_jaxpr(loss_of)(*(getattr(getattr(inputs, s), f) for s, f in names)).jaxpr
    needed = {id(v) for v in jaxpr.outvars}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(id(v) in needed for v in eqn.outvars):
            needed.update(id(v) for v in eqn.invars)
    return {f"{s}.{f}" for (s, f), var in zip(names, jaxpr.invars) if id(var) in needed}


@pytest.mark.parametrize("name", algorithms.names())
def test_registry_declares_the_fixed_logprobs_each_loss_reads(name):
    """Every registered algorithm's `reads` is exactly what its loss reads (a pass it reads but
    does not declare would be None in the step; one it declares but never reads, wasted)."""
    algorithm = algorithms.get_algorithm(name)
    algo = algorithms.default_algo_config()
    algo.num_samples = 4
    plan = algorithm.plan(algo)

    def samples(count):
        if not count:
            return None
        ints, floats = jnp.zeros((2, count, 6), jnp.int32), jnp.ones((2, count, 6))
        logps = [jnp.full((2, count), -1.0 - i) + jnp.arange(count) for i in range(3)]
        return algorithms.Samples(ints, ints, floats, jnp.arange(2 * count, dtype=jnp.float32).reshape(2, count), *logps)

    inputs = algorithms.LossInputs(
        lambda s: s.sampler_logp * 1.5, samples(plan.policy), samples(plan.anchor), samples(plan.reference),
        {k: jnp.float32(v) for k, v in algo.items() if not isinstance(v, str)},
        ml_collections.FrozenConfigDict(algo), jax.random.key(0), algo_state=algorithm.initial_state(),
    )
    assert fixed_logprobs_read_by_loss(algorithm.loss, inputs) == set(algorithm.reads)


def test_gdcpp_carries_its_running_z_in_the_train_state(cache_dir):
    """GDC++'s Ẑ is the train state's `algo_state`: after two steps it has counted every policy sample of both."""
    c = tiny("gdcpp", cache_dir)
    context = build_context(c, log=lambda _: None)
    step = jax.jit(make_train_step(context.setup))
    state = context.state
    for t in range(2):
        state, metrics = step(state, context.batch(t), context.fixed, context.traced)
    assert float(state.algo_state.count) == 2 * c.batch_size * c.algo.num_samples
    assert np.isfinite(metrics["log_z_estimate"]) and "algo_state" not in metrics


def test_runner_keeps_compiled_programs_under_the_cache_dir(tmp_path, monkeypatch):
    from bond.main import use_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        assert use_compilation_cache(str(tmp_path)) == str(tmp_path / "xla") == jax.config.jax_compilation_cache_dir
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
        assert use_compilation_cache(str(tmp_path)) == str(tmp_path / "mine") == jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_nonfinite_loss_stops_the_run_naming_step_and_checkpoint(cache_dir, tmp_path):
    """Ten good steps (checkpoints at 5 and 10), then the same folder resumed with a learning rate
    that blows the policy up. Step 11's loss is still finite (its update is what breaks the
    parameters), so the first NaN loss is step 12's: the run names it and checkpoint 10, and
    saves nothing after it."""
    good = tiny("reinforce", cache_dir, steps=10, log_every=1, **{"checkpoint.every": 5})
    train.run(good, tmp_path, log=lambda _: None)
    bad = tiny("reinforce", cache_dir, steps=20, log_every=1, learning_rate=1e30, **{"checkpoint.every": 5})
    with pytest.raises(NonFiniteLossError) as error:
        train.run(bad, tmp_path, log=lambda _: None)
    message = str(error.value)
    assert "step 12" in message, message
    assert "10" in message.split("checkpoint", 1)[1], message
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10]


def test_readme_new_loss_example_trains(cache_dir, tmp_path, monkeypatch):
    """The README's 'Adding a loss' code, run as written: it registers and trains."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Adding a loss", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    (tmp_path / "my_losses.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("my_losses")
    summary = train.run(tiny("j_bond", cache_dir, algorithm="hinge_j_bond", steps=10), tmp_path / "run", log=lambda _: None)
    assert np.isfinite(summary["after"]["eval/reward"])


def test_reference_cache_holds_each_train_prompts_own_samples(cache_dir):
    """One row per train prompt, whose samples continue that prompt; rebuilt identically from the key."""
    from bond import stages
    from bond.context import build_reference_cache, make_setup
    from bond.tasks.prompts import load_prompts, read_prompt_rows

    setup, ref_params = make_setup(tiny("bond", cache_dir), log=lambda _: None)
    source = load_prompts(setup.config.task, "train", stages.cache_root(cache_dir) / "tfds")
    key = jax.random.PRNGKey(3)
    cache = build_reference_cache(setup, ref_params, source, key, chunk=1000)
    prompts = read_prompt_rows(source, range(len(source))).tokens
    k = setup.plan.reference
    assert cache.tokens.shape[:2] == (len(source), k)
    np.testing.assert_array_equal(cache.tokens[:, :, : prompts.shape[1]], np.repeat(prompts[:, None], k, axis=1))
    rewards = setup.task.reward(None, response_rows(cache))
    np.testing.assert_allclose(cache.rewards.reshape(-1), rewards, rtol=1e-6)
    again = build_reference_cache(setup, ref_params, source, key, chunk=1000)
    np.testing.assert_array_equal(again.tokens, cache.tokens)
    # A run that reads rows below 600 only draws the first chunk: the same samples there, zeros beyond.
    short = build_reference_cache(setup, ref_params, source, key, chunk=1000, rows_used=600)
    np.testing.assert_array_equal(short.tokens[:1000], cache.tokens[:1000])
    np.testing.assert_array_equal(short.rewards[:1000], cache.rewards[:1000])
    assert short.tokens.shape == cache.tokens.shape and not np.any(short.tokens[1000:])


def test_abstract_run_context_lowers_the_real_step(cache_dir):
    """`build_context(config, abstract=True)` trains, loads and draws nothing, yet its step lowers to
    the same program as the real run's, and compiles ahead of time with a memory analysis. (BOND:
    its per-prompt reference samples are abstract too.)"""
    config = tiny("bond", cache_dir)
    real = build_context(config, log=lambda _: None)
    abstract = build_context(config, log=lambda _: None, abstract=True)
    leaves = jax.tree.leaves((abstract.state, abstract.batch(0), abstract.fixed, abstract.traced))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    assert abstract.traced.reference_samples.tokens.shape == real.traced.reference_samples.tokens.shape
    lowered = abstract.step.lower(abstract.state, abstract.batch(0), abstract.fixed, abstract.traced)
    assert lowered.as_text() == real.step.lower(real.state, real.batch(0), real.fixed, real.traced).as_text()
    memory = lowered.compile().memory_analysis()
    assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0
