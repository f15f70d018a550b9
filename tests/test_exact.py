"""Tests for bond/exact.py: enumeration, exact log-probabilities, exact metrics.

Expected values come from closed forms (counts, a uniform model), from scoring every response
separately with `sequence_logprobs`, from the sampler's own log-probabilities, and from a
brute-force best-of-N over all N-tuples of responses in numpy float64.
"""

import functools
import itertools

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from bond import exact, models
from bond.sampling import sample

VOCAB, MAX_LEN, PROMPT_LEN = 4, 3, 4
CONFIG = models.TransformerConfig(
    vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=PROMPT_LEN + MAX_LEN
)
# Left-padded prompts: full, 1 pad, 3 pads.
PROMPTS = np.array([[3, 1, 2, 2], [0, 1, 3, 1], [0, 0, 0, 2]], np.int32)
PROMPT_MASK = (np.arange(PROMPT_LEN)[None, :] >= np.array([[0], [1], [3]])).astype(np.int32)
# The reference computations (brute force, sampler) compile about 2.5x faster on CPU at LLVM -O0.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _params(scale, seed=0):
    """N(0, scale^2) parameters of CONFIG's shapes (numpy: no init program to compile)."""
    shapes = jax.eval_shape(models.init_params, CONFIG, jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def params():
    # Far from the near-uniform GPT-2 init (std 0.02), so that the distribution is peaked.
    return _params(0.5)


@pytest.fixture(scope="module")
def space():
    return exact.enumerate_responses(VOCAB, MAX_LEN)


# ---------------------------------------------------------------------------------------------
# Enumeration


@pytest.mark.parametrize("vocab_size,max_len", [(2, 1), (2, 4), (3, 2), (4, 3), (9, 5)])
def test_response_count_matches_closed_form(vocab_size, max_len):
    k = vocab_size - 1
    expected = max_len + 1 if k == 1 else (k**max_len - 1) // (k - 1) + k**max_len
    space = exact.enumerate_responses(vocab_size, max_len)
    assert exact.num_responses(vocab_size, max_len) == expected
    assert space.size == expected
    assert len({tuple(row) for row in np.asarray(space.tokens)}) == expected


def test_response_count_of_the_benchmark_space():
    assert exact.num_responses(9, 5) == 4_681 + 32_768 == 37_449


@pytest.mark.parametrize("eos_id", [0, 2])
def test_enumeration_layout_and_index(eos_id):
    space = exact.enumerate_responses(VOCAB, MAX_LEN, eos_id=eos_id)
    tokens, mask, lengths = (np.asarray(a) for a in (space.tokens, space.response_mask, space.lengths))
    for row, row_mask, length in zip(tokens, mask, lengths):
        np.testing.assert_array_equal(row_mask, np.arange(MAX_LEN) < length)
        assert eos_id not in row[: length - 1]
        if eos_id in row[:length]:
            assert row[length - 1] == eos_id
            assert (row[length:] == eos_id).all()  # padding after EOS
        else:
            assert length == MAX_LEN  # cut at the length limit
    # Blocks in order: EOS-terminated by length, then full-length.
    eos_terminated = (tokens == eos_id).any(axis=1)
    order_key = np.where(eos_terminated, lengths, MAX_LEN + 1)
    assert (np.diff(order_key) >= 0).all()
    np.testing.assert_array_equal(exact.response_index(space, tokens), np.arange(space.size))


def test_response_index_ignores_tokens_after_eos(space):
    np.testing.assert_array_equal(
        exact.response_index(space, np.array([[1, 0, 3], [1, 0, 0], [0, 2, 2]])),
        exact.response_index(space, np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])),
    )


@pytest.mark.parametrize(
    "kwargs,field",
    [(dict(vocab_size=1, max_len=3), "vocab_size"), (dict(vocab_size=4, max_len=0), "max_len"),
     (dict(vocab_size=4, max_len=3, eos_id=4), "eos_id"), (dict(vocab_size=200, max_len=5), "max_len")],
)
def test_enumeration_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        exact.enumerate_responses(**kwargs)


# ---------------------------------------------------------------------------------------------
# Exact log-probabilities


_score = jax.jit(functools.partial(models.sequence_logprobs, model=CONFIG), compiler_options=FAST_COMPILE)


def _brute_force_logprobs(params, space, temperature):
    """log π(y|x) of every (prompt, response) pair, one sequence at a time through sequence_logprobs."""
    num_prompts, m = PROMPTS.shape[0], space.size
    tokens = np.concatenate(
        [np.repeat(PROMPTS, m, axis=0), np.tile(np.asarray(space.tokens), (num_prompts, 1))], axis=1
    )
    attention = np.concatenate(
        [np.repeat(PROMPT_MASK, m, axis=0), np.ones((num_prompts * m, MAX_LEN), np.int32)], axis=1
    )
    response_mask = np.concatenate(
        [np.zeros((num_prompts * m, PROMPT_LEN)), np.tile(np.asarray(space.response_mask), (num_prompts, 1))],
        axis=1,
    )
    _, seq = _score(params, tokens, response_mask, attention_mask=attention, temperature=temperature)
    return np.asarray(seq).reshape(num_prompts, m)


# chunk_size 1: every stem of L-1 tokens is a head (prefill only); 3: one level walked under each
# of 3 heads; 1024 (the default): the whole trie at once, all prompts in one forward pass.
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_logprobs_equal_scoring_each_response(params, space, chunk_size):
    for temperature in (1.0, 0.7):  # traced: one compile serves both
        got = exact.response_logprobs(
            CONFIG, params, PROMPTS, PROMPT_MASK, space, temperature=temperature, chunk_size=chunk_size
        )
        expected = _brute_force_logprobs(params, space, temperature)
        assert got.shape == (PROMPTS.shape[0], space.size)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(logsumexp(np.asarray(got, np.float64), axis=1), 0.0, atol=1e-5)
    assert expected.min() < -8.0  # the scaled model is far from uniform, so the check has teeth


def test_logprobs_of_a_uniform_model(space):
    # All-zero parameters give all-zero logits: every next token has probability 1/V, so a response
    # of length l has log-probability -l log V (the full-length ones -L log V).
    zeros = _params(0.0)
    got = exact.response_logprobs(CONFIG, zeros, PROMPTS, PROMPT_MASK, space)
    expected = -np.asarray(space.lengths, np.float64) * np.log(VOCAB)
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-5)


def test_logprobs_agree_with_the_sampler(params, space):
    # The sampler's per-token log-probabilities of each drawn response must be the exact table's
    # entry for that response: checks the EOS, padding and length-limit semantics match.
    draw = functools.partial(sample, CONFIG, num_samples=32, max_new_tokens=MAX_LEN)
    draw = jax.jit(draw, compiler_options=FAST_COMPILE)
    out = jax.device_get(draw(params, PROMPTS, PROMPT_MASK, jax.random.key(3)))
    responses = out.tokens[:, :, PROMPT_LEN:]
    index = np.asarray(exact.response_index(space, responses))  # [B, 32]
    table = np.asarray(exact.response_logprobs(CONFIG, params, PROMPTS, PROMPT_MASK, space))
    np.testing.assert_allclose(np.take_along_axis(table, index, axis=1), out.logprobs.sum(axis=-1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(space.tokens)[index], responses)
    np.testing.assert_array_equal(np.asarray(space.lengths)[index], out.lengths)
    assert len(np.unique(index)) > 10  # many different responses, several lengths, were drawn
    assert len(np.unique(out.lengths)) == MAX_LEN


def test_logprobs_reject_a_mismatched_space(params):
    with pytest.raises(ValueError, match="vocab_size"):
        exact.response_logprobs(CONFIG, params, PROMPTS, PROMPT_MASK, exact.enumerate_responses(5, 2))
    with pytest.raises(ValueError, match="max_len"):
        too_long = exact.enumerate_responses(VOCAB, MAX_LEN + 2)
        exact.response_logprobs(CONFIG, params, PROMPTS, PROMPT_MASK, too_long)


# ---------------------------------------------------------------------------------------------
# Exact metrics


def _brute_force_bon(ref, rewards, n):
    """π_BoN by summing over all n-tuples of i.i.d. draws, ties broken uniformly over positions."""
    bon = np.zeros_like(ref)
    for draws in itertools.product(range(len(ref)), repeat=n):
        draw_rewards = rewards[list(draws)]
        winners = [d for d, r in zip(draws, draw_rewards) if r == draw_rewards.max()]
        for d in winners:
            bon[d] += np.prod(ref[list(draws)]) / len(winners)
    return bon


def _kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def test_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    num_prompts, m = 2, 6
    ref = rng.dirichlet(np.ones(m), size=num_prompts)
    policy = rng.dirichlet(np.ones(m), size=num_prompts)
    rewards = np.array([[0.0, 1.0, 1.0, 2.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.5, 0.5, 2.0]])  # with ties
    got = exact.exact_metrics(np.log(policy), np.log(ref), rewards, bon_ns=(1, 2, 3))
    for b in range(num_prompts):
        p, q, r = policy[b], ref[b], rewards[b]
        win = sum(p[i] * q[j] * ((r[i] > r[j]) + 0.5 * (r[i] == r[j])) for i in range(m) for j in range(m))
        expected = {"reward": p @ r, "kl_policy_ref": _kl(p, q), "win_rate_vs_ref": win}
        for n in (1, 2, 3):
            bon = _brute_force_bon(q, r, n)
            expected[f"bon{n}_reward"] = bon @ r
            expected[f"kl_policy_bon{n}"] = _kl(p, bon)
            expected[f"kl_bon{n}_policy"] = _kl(bon, p)
        assert set(got["per_prompt"]) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got["per_prompt"][name][b], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, values in got["per_prompt"].items():
        np.testing.assert_allclose(got["mean"][name], np.mean(values), rtol=1e-6)


def test_metrics_of_the_reference_against_itself():
    # The worked example of ALGORITHMS.md: π_ref = (.5, .3, .2), r = (0, 1, 2), N = 2 gives
    # π_BoN = (.25, .39, .36) and KL(π_BoN‖π_ref) = 0.1406.
    ref = np.log(np.array([[0.5, 0.3, 0.2]]))
    got = exact.exact_metrics(ref, ref, np.array([[0.0, 1.0, 2.0]]), bon_ns=(1, 2))["per_prompt"]
    np.testing.assert_allclose(got["kl_policy_ref"], 0.0, atol=1e-7)
    np.testing.assert_allclose(got["win_rate_vs_ref"], 0.5, atol=1e-6)
    np.testing.assert_allclose(got["kl_policy_bon1"], 0.0, atol=1e-6)
    np.testing.assert_allclose(got["bon2_reward"], 0.39 + 2 * 0.36, atol=1e-6)
    expected_kl = 0.25 * np.log(0.5) + 0.39 * np.log(1.3) + 0.36 * np.log(1.8)
    np.testing.assert_allclose(got["kl_bon2_policy"], expected_kl, atol=1e-6)
    np.testing.assert_allclose(got["kl_bon2_policy"], 0.1406, atol=1e-4)


def test_metrics_on_model_tables(params, space):
    # End to end: the reference is the model, the policy a different parameter draw of it.
    other = jax.tree.map(lambda x: 1.5 * x, params)
    ref = exact.response_logprobs(CONFIG, params, PROMPTS, PROMPT_MASK, space)
    policy = exact.response_logprobs(CONFIG, other, PROMPTS, PROMPT_MASK, space)
    rewards = np.broadcast_to(np.sum(np.asarray(space.tokens) % 2 == 1, axis=1).astype(np.float32), ref.shape)
    self_metrics = exact.exact_metrics(ref, ref, rewards, bon_ns=(4,))["per_prompt"]
    np.testing.assert_allclose(self_metrics["kl_policy_ref"], 0.0, atol=1e-6)
    np.testing.assert_allclose(self_metrics["win_rate_vs_ref"], 0.5, atol=1e-5)
    metrics = exact.exact_metrics(policy, ref, rewards, bon_ns=(4,))["per_prompt"]
    assert (metrics["kl_policy_ref"] > 1e-3).all()
    # Best-of-4 of the reference beats the reference on reward (rewards are not all tied).
    assert (self_metrics["bon4_reward"] > self_metrics["reward"]).all()


@pytest.mark.parametrize(
    "shapes,rewards,bon_ns,match",
    [
        (((2, 3), (2, 4)), np.zeros((2, 3)), (2,), "ref_logprobs"),
        (((2, 3), (2, 3)), np.zeros(3), (2,), "rewards"),
        (((3,), (3,)), np.zeros(3), (2,), "logprobs"),
        (((1, 2), (1, 2)), np.array([[0.0, np.nan]]), (2,), "finite"),
        (((1, 2), (1, 2)), np.zeros((1, 2)), (0,), "bon_ns"),
    ],
)
def test_metrics_reject_bad_input(shapes, rewards, bon_ns, match):
    logprobs, ref_logprobs = (np.full(shape, -np.log(shape[-1])) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        exact.exact_metrics(logprobs, ref_logprobs, rewards, bon_ns=bon_ns)


# ---------------------------------------------------------------------------------------------
# The reference's trade-offs: Best-of-N points and the KL-regularized front


def _tilted(ref, rewards, beta):
    """π_β ∝ π_ref·exp(r/β) on the whole support, in float64 (no grouping by reward value)."""
    with np.errstate(divide="ignore"):  # log 0 = −inf: zero-probability responses stay at 0
        logits = np.log(ref) + rewards / beta
    return np.exp(logits - logsumexp(logits))


# Two prompts with tied rewards (Best-of-N breaks ties at random) and a
# zero-probability response in the second.
FRONT_REF = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [0.4, 0.0, 0.3, 0.2, 0.1]])
FRONT_REWARDS = np.array([[0.0, 1.0, 1.0, 2.0, 0.5], [1.0, 3.0, 0.0, 1.0, 2.0]])


def test_bon_points_of_the_worked_example():
    # π_ref = (.5, .3, .2), r = (0, 1, 2), N = 2: π_BoN = (.25, .39, .36), KL(π_BoN‖π_ref) = 0.1406.
    got = exact.bon_points(np.array([[0.5, 0.3, 0.2]]), np.array([[0.0, 1.0, 2.0]]), ns=(1, 2))
    assert got["n"] == [1, 2]
    np.testing.assert_allclose(got["kl"], [0.0, 0.25 * np.log(0.5) + 0.39 * np.log(1.3) + 0.36 * np.log(1.8)], atol=1e-6)
    np.testing.assert_allclose(got["kl"][1], 0.1406, atol=1e-4)
    np.testing.assert_allclose(got["reward"], [0.3 + 0.4, 0.39 + 2 * 0.36], atol=1e-6)


def test_bon_points_against_brute_force():
    """The prompt-mean of KL(π_BoN‖π_ref) and E_BoN[r], π_BoN summed over every N-tuple of draws."""
    got = exact.bon_points(FRONT_REF, FRONT_REWARDS, ns=(2, 3))
    for i, n in enumerate((2, 3)):
        bons = [_brute_force_bon(q, r, n) for q, r in zip(FRONT_REF, FRONT_REWARDS)]
        kls = [_kl(b[q > 0], q[q > 0]) for b, q in zip(bons, FRONT_REF)]
        np.testing.assert_allclose(got["kl"][i], np.mean(kls), rtol=1e-5)
        np.testing.assert_allclose(got["reward"][i], np.mean([b @ r for b, r in zip(bons, FRONT_REWARDS)]), rtol=1e-5)


def test_kl_regularized_front_against_the_closed_form():
    betas = (4.0, 1.0, 0.25)
    got = exact.kl_regularized_front(FRONT_REF, FRONT_REWARDS, betas)
    # π_ref first (β = ∞), then by KL: a smaller β spends more KL for more reward.
    assert got["beta"] == [None, 4.0, 1.0, 0.25] and got["kl"][0] == 0.0
    np.testing.assert_allclose(got["reward"][0], np.mean(np.sum(FRONT_REF * FRONT_REWARDS, axis=-1)))
    for i, beta in enumerate(betas, start=1):
        pis = [_tilted(q, r, beta) for q, r in zip(FRONT_REF, FRONT_REWARDS)]
        kls = [_kl(p[q > 0], q[q > 0]) for p, q in zip(pis, FRONT_REF)]
        np.testing.assert_allclose(got["kl"][i], np.mean(kls), rtol=1e-9)
        np.testing.assert_allclose(got["reward"][i], np.mean([p @ r for p, r in zip(pis, FRONT_REWARDS)]), rtol=1e-9)
    assert np.all(np.diff(got["kl"]) > 0) and np.all(np.diff(got["reward"]) > 0)
    # β → ∞ returns to π_ref.
    far = exact.kl_regularized_front(FRONT_REF, FRONT_REWARDS, (1e6,))
    np.testing.assert_allclose(far["kl"][1], 0.0, atol=1e-9)
    np.testing.assert_allclose(far["reward"][1], far["reward"][0], atol=1e-6)


def test_best_of_n_lies_below_the_front():
    """π_β is KL-optimal, so at each Best-of-N point's KL the front's reward is at least BoN's."""
    points = exact.reference_front(FRONT_REF, FRONT_REWARDS, bon_ns=(2, 4, 8))
    front, bon = points["front"], points["bon"]
    assert bon["n"] == [2, 4, 8] and np.all(np.diff(bon["kl"]) > 0)
    assert front["kl"][-1] > bon["kl"][-1]  # the default β grid reaches past BoN's KLs
    # Linear interpolation between front points lies below the concave front: a conservative check.
    at_bon_kl = np.interp(bon["kl"], front["kl"], front["reward"])
    assert np.all(at_bon_kl >= np.asarray(bon["reward"]))


@pytest.mark.parametrize("fn", [exact.kl_regularized_front, exact.bon_points])
def test_reference_front_rejects_bad_input(fn):
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        fn(np.full(3, 1 / 3), np.zeros(3), (2,))
    with pytest.raises(ValueError, match="positive"):
        fn(FRONT_REF, FRONT_REWARDS, (0,))
