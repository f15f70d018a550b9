"""Micro-batching (config.memory.micro_batches, bond/step.py): sampling, scoring, the log-prob passes
and the gradient run over micro-batches of the prompts while the samples and the loss's statistics
stay the whole batch's, so the step's samples, loss, metrics and gradient are those of one pass over
the batch (up to float rounding).

The algorithms compared are registered losses that read statistics beyond one sample: RLOO's
leave-one-out baseline (reinforce), GDC++'s normalizer Ẑ (a mean over the whole batch at the first
step), DPO's chosen / rejected pairs (sample sets derived from the drawn ones), WIND's preference
targets; J-BOND's best-of-2 picks run through the whole step. They run on the toy
task's shapes with a random tiny policy (an abstract setup: nothing is pretrained).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bond.algorithms import Drawn, Samples
from bond.config_base import base_config
from bond.context import make_setup
from bond.models import init_params
from bond.sharding import join_micro_batches, split_micro_batches
from bond.step import Batch, Fixed, init_state, loss_and_grad, make_train_step, micro_batched_logprobs, traced_inputs
from bond.validation import ConfigError, validate

BATCH = 8


def config_of(algorithm: str, micro_batches: int = 1, **algo) -> ml_collections.ConfigDict:
    c = base_config()
    c.algorithm = algorithm
    c.batch_size = BATCH
    c.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32)
    c.algo.update({"num_samples": 2, **algo})
    c.memory.micro_batches = micro_batches
    c.num_devices = 1
    return c


def setup_of(config):
    """The run's setup without its pretrained reference (an abstract setup) and random policy parameters."""
    setup, _ = make_setup(config, log=lambda s: None, abstract=True)
    return setup, init_params(setup.model, jax.random.key(0))


def samples_of(setup, key, count: int) -> Samples:
    """`count` random responses (random lengths, prompt shared) for each of BATCH prompts, with random
    rewards and fixed log-probs: what a step's sample set looks like."""
    task = setup.task
    p, length = task.prompt_length, task.sequence_length
    k = jax.random.split(key, 6)
    prompt = jnp.broadcast_to(jax.random.randint(k[0], (BATCH, 1, p), 0, task.vocab_size), (BATCH, count, p))
    tokens = jnp.concatenate([prompt, jax.random.randint(k[1], (BATCH, count, length - p), 0, task.vocab_size)], -1)
    lengths = jax.random.randint(k[2], (BATCH, count, 1), 1, length - p + 1)
    response = (jnp.arange(length - p) < lengths).astype(jnp.float32)
    response_mask = jnp.concatenate([jnp.zeros((BATCH, count, p)), response], -1)
    attention = jnp.concatenate([jnp.ones((BATCH, count, p), jnp.int32), response.astype(jnp.int32)], -1)
    logp = lambda key: -jnp.abs(jax.random.normal(key, (BATCH, count))) * 4
    return Samples(tokens, attention, response_mask, jax.random.normal(k[3], (BATCH, count)), logp(k[4]), logp(k[5]),
                   logp(k[5]) + 0.5)


def drawn_of(setup) -> Drawn:
    plan = setup.plan
    sets = [samples_of(setup, jax.random.key(i + 1), n) if n else None
            for i, n in enumerate((plan.policy, plan.anchor, plan.reference))]
    return Drawn(*sets)


@functools.cache
def setup_and_params(algorithm: str, knobs: tuple = ()):
    return setup_of(config_of(algorithm, **dict(knobs)))


@functools.cache
def loss_metrics_grad(algorithm: str, knobs: tuple, micro_batches: int):
    """The step's loss phase (`loss_and_grad`) of `algorithm` on its random samples, jitted; memoized
    (the one-pass result is shared by the tests that compare against it)."""
    setup, params = setup_and_params(algorithm, knobs)
    drawn, hp = drawn_of(setup), traced_inputs(setup.config).hparams
    run = jax.jit(lambda p: loss_and_grad(setup, p, drawn, hp, jax.random.key(7), None, setup.task.prompt_length,
                                          setup.algorithm.initial_state(), micro_batches))
    return run(params)


def assert_trees_close(actual, expected):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("algorithm, knobs, micro_batches", [
    ("reinforce", (), 4),
    ("gdcpp", (), 2),
    ("dpo", (), 2),
    ("wind", (("preference", "bradley_terry"),), 4),
])
def test_microbatch_loss_metrics_and_gradient_equal_one_pass(algorithm, knobs, micro_batches):
    (loss, metrics), grads = loss_metrics_grad(algorithm, knobs, 1)
    assert float(optax.tree.norm(grads)) > 0
    (loss_m, metrics_m), grads_m = loss_metrics_grad(algorithm, knobs, micro_batches)
    np.testing.assert_allclose(loss_m, loss, rtol=1e-5, atol=1e-6)
    assert metrics_m.keys() == metrics.keys()
    assert_trees_close(metrics_m, metrics)
    assert_trees_close(grads_m, grads)


def test_microbatch_gradient_of_micro_batch_means_would_differ():
    """The check above can fail: a gradient averaged per micro-batch (batch statistics per micro-batch,
    what plain gradient accumulation computes) differs from the one-pass gradient for GDC++, whose
    first step normalizes by Ẑ, a mean over the whole batch."""
    (_, _), grads = loss_metrics_grad("gdcpp", (), 1)
    setup, params = setup_and_params("gdcpp")
    drawn, hp = drawn_of(setup), traced_inputs(setup.config).hparams
    half_grad = jax.jit(lambda p, half: loss_and_grad(setup, p, half, hp, jax.random.key(7), None,
                                                      setup.task.prompt_length, setup.algorithm.initial_state())[1])
    per_half = [half_grad(params, jax.tree.map(lambda x: x[m::2], drawn)) for m in (0, 1)]
    naive = jax.tree.map(lambda a, b: (a + b) / 2, *per_half)
    with pytest.raises(AssertionError):
        assert_trees_close(naive, grads)


def test_microbatch_split_is_strided_and_joins_back():
    x = jnp.arange(8 * 3).reshape(8, 3)
    parts = split_micro_batches(x, 4)
    assert parts.shape == (4, 2, 3)
    np.testing.assert_array_equal(parts[1], x[1::4])  # rows 1 and 5: spread over a contiguous split of the rows
    np.testing.assert_array_equal(join_micro_batches(parts), x)
    with pytest.raises(ValueError, match="config.memory.micro_batches=3"):
        split_micro_batches(x, 3)


def test_microbatch_fixed_logprobs_equal_one_pass():
    setup, params = setup_and_params("reinforce")
    samples = samples_of(setup, jax.random.key(3), 2)
    one = micro_batched_logprobs(setup, params, samples, setup.task.prompt_length)
    four = jax.jit(lambda p: micro_batched_logprobs(setup, p, samples, setup.task.prompt_length, 4))(params)
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-6)


def test_microbatch_train_step_equals_one_pass():
    """The whole step (sampling, fixed log-prob passes, loss, Adam, EMA anchor, metrics) of J-BOND."""
    results = []
    for micro_batches in (1, 2):
        setup, params = setup_of(config_of("j_bond", micro_batches, num_samples=1))
        prompts = setup.task.prompts("eval", BATCH, 0)
        batch = Batch(jnp.asarray(prompts.tokens), jnp.asarray(prompts.mask), jnp.arange(BATCH, dtype=jnp.int32),
                      jnp.bool_(True))
        step = jax.jit(make_train_step(setup))
        results.append(step(init_state(setup, params), batch, Fixed(params), traced_inputs(setup.config)))
    (state_1, metrics_1), (state_2, metrics_2) = results
    assert not np.isnan(float(metrics_1["policy_kl_ref_estimate"]))  # the reference pass ran (micro-batched)
    assert_trees_close(metrics_2, metrics_1)
    assert_trees_close(state_2, state_1)


@pytest.mark.parametrize("micro_batches, mesh_shape, message", [
    (3, (-1, 1, 1), "must divide config.batch_size=8"),
    (4, (4, 1, 1), "leaves 2 prompts per micro-batch"),
    (0, (-1, 1, 1), "config.memory.micro_batches=0"),
])
def test_microbatch_count_is_validated(micro_batches, mesh_shape, message):
    config = config_of("reinforce", micro_batches)
    config.mesh_shape, config.num_devices = mesh_shape, 0
    with pytest.raises(ConfigError, match=message):
        validate(config, num_devices=4)
