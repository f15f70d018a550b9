"""Tests of bond.sampling.sample: exact distribution, log-probs, filters, EOS handling, keys.

Two compiled samplers serve every test (compiles dominate the run time):
  * ENUM: 4 tokens, 3 new tokens, no static filters: every response is enumerable, so sample
    frequencies are compared with exact probabilities (chi-square) at several temperatures / top_p;
  * TINY: 16 tokens, 6 new tokens, top_k = 3, min_new_tokens = 2: per-token checks against the
    logits of a full forward pass.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bond import sampling
from bond.models import TransformerConfig, init_params, logits, sequence_logprobs
from bond.sampling import PAD_ID, sample, sampling_logprobs

EOS = 0
# Four tokens (0 = EOS) and three new tokens: 1 + 3 + 3 * 3 * 4 = 40 possible responses.
ENUM = TransformerConfig(vocab_size=4, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=8)
ENUM_PROMPTS = np.array([[1, 2, 3], [0, 3, 1]], np.int32)  # the second prompt is left-padded
ENUM_PROMPT_MASK = (ENUM_PROMPTS > 0).astype(np.int32)
ENUM_SAMPLES, ENUM_LENGTH = 4000, 3

TINY = TransformerConfig(vocab_size=16, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_len=16)
PROMPTS = np.array([[1, 2, 3, 4], [0, 0, 5, 6], [0, 7, 8, 9]], np.int32)
PROMPT_MASK = (PROMPTS > 0).astype(np.int32)
TINY_OPTIONS = dict(num_samples=8, max_new_tokens=6, top_k=3, min_new_tokens=2, eos_id=EOS)


@pytest.fixture(scope="module")
def enum_params():
    # A larger token embedding makes the (tied) logits far from uniform and strongly
    # context-dependent, so that a wrong distribution is detectable.
    params = init_params(ENUM, jax.random.key(1))
    return {**params, "wte": {"embedding": params["wte"]["embedding"] * 5.0}}


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def _enum_sample(params, key, temperature=1.0, top_p=1.0):
    return sample(ENUM, params, ENUM_PROMPTS, ENUM_PROMPT_MASK, key, num_samples=ENUM_SAMPLES,
                  max_new_tokens=ENUM_LENGTH, eos_id=EOS, temperature=temperature, top_p=top_p)


@pytest.fixture(scope="module")
def enum_samples(enum_params):
    return _enum_sample(enum_params, jax.random.key(0))


@pytest.fixture(scope="module")
def tiny_samples(params):
    return sample(TINY, params, PROMPTS, PROMPT_MASK, jax.random.key(3), temperature=0.8, **TINY_OPTIONS)


def _flat(x):
    return np.asarray(x).reshape((-1,) + x.shape[2:])


def _all_responses():
    """Every ENUM response: ends at its first EOS or after ENUM_LENGTH tokens; PAD after EOS."""
    responses = []
    for tokens in itertools.product(range(ENUM.vocab_size), repeat=ENUM_LENGTH):
        first_eos = tokens.index(EOS) if EOS in tokens else ENUM_LENGTH
        if all(t == PAD_ID for t in tokens[first_eos + 1:]):
            responses.append(tokens)
    return np.array(responses, np.int32)


RESPONSES = _all_responses()


def _enumerated_sequences(b):
    """Prompt b followed by every response, with attention and response masks."""
    counted = (np.cumsum(RESPONSES == EOS, axis=1) - (RESPONSES == EOS)) == 0
    prompt_len = ENUM_PROMPTS.shape[1]
    tokens = np.concatenate([np.repeat(ENUM_PROMPTS[b:b + 1], len(RESPONSES), 0), RESPONSES], axis=1)
    attention = np.concatenate([np.repeat(ENUM_PROMPT_MASK[b:b + 1], len(RESPONSES), 0), counted], axis=1)
    response_mask = np.concatenate([np.zeros((len(RESPONSES), prompt_len)), counted], axis=1)
    return tokens, attention.astype(np.int32), response_mask.astype(np.float32)


def _numpy_filtered_logprobs(logits_row, temperature, top_k, top_p):
    """Reference top-k then top-p filter, written independently of bond.sampling."""
    z = np.asarray(logits_row, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    mass_before, nucleus = 0.0, np.zeros_like(keep)
    for token in np.argsort(-probs, kind="stable"):
        if mass_before < top_p and keep[token]:
            nucleus[token] = True
        mass_before += probs[token]
    probs = np.where(nucleus, probs, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(probs / probs.sum())


def _sample_rows(samples, b):
    """Index into RESPONSES of each sample of prompt b."""
    index = {tuple(r): i for i, r in enumerate(RESPONSES)}
    return np.array([index[tuple(r)] for r in np.asarray(samples.tokens[b, :, ENUM_PROMPTS.shape[1]:])])


def _chi_square_pvalue(rows, probs):
    """Chi-square goodness of fit of sampled response indices to exact probabilities.

    Bins with expected count < 5 are pooled into one bin (the chi^2 approximation needs about 5
    per bin); under the null hypothesis the statistic is then chi^2 with (#bins - 1) degrees of
    freedom, and a correct sampler fails the p > 1e-3 check for 1 seed in 1000.
    """
    counts = np.bincount(rows, minlength=len(probs)).astype(float)
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a response of probability 0"
    counts, expected = counts[support], len(rows) * probs[support]
    small = expected < 5
    observed, expected_kept = counts[~small], expected[~small]
    if small.any():
        observed, expected_kept = np.append(observed, counts[small].sum()), np.append(expected_kept, expected[small].sum())
    assert small.sum() < 5 and observed.size > 10, "precondition: most bins must be well populated"
    return stats.chisquare(observed, expected_kept * observed.sum() / expected_kept.sum()).pvalue


def test_samples_follow_the_exact_distribution_and_logprobs_equal_sequence_logprobs(enum_params, enum_samples):
    assert len(RESPONSES) == 40
    for b in range(2):
        tokens, attention, response_mask = _enumerated_sequences(b)
        token_lp, seq_lp = sequence_logprobs(enum_params, tokens, response_mask, model=ENUM,
                                             attention_mask=attention)
        probs = np.exp(np.asarray(seq_lp, np.float64))
        np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
        assert probs.max() < 0.5, "precondition: the test model should spread mass over many responses"
        rows = _sample_rows(enum_samples, b)
        assert _chi_square_pvalue(rows, probs) > 1e-3
        np.testing.assert_allclose(enum_samples.logprobs[b], np.asarray(token_lp)[rows, ENUM_PROMPTS.shape[1]:],
                                   atol=1e-5)


def test_sampler_logprobs_equal_sequence_logprobs_at_a_temperature(enum_params):
    temperature = 0.6
    samples = _enum_sample(enum_params, jax.random.key(5), temperature=temperature)
    tokens, attention, response_mask = _flat(samples.tokens), _flat(samples.attention_mask), _flat(samples.response_mask)
    token_lp, _ = sequence_logprobs(enum_params, tokens[:1000], response_mask[:1000], model=ENUM,
                                    attention_mask=attention[:1000], temperature=temperature)
    np.testing.assert_allclose(_flat(samples.logprobs)[:1000], token_lp[:, ENUM_PROMPTS.shape[1]:], atol=1e-5)


def test_tempered_nucleus_samples_follow_the_exact_filtered_distribution(enum_params):
    # Also the top-p exclusion check: a response of probability 0 holds an excluded token and
    # must never be sampled.
    temperature, top_p = 1.5, 0.8
    samples = _enum_sample(enum_params, jax.random.key(1), temperature=temperature, top_p=top_p)
    prompt_len = ENUM_PROMPTS.shape[1]
    for b in range(2):
        tokens, attention, response_mask = _enumerated_sequences(b)
        all_logits = np.asarray(logits(ENUM, enum_params, tokens, attention))
        token_lp = np.zeros(RESPONSES.shape)
        for i, t in zip(*np.nonzero(response_mask)):
            token_lp[i, t - prompt_len] = _numpy_filtered_logprobs(all_logits[i, t - 1], temperature, 0, top_p)[
                tokens[i, t]]
        probs = np.exp(token_lp.sum(axis=1))
        np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-6)
        assert (probs == 0).sum() >= 10, "precondition: the nucleus should exclude many responses"
        rows = _sample_rows(samples, b)
        assert _chi_square_pvalue(rows, probs) > 1e-3
        np.testing.assert_allclose(samples.logprobs[b], token_lp[rows], atol=1e-5)


def test_same_key_same_samples_different_key_different(enum_params, enum_samples):
    again = _enum_sample(enum_params, jax.random.key(0))
    other = _enum_sample(enum_params, jax.random.key(8))
    for a, b in zip(enum_samples, again):
        np.testing.assert_array_equal(a, b)
    assert (np.asarray(other.tokens) != np.asarray(enum_samples.tokens)).any()
    # The N samples of one prompt are distinct draws, not copies.
    assert len({tuple(r) for r in np.asarray(enum_samples.tokens[0])}) > 20


def test_micro_batched_sampling_draws_the_same_samples(params, tiny_samples):
    """Decoding the prompts one at a time (micro_batches = B) keeps each row's uniforms: the same
    tokens, masks and lengths as decoding them together, log-probs to float rounding."""
    grouped = sample(TINY, params, PROMPTS, PROMPT_MASK, jax.random.key(3), temperature=0.8, micro_batches=3,
                     **TINY_OPTIONS)
    for field in ("tokens", "attention_mask", "response_mask", "lengths"):
        np.testing.assert_array_equal(getattr(grouped, field), getattr(tiny_samples, field), err_msg=field)
    np.testing.assert_allclose(grouped.logprobs, tiny_samples.logprobs, rtol=1e-5, atol=1e-6)
    assert len({tuple(r) for r in np.asarray(grouped.tokens).reshape(-1, grouped.tokens.shape[-1])}) > 3


def test_temperature_and_top_p_sweeps_do_not_recompile(enum_params, enum_samples):
    compiled = sampling._sample_jit._cache_size()
    for temperature, top_p in [(0.5, 1.0), (1.3, 0.9), (2.0, 0.3)]:
        _enum_sample(enum_params, jax.random.key(0), temperature=temperature, top_p=top_p)
    assert sampling._sample_jit._cache_size() == compiled


def test_top_k_and_min_new_tokens_against_the_logits(params, tiny_samples):
    # 16 tokens, top-3: 13 tokens are excluded at every step; EOS is masked for 2 steps.
    samples, prompt_len = tiny_samples, PROMPTS.shape[1]
    tokens = _flat(samples.tokens)
    all_logits = np.array(logits(TINY, params, tokens, _flat(samples.attention_mask)))
    all_logits[:, prompt_len - 1:prompt_len - 1 + TINY_OPTIONS["min_new_tokens"], EOS] = -np.inf
    counted, sampler_lp = _flat(samples.response_mask), _flat(samples.logprobs)
    for row, t in zip(*np.nonzero(counted)):
        reference = _numpy_filtered_logprobs(all_logits[row, t - 1], 0.8, TINY_OPTIONS["top_k"], 1.0)
        assert np.isfinite(reference[tokens[row, t]]), "sampled a token the filter excludes"
        np.testing.assert_allclose(sampler_lp[row, t - prompt_len], reference[tokens[row, t]], atol=1e-5)
    assert counted.sum() > 100
    responses = tokens[:, prompt_len:]
    assert (responses[:, :2] != EOS).all(), "min_new_tokens=2 must mask EOS at the first two steps"


def test_output_layout_and_eos_handling(tiny_samples):
    samples, prompt_len, length = tiny_samples, PROMPTS.shape[1], TINY_OPTIONS["max_new_tokens"]
    assert samples.tokens.shape == (3, 8, prompt_len + length) and samples.logprobs.shape == (3, 8, length)
    assert samples.tokens.dtype == jnp.int32 and samples.response_mask.dtype == jnp.float32
    np.testing.assert_array_equal(samples.tokens[:, :, :prompt_len], np.broadcast_to(PROMPTS[:, None], (3, 8, 4)))
    np.testing.assert_array_equal(samples.attention_mask[:, :, :prompt_len],
                                  np.broadcast_to(PROMPT_MASK[:, None], (3, 8, 4)))
    assert (np.asarray(samples.response_mask[:, :, :prompt_len]) == 0).all()
    responses, counted = _flat(samples.tokens)[:, prompt_len:], _flat(samples.response_mask)[:, prompt_len:]
    logprobs, lengths = _flat(samples.logprobs), np.asarray(samples.lengths).ravel()
    ends = np.array([np.flatnonzero(r == EOS)[0] + 1 if (r == EOS).any() else length for r in responses])
    assert (ends < length).any(), "precondition: some sample must emit EOS before the length limit"
    np.testing.assert_array_equal(counted, np.arange(length)[None, :] < ends[:, None])
    np.testing.assert_array_equal(lengths, ends)
    np.testing.assert_array_equal(_flat(samples.attention_mask)[:, prompt_len:], counted)
    assert (responses[counted == 0] == PAD_ID).all()
    assert (logprobs[counted == 0] == 0).all() and (logprobs[counted == 1] < 0).all()


def test_sampling_logprobs_filters():
    probs = jax.jit(lambda *a, **kw: jnp.exp(sampling_logprobs(*a, **kw)), static_argnames="top_k")
    logits_row = jnp.log(jnp.array([0.1, 0.4, 0.2, 0.3]))
    np.testing.assert_allclose(probs(logits_row, top_k=2), [0, 4 / 7, 0, 3 / 7], atol=1e-6)
    # Nucleus 0.6: 0.4 (mass before 0) and 0.3 (mass before 0.4 < 0.6) are kept, 0.2 is not.
    np.testing.assert_allclose(probs(logits_row, top_p=0.6), [0, 4 / 7, 0, 3 / 7], atol=1e-6)
    np.testing.assert_allclose(probs(logits_row, top_p=0.75), [0, 4 / 9, 2 / 9, 3 / 9], atol=1e-6)
    squared = jnp.array([0.01, 0.16, 0.04, 0.09]) / 0.3
    np.testing.assert_allclose(probs(logits_row, temperature=0.5), squared, atol=1e-6)


def test_inverse_cdf_sample_never_picks_a_zero_probability_token():
    probs = jnp.array([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5)
    uniforms = jnp.array([0.0, 0.49, 0.5, 0.999, 1.0 - 1e-7])
    np.testing.assert_array_equal(jax.jit(sampling.inverse_cdf_sample)(probs, uniforms), [1, 1, 3, 3, 3])


def test_bad_arguments_raise_value_error(params):
    call = lambda **kw: sample(TINY, params, kw.pop("prompts", PROMPTS), kw.pop("mask", PROMPT_MASK),
                               jax.random.key(0), **{"num_samples": 2, "max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="max_len"):
        call(max_new_tokens=TINY.max_len)
    with pytest.raises(ValueError, match="LEFT-padded"):
        call(mask=PROMPT_MASK[:, ::-1])
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        call(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        call(top_k=TINY.vocab_size + 1)
    with pytest.raises(ValueError, match="num_samples"):
        call(num_samples=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        call(min_new_tokens=5)
    with pytest.raises(ValueError, match="prompt_mask"):
        call(mask=PROMPT_MASK[:, 1:])
    with pytest.raises(ValueError, match="micro_batches"):
        call(micro_batches=2)  # does not divide the 3 prompts
