"""Exact tests of the best-of-N math in bond.bon."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bond import bon


def brute_force_bon(probs, rewards, n):
    """π_BoN by enumerating every n-tuple of draws, ties split uniformly (float64)."""
    probs, rewards = np.asarray(probs, np.float64), np.asarray(rewards, np.float64)
    out = np.zeros_like(probs)
    for draw in itertools.product(range(len(probs)), repeat=n):
        draw_p = np.prod(probs[list(draw)])
        best = max(rewards[list(draw)])
        winners = [i for i in draw if rewards[i] == best]
        for i in winners:
            out[i] += draw_p / len(winners)
    return out


def test_paper_example():
    """π_ref = (.5, .3, .2), r = (0, 1, 2), N = 2 → (.25, .39, .36), KL = 0.1406 (ALGORITHMS.md §1)."""
    ref = jnp.array([0.5, 0.3, 0.2])
    probs = bon.bon_probs(ref, jnp.array([0.0, 1.0, 2.0]), 2)
    np.testing.assert_allclose(probs, [0.25, 0.39, 0.36], atol=1e-6)
    np.testing.assert_allclose(bon.kl_divergence(probs, ref), 0.1406, atol=5e-5)


def test_no_ties_is_difference_of_cdf_powers():
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(50))
    rewards = rng.normal(size=50)
    order = np.argsort(rewards)
    cdf = np.cumsum(ref[order])
    p_le = np.empty(50)
    p_le[order] = cdf
    p_lt = p_le - ref
    for n in (1, 2, 3, 7, 32):
        expected = p_le**n - p_lt**n
        np.testing.assert_allclose(bon.bon_probs(ref, rewards, n), expected, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("n", [2, 3])
def test_ties_match_brute_force(n):
    ref = np.array([0.2, 0.3, 0.1, 0.25, 0.15])
    rewards = np.array([1.0, 1.0, 0.0, 2.0, 0.0])  # two tie classes
    np.testing.assert_allclose(bon.bon_probs(ref, rewards, n), brute_force_bon(ref, rewards, n), atol=1e-6)


def test_sums_to_one_with_batch_axes_and_large_n():
    rng = np.random.default_rng(1)
    ref = rng.dirichlet(np.ones(200), size=(3, 2)).astype(np.float32)
    rewards = rng.integers(0, 20, size=(3, 2, 200)).astype(np.float32)  # many ties
    for n in (1, 2, 16, 1024):
        probs = bon.bon_probs(ref, rewards, n)
        assert probs.shape == (3, 2, 200)
        assert np.all(np.isfinite(probs))
        np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, atol=1e-5)


def test_large_n_matches_float64_reference():
    """n = 1024 in float32: no overflow, no NaN, and close to a float64 evaluation."""
    rng = np.random.default_rng(2)
    ref = rng.dirichlet(np.ones(1000))
    rewards = rng.normal(size=1000)
    q = bon.reward_quantiles(ref, rewards)
    p_le = np.asarray(q.p_le, np.float64)
    # float64 reference through the tail, exact to round-off: p_le^n − p_lt^n with p_lt = p_le − π_ref.
    expected = p_le**1024 - np.maximum(p_le - ref, 0) ** 1024
    got = bon.bon_probs(jnp.asarray(ref, jnp.float32), jnp.asarray(rewards, jnp.float32), 1024)
    assert np.all(np.isfinite(got))
    top = expected > 1e-6
    np.testing.assert_allclose(np.asarray(got)[top], expected[top], rtol=2e-3)


def test_composition_bon_a_of_bon_b_is_bon_ab():
    rng = np.random.default_rng(3)
    ref = rng.dirichlet(np.ones(30))
    rewards = rng.integers(0, 10, size=30).astype(np.float64)  # ties included
    with jax.enable_x64(True):
        composed = bon.bon_probs(bon.bon_probs(ref, rewards, 3), rewards, 4)
        direct = bon.bon_probs(ref, rewards, 12)
        np.testing.assert_allclose(composed, direct, atol=1e-12)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_kl_under_bound_and_tight_in_the_continuous_limit(n):
    rng = np.random.default_rng(4)
    k = 20_000
    ref = rng.dirichlet(np.full(k, 5.0))  # near-continuous: every atom tiny
    rewards = rng.normal(size=k)
    probs = bon.bon_probs(ref, rewards, n)
    kl = float(bon.kl_divergence(probs, ref))
    bound = float(bon.kl_upper_bound(n))
    assert kl <= bound + 1e-6
    assert bound - kl < 1e-3


def test_kl_bound_values():
    np.testing.assert_allclose(bon.kl_upper_bound(jnp.array([2.0, 4.0, 8.0, 16.0])), [0.1931, 0.6363, 1.2044, 1.8351], atol=1e-4)


def test_kl_strictly_below_bound_with_atoms():
    """N = 4 on (.5, .3, .2): π_BoN = (.5^4, .8^4 − .5^4, 1 − .8^4), KL by hand 0.55975 < 0.63629."""
    ref = jnp.array([0.5, 0.3, 0.2])
    probs = bon.bon_probs(ref, jnp.array([0.0, 1.0, 2.0]), 4)
    np.testing.assert_allclose(probs, [0.0625, 0.3471, 0.5904], atol=1e-6)
    expected = 0.0625 * np.log(0.125) + 0.3471 * np.log(0.3471 / 0.3) + 0.5904 * np.log(0.5904 / 0.2)
    np.testing.assert_allclose(bon.kl_divergence(probs, ref), expected, rtol=1e-5)
    assert expected < float(bon.kl_upper_bound(4)) - 0.07


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_win_rate_tends_to_n_over_n_plus_one(n):
    rng = np.random.default_rng(5)
    k = 20_000
    ref = rng.dirichlet(np.full(k, 5.0))
    rewards = rng.normal(size=k)
    w = bon.win_rate(bon.bon_probs(ref, rewards, n), ref, rewards)
    np.testing.assert_allclose(w, n / (n + 1), atol=1e-4)


def test_win_rate_counts_ties_half():
    ref = jnp.array([0.5, 0.5])
    rewards = jnp.array([1.0, 1.0])
    np.testing.assert_allclose(bon.win_rate(bon.bon_probs(ref, rewards, 8), ref, rewards), 0.5)
    # Against itself any policy wins exactly half the time.
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(10))
    r = rng.integers(0, 4, size=10).astype(np.float32)
    np.testing.assert_allclose(bon.win_rate(p, p, r), 0.5, atol=1e-6)


def test_kl_helpers():
    p = jnp.array([0.5, 0.5, 0.0])
    q = jnp.array([0.25, 0.25, 0.5])
    np.testing.assert_allclose(bon.kl_divergence(p, q), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(bon.kl_divergence_from_logs(jnp.log(p), jnp.log(q)), np.log(2.0), rtol=1e-6)
    assert bon.kl_divergence(q, p) == np.inf


def test_empirical_quantile_and_its_expectation():
    rewards = jnp.array([[0.0, 1.0, 2.0]])
    ref_rewards = jnp.array([[1.0, 1.0, 3.0, -1.0]])
    np.testing.assert_allclose(bon.empirical_quantile(rewards, ref_rewards), [[0.25, 0.75, 0.75]])
    # With add-one smoothing: (k p̂ + 1)/(k + 1).
    np.testing.assert_allclose(np.exp(bon.smoothed_log_quantile(rewards, ref_rewards)), [[0.4, 0.8, 0.8]], rtol=1e-6)
    # A masked reference sample is ignored.
    masked = bon.empirical_quantile(rewards, jnp.array([[1.0, 1.0, 3.0, 9.0]]), ref_weights=jnp.array([[1, 1, 1, 0.0]]))
    np.testing.assert_allclose(masked, [[0.0, 2 / 3, 2 / 3]], rtol=1e-6)


def test_empirical_quantile_jitted_and_vmapped_at_scale():
    """Regression: jit(vmap) over the number of reference samples kept, with 2,500 prompts, equals
    numpy (a product-sum form of this function is miscompiled by XLA:CPU at this size)."""
    rng = np.random.default_rng(10)
    ref = rng.standard_normal((2500, 256)).astype(np.float32)
    rewards = np.tile(np.array([-1.6, 0.0, 1.3, 0.5], np.float32), (2500, 1))
    ks = np.array([2, 4, 8, 16, 32, 64, 128, 256])

    def with_k(k):
        weights = jnp.broadcast_to(jnp.arange(256) < k, ref.shape).astype(jnp.float32)
        return bon.empirical_quantile(rewards, ref, ref_weights=weights)

    got = np.asarray(jax.jit(jax.vmap(with_k))(jnp.asarray(ks)))
    for i, k in enumerate(ks):
        expected = (ref[:, None, :k] <= rewards[:, :, None]).mean(axis=-1)
        np.testing.assert_allclose(got[i], expected, atol=1e-6)


def test_empirical_quantile_is_unbiased_monte_carlo():
    """E[p̂_le] = p_le: 4000 prompts' worth of k = 16 reference samples, tolerance 5 standard errors."""
    rng = np.random.default_rng(7)
    ref = np.array([0.1, 0.4, 0.3, 0.2])
    rewards = np.array([3.0, 1.0, 2.0, 1.0])
    ref_samples = rng.choice(4, p=ref, size=(4000, 16))
    p_hat = np.asarray(bon.empirical_quantile(np.tile(rewards, (4000, 1)), rewards[ref_samples]))
    exact = np.asarray(bon.reward_quantiles(ref, rewards).p_le)
    se = p_hat.std(axis=0) / np.sqrt(4000)
    assert np.all(np.abs(p_hat.mean(axis=0) - exact) <= 5 * se + 1e-9)


def test_best_index_breaks_ties_uniformly():
    rewards = jnp.array([1.0, 3.0, 3.0, 3.0, 2.0])
    keys = jax.random.split(jax.random.PRNGKey(0), 6000)
    picks = np.asarray(jax.vmap(lambda k: bon.best_index(rewards, k))(keys))
    counts = np.bincount(picks, minlength=5)
    assert counts[0] == counts[4] == 0
    assert stats.chisquare(counts[1:4]).pvalue > 1e-3
    # Padding is never chosen, even with the highest reward.
    assert int(bon.best_index(jnp.array([1.0, 9.0]), jax.random.PRNGKey(1), weights=jnp.array([1.0, 0.0]))) == 0


def test_rso_limits_and_counts():
    rewards = jnp.array([[0.3, 2.0, -1.0, 1.5, 0.9, 1.9]])
    key = jax.random.PRNGKey(0)
    greedy = bon.statistical_rejection_sampling(rewards, key, num_accept=2, beta=1e-6)
    np.testing.assert_array_equal(greedy, [[False, True, False, False, False, True]])
    first = bon.statistical_rejection_sampling(rewards, key, num_accept=2, beta=1e9)
    np.testing.assert_array_equal(first, [[True, True, False, False, False, False]])
    many = bon.statistical_rejection_sampling(jnp.tile(rewards, (50, 1)), key, num_accept=3, beta=0.5)
    np.testing.assert_array_equal(np.sum(many, axis=-1), 3)
    with pytest.raises(ValueError, match="num_accept"):
        bon.statistical_rejection_sampling(rewards, key, num_accept=7, beta=1.0)


def test_rso_accepts_from_the_tilted_distribution():
    """One accepted sample of k = 64 candidates from π_sft follows π_sft·exp(r/β) (chi-square, fixed seed).

    The first acceptance in an i.i.d. stream accepted with probability exp((r − r_max)/β) has law
    ∝ π_sft·exp(r/β) once r_max is the support's maximum; that fails with probability 0.8^64 here.
    """
    sft = np.array([0.5, 0.3, 0.2])
    r = np.array([0.0, 1.0, 2.0])
    beta = 1.0
    target = sft * np.exp(r / beta)
    target /= target.sum()
    rng = np.random.default_rng(8)
    trials = 20_000
    idx = rng.choice(3, p=sft, size=(trials, 64))
    accepted = np.asarray(bon.statistical_rejection_sampling(jnp.asarray(r[idx]), jax.random.PRNGKey(3), num_accept=1, beta=beta))
    chosen = idx[accepted]
    counts = np.bincount(chosen, minlength=3)
    assert counts.sum() == trials
    assert stats.chisquare(counts, target * trials).pvalue > 1e-3


@pytest.mark.parametrize(
    "beta, acceptance, tv", [(0.5, 0.9995, 0.1229), (1.0, 0.8768, 0.0749), (2.0, 0.4982, 0.0035)]
)
def test_quasi_rejection_poisson(beta, acceptance, tv):
    """Proposal Poisson(10), target Poisson(11): exact acceptance rate and TV(p, q_β) (ALGORITHMS.md §5)."""
    x = np.arange(0, 200)
    log_q = stats.poisson.logpmf(x, 10)
    log_p = stats.poisson.logpmf(x, 11)
    with jax.enable_x64(True):
        a = np.asarray(bon.quasi_rejection_acceptance(log_p, log_q, beta))
    q = np.exp(log_q)
    rate = float(np.sum(q * a))
    q_beta = q * a / rate
    np.testing.assert_allclose(rate, acceptance, atol=1e-4)
    np.testing.assert_allclose(0.5 * np.sum(np.abs(np.exp(log_p) - q_beta)), tv, atol=1e-4)
    # Sampled acceptance frequency within 5 standard errors of the exact rate.
    rng = np.random.default_rng(9)
    samples = rng.poisson(10, size=50_000)
    accept = np.asarray(bon.quasi_rejection_sample(jax.random.PRNGKey(0), log_p[samples], log_q[samples], beta))
    se = np.sqrt(rate * (1 - rate) / samples.size)
    assert abs(accept.mean() - rate) <= 5 * se + 1e-4


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="rewards"):
        bon.bon_probs(jnp.ones(3) / 3, jnp.ones(4), 2)
    with pytest.raises(ValueError, match="ref_rewards"):
        bon.empirical_quantile(jnp.ones((2, 3)), jnp.ones((3, 3)))
