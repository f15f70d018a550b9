"""Tests of the baseline losses: REINFORCE/RLOO, vBoN, DPO/IPO/SPPO, DPG/GDC++, RAFT, BoNBoN.

Gradient estimators are checked on a finite support: B independent prompts, each with a softmax
policy π_θ = softmax(θ_b) over K actions, so every objective has an exact gradient by enumeration
(jax.grad of the objective summed over the support, in float64).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradient_checks import Z_SCORE, assert_mc_gradient_matches
from bond.losses import distribution_matching as dm
from bond.losses import policy_gradient as pg
from bond.losses import preference as pref
from bond.losses import rejection_sft as rs

B, K = 3, 5  # prompts, support size


def _key(seed: int) -> jax.Array:
    """A fixed-seed PRNG key. The 'rbg' generator compiles in a fraction of threefry's time on
    CPU (0.2 s instead of 2 s for the vmapped samplers here), which keeps this file fast."""
    return jax.random.key(seed, impl="rbg")


def _take(table: jax.Array, y: jax.Array) -> jax.Array:
    """table[b, y[b, s]] for a [B, K] table and [B, S] indices."""
    return jnp.take_along_axis(table, y, axis=1)


def _assert_has_power(se: np.ndarray, exact: jax.Array, atol: float = 1e-6) -> None:
    """The check could fail: a gradient scaled by 2 or by ½ would lie outside the tolerance somewhere.

    Scaled by c, the Monte-Carlo mean misses by |c − 1|·|g_i|; that exceeds Z·se_i + atol in at
    least one component when max_i |g_i| / (Z·se_i + atol) > 2.
    """
    ratio = np.abs(np.asarray(exact).reshape(-1)) / (Z_SCORE * se + atol)
    assert ratio.max() > 2.0, f"Monte-Carlo tolerance too loose for the test to have power: {ratio}"


class _Problem:
    """Random policy logits θ [B, K], reference, rewards and proposal, in float64."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.theta = jnp.asarray(rng.normal(size=(B, K)))
        self.ref_logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(B, K))))
        self.rewards = jnp.asarray(rng.normal(size=(B, K)))
        # GDC++ target p ∝ P close to the policy, proposal q between them (a late training stage).
        self.log_target = self.theta + 0.5 * jnp.asarray(rng.normal(size=(B, K))) + 3.0
        self.log_z = jax.nn.logsumexp(self.log_target, axis=-1)
        self.proposal_logp = jax.nn.log_softmax(self.theta + 0.3 * jnp.asarray(rng.normal(size=(B, K))))


def _sampled_gradient(loss_fn, theta, sample_logits, num_samples):
    """Per-key estimate: the gradient in θ of loss_fn(logp, y) on y [B, S] ~ softmax(sample_logits)."""

    def estimate(key):
        y = jax.random.categorical(key, sample_logits[:, None, :], shape=(B, num_samples))
        return jax.grad(lambda th: loss_fn(_take(jax.nn.log_softmax(th), y), y))(theta).reshape(-1)

    return estimate


# ----------------------------------------------------------------------------------------------
# REINFORCE / RLOO and vBoN: Monte-Carlo gradient against the exact gradient.


def _reinforce_objective(theta, ref_logp, rewards, beta):
    """mean_b Σ_y π(y) [β(log π − log π_ref) − r] = mean_b β·KL(π‖π_ref) − E_π r."""
    logpi = jax.nn.log_softmax(theta)
    return jnp.mean(jnp.sum(jnp.exp(logpi) * (beta * (logpi - ref_logp) - rewards), axis=-1))


def test_reinforce_gradient_matches_exact():
    """S = 4 (RLOO baseline) and S = 1 (no baseline) on independent samples, in one compiled estimator.

    The exact gradient with β = 0 is also checked, and it must lie outside the tolerance of the
    β = 0.7 check: a loss that dropped the KL term from the return would fail.
    """
    beta = 0.7
    with jax.enable_x64(True):
        p = _Problem(0)
        exact = jax.grad(_reinforce_objective)(p.theta, p.ref_logp, p.rewards, beta)
        exact_no_kl = jax.grad(_reinforce_objective)(p.theta, p.ref_logp, p.rewards, 0.0)

        def loss(logp, y, beta):
            return pg.reinforce(logp, _take(p.ref_logp, y), _take(p.rewards, y), beta=beta)[0]

        rloo = _sampled_gradient(functools.partial(loss, beta=beta), p.theta, p.theta, 4)
        single = _sampled_gradient(functools.partial(loss, beta=beta), p.theta, p.theta, 1)
        no_kl = _sampled_gradient(functools.partial(loss, beta=0.0), p.theta, p.theta, 4)

        def estimate(key):
            keys = jax.random.split(key, 3)
            return jnp.concatenate([rloo(keys[0]), single(keys[1]), no_kl(keys[2])])

        expected = jnp.concatenate([exact.ravel(), exact.ravel(), exact_no_kl.ravel()])
        se = assert_mc_gradient_matches(estimate, expected, _key(1))
        d = exact.size
        _assert_has_power(se[:d], exact)
        _assert_has_power(se[d : 2 * d], exact)
        missing_kl_error = np.abs(np.asarray(exact_no_kl - exact)).ravel()
        assert np.any(missing_kl_error > Z_SCORE * se[2 * d :] + 1e-6)


def _log_p_le(ref_logp: jax.Array, rewards: jax.Array) -> jax.Array:
    """log F(r(y)) = log P_{y'~π_ref}[r(y') <= r(y)] per prompt, by enumeration."""
    ref = np.exp(np.asarray(ref_logp))
    r = np.asarray(rewards)
    p_le = np.einsum("bj,bij->bi", ref, (r[:, None, :] <= r[:, :, None]).astype(float))
    return jnp.asarray(np.log(p_le))


def test_vbon_gradient_matches_exact():
    n = 4
    with jax.enable_x64(True):
        p = _Problem(2)
        log_f = _log_p_le(p.ref_logp, p.rewards)

        def objective(theta):
            """mean_b KL(π‖π_ref) − (n − 1)·E_π log F."""
            logpi = jax.nn.log_softmax(theta)
            return jnp.mean(jnp.sum(jnp.exp(logpi) * (logpi - p.ref_logp - (n - 1) * log_f), axis=-1))

        exact = jax.grad(objective)(p.theta)

        def loss(logp, y):
            return pg.vbon(logp, _take(p.ref_logp, y), _take(log_f, y), n=n)[0]

        estimate = _sampled_gradient(loss, p.theta, p.theta, 4)
        se = assert_mc_gradient_matches(estimate, exact, _key(3))
        _assert_has_power(se, exact)


def test_vbon_metrics_by_hand():
    logp = jnp.array([[-1.0, -2.0]])
    ref_logp = jnp.array([[-1.5, -1.0]])
    log_f = jnp.log(jnp.array([[0.25, 1.0]]))
    _, metrics = pg.vbon(logp, ref_logp, log_f, n=3)
    kl = np.mean([0.5, -1.0])
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-6)
    np.testing.assert_allclose(metrics["objective"], kl - 2 * np.mean(np.log([0.25, 1.0])), rtol=1e-6)
    np.testing.assert_allclose(metrics["log_quantile_mean"], np.log(0.25) / 2, rtol=1e-6)


def test_reinforce_rloo_advantages_by_hand():
    """Surrogate gradient wrt logp is −(1/BS)·(R_i − mean_{j≠i} R_j), computed by hand."""
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    ref_logp = jnp.array([[-1.2, -1.0, -1.0]])
    rewards = jnp.array([[1.0, 0.0, 3.0]])
    beta = 0.5
    returns = np.asarray(rewards - beta * (logp - ref_logp))[0]
    loo = np.array([(returns.sum() - r) / 2 for r in returns])
    grad, metrics = jax.grad(lambda lp: pg.reinforce(lp, ref_logp, rewards, beta=beta), has_aux=True)(logp)
    np.testing.assert_allclose(grad[0], -(returns - loo) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["return_mean"], returns.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["advantage_std"], np.std(returns - loo), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# DPG / GDC++.


def _forward_kl_objective(theta, log_target, log_z):
    """mean_b KL(p_b‖π_b), p = exp(log P − log Z)."""
    log_p = log_target - log_z[:, None]
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(theta)), axis=-1))


def test_distribution_matching_gradient_matches_exact_and_baseline_lowers_variance():
    """DPG and GDC++ on the same proposal samples: both unbiased for ∇KL(p‖π_θ), GDC++ less variable.

    Per-batch variance = se²·num_batches; with 2000 batches each is estimated to about ±3%
    (relative sd √(2/1999)), far below the gap asserted.
    """
    num_batches = 2000
    with jax.enable_x64(True):
        p = _Problem(4)
        exact = jax.grad(_forward_kl_objective)(p.theta, p.log_target, p.log_z)

        def loss(logp, y, loss_fn):
            return loss_fn(logp, _take(p.proposal_logp, y), _take(p.log_target, y), log_z=p.log_z)[0]

        dpg = _sampled_gradient(functools.partial(loss, loss_fn=dm.dpg), p.theta, p.proposal_logp, 4)
        gdc = _sampled_gradient(functools.partial(loss, loss_fn=dm.gdc_pp), p.theta, p.proposal_logp, 4)

        def estimate(key):  # the same key, so the same samples, for both
            return jnp.concatenate([dpg(key), gdc(key)])

        expected = jnp.concatenate([exact.ravel(), exact.ravel()])
        se = assert_mc_gradient_matches(estimate, expected, _key(5), num_batches=num_batches)
        d = exact.size
        _assert_has_power(se[:d], exact)
        _assert_has_power(se[d:], exact)
        variance_dpg = np.sum(se[:d] ** 2) * num_batches
        variance_gdc = np.sum(se[d:] ** 2) * num_batches
        assert variance_gdc < 0.5 * variance_dpg, (variance_gdc, variance_dpg)


def _whole_support(problem: _Problem):
    """Every support point once per prompt, weighted by q: weighted means become exact E_q."""
    y = jnp.broadcast_to(jnp.arange(K), (B, K))
    return y, jnp.exp(problem.proposal_logp)


def test_dpg_expected_gradient_is_z_times_p_minus_pi():
    """E_q[(P/q)(e_x − π)] = Z(p − π), through the loss with log Z = 0 (weights P/q), exactly."""
    with jax.enable_x64(True):
        p = _Problem(7)
        y, q = _whole_support(p)
        pi = jax.nn.softmax(p.theta)
        target = jnp.exp(p.log_target - p.log_z[:, None])

        def loss(theta, loss_fn):
            logp = _take(jax.nn.log_softmax(theta), y)
            return loss_fn(logp, p.proposal_logp, p.log_target, log_z=0.0, weights=q)[0]

        # The weighted mean divides by Σ q = B, hence the factor −1/B.
        expected = -jnp.exp(p.log_z)[:, None] * (target - pi) / B
        dpg_grad = jax.grad(loss)(p.theta, dm.dpg)
        gdc_grad = jax.grad(loss)(p.theta, dm.gdc_pp)
        np.testing.assert_allclose(dpg_grad, expected, rtol=1e-10, atol=1e-12)
        # The baseline term Σ_x q (π/q)(e_x − π) has expectation exactly 0.
        np.testing.assert_allclose(gdc_grad - dpg_grad, 0.0, atol=1e-12)


def test_forward_kl_estimate_is_exact_in_expectation_and_proposal_rule():
    with jax.enable_x64(True):
        p = _Problem(8)
        y, q = _whole_support(p)
        logpi = jax.nn.log_softmax(p.theta)
        kl_pi = dm.forward_kl_estimate(logpi, p.proposal_logp, p.log_target, log_z=p.log_z, weights=q)
        kl_q = dm.forward_kl_estimate(p.proposal_logp, p.proposal_logp, p.log_target, log_z=p.log_z, weights=q)
        log_p = np.asarray(p.log_target - p.log_z[:, None])
        exact_pi = np.mean(np.sum(np.exp(log_p) * (log_p - np.asarray(logpi)), axis=-1))
        exact_q = np.mean(np.sum(np.exp(log_p) * (log_p - np.asarray(p.proposal_logp)), axis=-1))
        np.testing.assert_allclose(kl_pi, exact_pi, rtol=1e-10)
        np.testing.assert_allclose(kl_q, exact_q, rtol=1e-10)
        assert bool(dm.should_update_proposal(kl_pi, kl_q)) == (exact_pi < exact_q)
        # The loss reports the same estimate.
        _, metrics = dm.dpg(logpi, p.proposal_logp, p.log_target, log_z=p.log_z, weights=q)
        np.testing.assert_allclose(metrics["kl_target_policy"], exact_pi, rtol=1e-10)
    assert bool(dm.should_update_proposal(0.1, 0.2)) and not bool(dm.should_update_proposal(0.2, 0.2))


def test_running_log_z_is_the_mean_of_all_ratios_so_far():
    rng = np.random.default_rng(9)
    batches = [(rng.normal(size=(2, 3)) * 50, rng.normal(size=(2, 3)) * 50 + 400.0) for _ in range(3)]
    weights = [np.ones((2, 3)), np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), np.full((2, 3), 0.5)]
    state = dm.init_log_z_state()
    seen, seen_w = [], []
    for (proposal_logp, log_target), w in zip(batches, weights):
        state = dm.running_log_z(state, proposal_logp, log_target, weights=w)
        log_z = dm.log_z_estimate(state)
        seen.append(log_target - proposal_logp)
        seen_w.append(w)
        log_ratios, ws = np.concatenate(seen).ravel(), np.concatenate(seen_w).ravel()
        # log(Σ w e^a / Σ w), shifted by the max: the ratios themselves overflow any float.
        m = log_ratios.max()
        expected = m + np.log(np.sum(ws * np.exp(log_ratios - m)) / ws.sum())
        np.testing.assert_allclose(log_z, expected, rtol=1e-5)
    assert np.isfinite(float(log_z)) and float(log_z) > 300
    assert np.isnan(float(dm.log_z_estimate(dm.init_log_z_state())))


def test_prompt_log_z():
    rng = np.random.default_rng(15)
    proposal_logp, log_target = rng.normal(size=(2, 4)) * 30, rng.normal(size=(2, 4)) * 30 + 200.0
    w = np.array([[1.0, 0.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    log_ratio = log_target - proposal_logp
    m = log_ratio.max(axis=1, keepdims=True)
    expected = m[:, 0] + np.log(np.sum(w * np.exp(log_ratio - m), axis=1) / w.sum(axis=1))
    np.testing.assert_allclose(dm.prompt_log_z(proposal_logp, log_target, weights=w), expected, rtol=1e-5)
    with jax.enable_x64(True):  # over the whole support weighted by q it is exact: Σ_x q·P/q = Z
        p = _Problem(16)
        _, q = _whole_support(p)
        np.testing.assert_allclose(dm.prompt_log_z(p.proposal_logp, p.log_target, weights=q), p.log_z, rtol=1e-12)


def test_effective_sample_size_by_hand():
    np.testing.assert_allclose(dm.effective_sample_size(jnp.zeros((2, 2)), jnp.ones((2, 2))), 4.0, rtol=1e-6)
    # ρ = (1, 1, 2): (Σρ)² / Σρ² = 16 / 6.
    log_rho = jnp.log(jnp.array([[1.0, 1.0, 2.0]])) + 500.0
    np.testing.assert_allclose(dm.effective_sample_size(log_rho, jnp.ones((1, 3))), 16 / 6, rtol=1e-5)
    assert float(dm.effective_sample_size(log_rho, jnp.zeros((1, 3)))) == 0.0


# ----------------------------------------------------------------------------------------------
# DPO / IPO / SPPO.


def test_preference_losses_at_the_reference():
    beta = 0.3
    logp = jnp.array([-3.0, -10.0, -0.5])
    rejected = jnp.array([-4.0, -2.0, -7.0])
    dpo_loss, dpo_metrics = pref.dpo(logp, rejected, logp, rejected, beta=beta)
    ipo_loss, _ = pref.ipo(logp, rejected, logp, rejected, beta=beta)
    sppo_loss, _ = pref.sppo_hard(logp, rejected, logp, rejected, beta=beta)
    np.testing.assert_allclose(dpo_loss, math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(ipo_loss, 1 / (4 * beta**2), rtol=1e-6)
    np.testing.assert_allclose(sppo_loss, 1 / (2 * beta**2), rtol=1e-6)
    assert float(dpo_metrics["accuracy"]) == 0.0 and float(dpo_metrics["reward_margin"]) == 0.0


def test_preference_losses_match_numpy_formulas():
    rng = np.random.default_rng(10)
    c, r, rc, rr = (rng.normal(size=6) * 3 for _ in range(4))
    w = rng.uniform(0.1, 2.0, size=6)
    beta = 0.2
    h_w, h_l = c - rc, r - rr
    delta = h_w - h_l
    mean = lambda x: np.sum(w * x) / np.sum(w)  # noqa: E731
    expected = {
        pref.dpo: mean(np.log1p(np.exp(-beta * delta))),
        pref.ipo: mean((delta - 1 / (2 * beta)) ** 2),
        pref.sppo_hard: mean((h_w - 1 / (2 * beta)) ** 2 + (h_l + 1 / (2 * beta)) ** 2),
    }
    for loss_fn, value in expected.items():
        loss, metrics = loss_fn(c, r, rc, rr, beta=beta, weights=w)
        np.testing.assert_allclose(loss, value, rtol=1e-5, err_msg=loss_fn.__name__)
        np.testing.assert_allclose(metrics["reward_margin"], mean(beta * delta), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["chosen_reward"], mean(beta * h_w), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["accuracy"], mean((delta > 0).astype(float)), rtol=1e-6)
    # d/dΔ of −log σ(βΔ) is −β·σ(−βΔ).
    grad = jax.grad(lambda x: pref.dpo(x, r, rc, rr, beta=beta)[0])(jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(grad, -beta / (1 + np.exp(beta * delta)) / 6, rtol=1e-4)


def test_dpo_is_stable_for_huge_margins():
    big = jnp.array([1e4, -1e4])
    loss, _ = pref.dpo(big, -big, jnp.zeros(2), jnp.zeros(2), beta=1.0)
    np.testing.assert_allclose(loss, 1e4, rtol=1e-6)  # mean of 0 and 2e4


# ----------------------------------------------------------------------------------------------
# RAFT and BoNBoN.


def test_best_of_n_sft_gradient_is_sft_on_the_argmax_sample():
    rng = np.random.default_rng(11)
    theta = jnp.asarray(rng.normal(size=(B, K)), jnp.float32)
    y = jnp.asarray(rng.integers(0, K, size=(B, 4)))
    rewards = jnp.asarray(rng.permutation(B * 4).reshape(B, 4), jnp.float32)  # distinct: no ties
    best = np.argmax(np.asarray(rewards), axis=1)

    def raft(th):
        return rs.best_of_n_sft(_take(jax.nn.log_softmax(th), y), rewards, key=_key(0))[0]

    def sft(th):
        return -jnp.mean(jax.nn.log_softmax(th)[jnp.arange(B), y[jnp.arange(B), best]])

    np.testing.assert_allclose(raft(theta), sft(theta), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(raft)(theta), jax.grad(sft)(theta), rtol=1e-6, atol=1e-7)


def test_best_of_n_sft_breaks_ties_uniformly():
    """Frequencies of the chosen index among tied maxima: binomial sd √(p(1−p)/n), 5 sd tolerance."""
    rewards = jnp.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    num = 3000

    @jax.jit
    def chosen(keys, w):
        def one(key):
            grad = jax.grad(lambda lp: rs.best_of_n_sft(lp, rewards, key=key, weights=w)[0])(jnp.zeros((1, 5)))
            return jnp.argmin(grad[0])  # the chosen sample is the only one with gradient −1

        return jax.vmap(one)(keys)

    keys = jax.random.split(_key(12), num)
    padded = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the third tied maximum is padding
    for w, support in ((jnp.ones((1, 5)), [1, 2, 4]), (padded, [1, 2])):
        counts = np.bincount(np.asarray(chosen(keys, w)), minlength=5) / num
        prob = 1 / len(support)
        np.testing.assert_allclose(counts[support], prob, atol=5 * math.sqrt(prob * (1 - prob) / num))
        assert counts[[i for i in range(5) if i not in support]].sum() == 0


def test_bonbon_beta():
    np.testing.assert_allclose(1 / (2 * rs.bonbon_beta(8)), 18.15, rtol=1e-12)
    np.testing.assert_allclose(rs.bonbon_beta(2), 0.5, rtol=1e-12)  # (n−1)·H_1 = 1
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="`n`"):
            rs.bonbon_beta(bad)


def test_bonbon_by_hand():
    logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    ref_logp = jnp.array([[-1.5, -1.0, -2.0], [-1.0, -1.0, -1.0]])
    rewards = jnp.array([[0.3, 2.0, -1.0], [5.0, 1.0, 4.0]])
    alpha, beta = 0.3, rs.bonbon_beta(3)
    best, worst = [1, 0], [2, 1]
    lp, ref = np.asarray(logp), np.asarray(ref_logp)
    sft = -np.mean([lp[0, 1], lp[1, 0]])
    h = lp - ref
    margins = np.array([h[b, best[b]] - h[b, worst[b]] for b in range(2)])
    ipo_value = np.mean((margins - 1 / (2 * beta)) ** 2)
    loss, metrics = rs.bonbon(logp, ref_logp, rewards, alpha=alpha, beta=beta, key=_key(0))
    np.testing.assert_allclose(metrics["sft_loss"], sft, rtol=1e-6)
    np.testing.assert_allclose(metrics["ipo_loss"], ipo_value, rtol=1e-6)
    np.testing.assert_allclose(loss, alpha * sft + (1 - alpha) * ipo_value, rtol=1e-6)
    np.testing.assert_allclose(metrics["margin"], margins.mean(), rtol=1e-6)
    raft, _ = rs.best_of_n_sft(logp, rewards, key=_key(0))
    alpha_one, _ = rs.bonbon(logp, ref_logp, rewards, alpha=1.0, beta=beta, key=_key(0))
    np.testing.assert_allclose(alpha_one, raft, rtol=1e-6)


def test_bonbon_leaves_prompts_without_preference_out_of_ipo():
    logp = jnp.array([[-1.0, -2.0], [-0.5, -1.5]])
    rewards = jnp.array([[1.0, 1.0], [2.0, 0.0]])  # prompt 0: all tied
    _, metrics = rs.bonbon(logp, jnp.zeros((2, 2)), rewards, alpha=0.5, beta=0.25, key=_key(1))
    np.testing.assert_allclose(metrics["ipo_loss"], (-0.5 + 1.5 - 2.0) ** 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Weights: a weight-0 sample (holding garbage) is the same as no sample.

_GROUP_LOSSES = {
    "reinforce": (lambda a, w: pg.reinforce(a["logp"], a["ref"], a["r"], beta=0.4, weights=w)),
    "vbon": (lambda a, w: pg.vbon(a["logp"], a["ref"], -jnp.abs(a["r"]), n=8, weights=w)),
    "dpg": (lambda a, w: dm.dpg(a["logp"], a["q"], a["target"], log_z=jnp.array([0.5, -0.5]), weights=w)),
    "gdc_pp": (lambda a, w: dm.gdc_pp(a["logp"], a["q"], a["target"], log_z=0.3, weights=w)),
    "best_of_n_sft": (lambda a, w: rs.best_of_n_sft(a["logp"], a["r"], key=_key(0), weights=w)),
    "bonbon": (
        lambda a, w: rs.bonbon(a["logp"], a["ref"], a["r"], alpha=0.4, beta=0.2, key=_key(0), weights=w)
    ),
}


def _drop(x: np.ndarray, columns: list[int]) -> np.ndarray:
    return np.stack([np.delete(row, c) for row, c in zip(x, columns)])


@pytest.mark.parametrize("name", list(_GROUP_LOSSES))
def test_weight_zero_is_the_same_as_removing_the_sample(name):
    loss_fn = _GROUP_LOSSES[name]
    rng = np.random.default_rng(13)
    arrays = {
        "logp": -rng.uniform(0.1, 3.0, size=(2, 4)),
        "ref": -rng.uniform(0.1, 3.0, size=(2, 4)),
        "q": -rng.uniform(0.1, 3.0, size=(2, 4)),
        "target": rng.normal(size=(2, 4)),
        "r": rng.permutation(8).reshape(2, 4).astype(float),  # distinct: the tie-break key is unused
    }
    removed = [2, 0]
    garbage = {k: v.copy() for k, v in arrays.items()}
    for b, c in enumerate(removed):
        for k in garbage:
            garbage[k][b, c] = {"logp": np.nan, "r": 1e30, "q": -np.inf}.get(k, np.inf)
    weights = np.ones((2, 4))
    weights[0, 2] = weights[1, 0] = 0.0

    def value_and_grad(a, w):
        def f(logp):
            return loss_fn({**{k: jnp.asarray(v, jnp.float32) for k, v in a.items()}, "logp": logp}, w)

        return jax.value_and_grad(f, has_aux=True)(jnp.asarray(a["logp"], jnp.float32))

    (loss_w, metrics_w), grad_w = value_and_grad(garbage, jnp.asarray(weights, jnp.float32))
    (loss_r, metrics_r), grad_r = value_and_grad({k: _drop(v, removed) for k, v in arrays.items()}, None)
    np.testing.assert_allclose(loss_w, loss_r, rtol=1e-5, atol=1e-6)
    for key in metrics_r:
        np.testing.assert_allclose(metrics_w[key], metrics_r[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Each weighted mean divides by the total weight, 6 in both cases.
    np.testing.assert_allclose(_drop(np.asarray(grad_w), removed), grad_r, rtol=1e-5, atol=1e-7)
    assert grad_w[0, 2] == 0.0 and grad_w[1, 0] == 0.0


@pytest.mark.parametrize("loss_fn", [pref.dpo, pref.ipo, pref.sppo_hard], ids=lambda f: f.__name__)
def test_preference_weight_zero_is_the_same_as_removing_the_pair(loss_fn):
    rng = np.random.default_rng(14)
    args = [rng.normal(size=4) for _ in range(4)]
    garbage = [a.copy() for a in args]
    garbage[0][1], garbage[3][1] = np.nan, -np.inf
    full, grad_full = jax.value_and_grad(lambda c: loss_fn(c, *garbage[1:], beta=0.5, weights=[1, 0, 1, 1])[0])(
        jnp.asarray(garbage[0], jnp.float32)
    )
    kept = [np.delete(a, 1) for a in args]
    part, grad_part = jax.value_and_grad(lambda c: loss_fn(c, *kept[1:], beta=0.5)[0])(jnp.asarray(kept[0], jnp.float32))
    np.testing.assert_allclose(full, part, rtol=1e-6)
    np.testing.assert_allclose(np.delete(np.asarray(grad_full), 1), grad_part, rtol=1e-6)
    assert grad_full[1] == 0.0


# ----------------------------------------------------------------------------------------------
# Property tests: any shape-correct input as extreme as ±1e4 gives finite values and gradients.

_extreme = hnp.arrays(np.float32, (2, 3), elements=st.floats(-1e4, 1e4, width=32))
_moderate = hnp.arrays(np.float32, (2, 3), elements=st.floats(-30, 30, width=32))


def _finite_everywhere(value_and_grad, logp, *rest):
    (loss, metrics), grad = value_and_grad(logp, *rest)
    assert loss.shape == () and grad.shape == logp.shape
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    for key, value in metrics.items():
        assert value.shape == () and np.isfinite(value), key


_EXTREME_LOSSES = {
    "reinforce": lambda lp, ref, r: pg.reinforce(lp, ref, r, beta=0.1),
    "vbon": lambda lp, ref, r: pg.vbon(lp, ref, -jnp.abs(r), n=16),
    "best_of_n_sft": lambda lp, ref, r: rs.best_of_n_sft(lp, r, key=_key(0)),
    "bonbon": lambda lp, ref, r: rs.bonbon(lp, ref, r, alpha=0.5, beta=0.05, key=_key(0)),
    "dpo": lambda lp, ref, r: pref.dpo(lp[0], lp[1], ref[0], ref[1], beta=0.1),
    "ipo": lambda lp, ref, r: pref.ipo(lp[0], lp[1], ref[0], ref[1], beta=0.1),
    "sppo_hard": lambda lp, ref, r: pref.sppo_hard(lp[0], lp[1], ref[0], ref[1], beta=0.1),
}


# Compiled once per loss, not once per example.
_EXTREME_VALUE_AND_GRAD = {
    name: jax.jit(jax.value_and_grad(fn, has_aux=True)) for name, fn in _EXTREME_LOSSES.items()
}


@pytest.mark.parametrize("name", list(_EXTREME_LOSSES))
@settings(max_examples=25, deadline=None)
@given(logp=_extreme, ref_logp=_extreme, rewards=_extreme)
def test_finite_for_extreme_log_probs(name, logp, ref_logp, rewards):
    _finite_everywhere(_EXTREME_VALUE_AND_GRAD[name], logp, ref_logp, rewards)


_DM_VALUE_AND_GRAD = {
    fn.__name__: jax.jit(
        jax.value_and_grad(lambda lp, q, target, log_z, fn=fn: fn(lp, q, target, log_z=log_z), has_aux=True)
    )
    for fn in (dm.dpg, dm.gdc_pp)
}


@pytest.mark.parametrize("name", list(_DM_VALUE_AND_GRAD))
@settings(max_examples=25, deadline=None)
@given(proposal_logp=_extreme, log_z=st.floats(-1e4, 1e4, width=32), d_target=_moderate, d_policy=_moderate)
def test_distribution_matching_finite_for_extreme_log_probs(name, proposal_logp, log_z, d_target, d_policy):
    """Extreme log-probs whose ratios p/q and π/q are representable (|log ratio| <= 30).

    Computing P and q separately would give 0/0 or inf/inf here; the log-space ratio is finite.
    """
    log_target = proposal_logp + np.float32(log_z) + d_target
    logp = proposal_logp + d_policy
    _finite_everywhere(_DM_VALUE_AND_GRAD[name], logp, proposal_logp, log_target, np.float32(log_z))


# ----------------------------------------------------------------------------------------------
# Bad input.

_G = np.zeros((2, 3))
_G_BAD = np.zeros((2, 4))
_P = np.zeros(3)

_BAD_CALLS = [
    (lambda: pg.reinforce(_G, _G, _G_BAD, beta=0.1), "`rewards`"),
    (lambda: pg.reinforce(_P, _G, _G, beta=0.1), "`logp`"),
    (lambda: pg.reinforce(_G, _G, _G, beta=0.1, weights=_P), "`weights`"),
    (lambda: pg.reinforce(_G, _G, _G, beta=-1.0), "`beta`"),
    (lambda: pg.vbon(_G, _G, _G_BAD, n=4), "`log_quantile`"),
    (lambda: pg.vbon(_G, _G, _G, n=0.5), "`n`"),
    (lambda: pref.dpo(_G, _P, _P, _P, beta=0.1), "`chosen_logp`"),
    (lambda: pref.ipo(_P, _P, np.zeros(4), _P, beta=0.1), "`ref_chosen_logp`"),
    (lambda: pref.sppo_hard(_P, _P, _P, _P, beta=0.0), "`beta`"),
    (lambda: dm.dpg(_G, _G_BAD, _G, log_z=0.0), "`proposal_logp`"),
    (lambda: dm.gdc_pp(_G, _G, _G, log_z=np.zeros(3)), "`log_z`"),
    (lambda: dm.forward_kl_estimate(_P, _G, _G, log_z=0.0), "`model_logp`"),
    (lambda: dm.running_log_z(dm.init_log_z_state(), _G, _G_BAD), "`log_target`"),
    (lambda: dm.prompt_log_z(_P, _G), "`proposal_logp`"),
    (lambda: rs.best_of_n_sft(_G, _P, key=_key(0)), "`rewards`"),
    (lambda: rs.bonbon(_G, _G, _G, alpha=1.5, beta=0.1, key=_key(0)), "`alpha`"),
    (lambda: rs.bonbon(_G, _G_BAD, _G, alpha=0.5, beta=0.1, key=_key(0)), "`ref_logp`"),
]


@pytest.mark.parametrize("call, name", _BAD_CALLS, ids=[f"{i}-{n}" for i, (_, n) in enumerate(_BAD_CALLS)])
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_swept_hyperparameters_can_be_traced():
    """β, n and α enter as traced arrays: one compile serves a whole sweep."""
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    f = jax.jit(lambda beta, n, alpha: (
        pg.reinforce(logp, logp * 0.5, logp, beta=beta)[0]
        + pg.vbon(logp, logp * 0.5, logp, n=n)[0]
        + rs.bonbon(logp, logp * 0.5, -logp, alpha=alpha, beta=beta, key=_key(0))[0]
        + pref.ipo(logp[0], logp[0] - 1, logp[0], logp[0], beta=beta)[0]
    ))
    assert np.isfinite(f(0.1, 4.0, 0.5)) and np.isfinite(f(0.2, 8.0, 0.1))
