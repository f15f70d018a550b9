"""WIND losses and the exact finite-support game (bond.losses.wind, bond.tabular)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import bon, tabular
from bond.losses.wind import leave_one_out_win_rate, wind, wind_coefficients
from gradient_checks import assert_mc_gradient_matches

K = 6


def game(seed=0, k=K):
    rng = np.random.default_rng(seed)
    log_pi_t = jax.nn.log_softmax(jnp.asarray(rng.normal(size=k)))
    log_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=k)))
    rewards = jnp.asarray(rng.normal(size=k))
    pref = (rewards[:, None] > rewards[None, :]) + 0.5 * (rewards[:, None] == rewards[None, :])
    return log_pi_t, log_ref, pref.astype(log_pi_t.dtype)


def full_support_loss(log_pi_t, log_ref, pref, eta, beta, variant):
    """The loss with the whole support as one group and weights π_t: the exact expected loss."""

    def loss(theta):
        lp = jax.nn.log_softmax(theta)
        return wind(
            lp[None], log_pi_t[None], log_ref[None], pref[None], eta=eta, beta=beta, variant=variant,
            weights=jnp.exp(log_pi_t)[None],
        )[0]

    return loss


def minimize(loss, theta0, steps=40):
    """Newton's method (least-squares steps: the softmax leaves one direction flat), jitted."""

    def newton_step(_, theta):
        return theta - jnp.linalg.lstsq(jax.hessian(loss)(theta), jax.grad(loss)(theta))[0]

    return jax.nn.log_softmax(jax.jit(lambda t: jax.lax.fori_loop(0, steps, newton_step, t))(theta0))


def test_wind_step_maximizes_its_objective():
    with jax.enable_x64(True):
        log_pi_t, log_ref, pref = game()
        eta, beta = 0.7, 0.3
        w = tabular.win_rates_against(pref, jnp.exp(log_pi_t))

        def objective(theta):
            lp = jax.nn.log_softmax(theta)
            pi = jnp.exp(lp)
            return (
                jnp.sum(pi * w)
                - beta * bon.kl_divergence_from_logs(lp, log_ref)
                - bon.kl_divergence_from_logs(lp, log_pi_t) / eta
            )

        step = tabular.wind_step(log_pi_t, log_ref, pref, eta=eta, beta=beta)
        np.testing.assert_allclose(jax.grad(objective)(step), 0.0, atol=1e-12)
        # A perturbation does worse.
        assert objective(step) > objective(step + 0.01 * jnp.arange(K))


@pytest.mark.parametrize("eta, beta", [(0.7, 0.3), (2.0, 0.05)])
def test_square_minimizer_is_the_exact_step(eta, beta):
    with jax.enable_x64(True):
        log_pi_t, log_ref, pref = game(1)
        step = tabular.wind_step(log_pi_t, log_ref, pref, eta=eta, beta=beta)
        loss = full_support_loss(log_pi_t, log_ref, pref, eta, beta, "square")
        np.testing.assert_allclose(jax.grad(loss)(step), 0.0, atol=1e-12)
        np.testing.assert_allclose(minimize(loss, log_pi_t), step, atol=1e-6)
        # The right κ matters: doubling η in the loss misses the step.
        wrong = minimize(full_support_loss(log_pi_t, log_ref, pref, 2 * eta, beta, "square"), log_pi_t)
        assert np.max(np.abs(wrong - step)) > 1e-2


def test_kl_minimizer_is_the_documented_target():
    with jax.enable_x64(True):
        log_pi_t, log_ref, pref = game(2)
        eta, beta = 0.5, 0.4
        rho, kappa = wind_coefficients(eta, beta)
        win_hat = leave_one_out_win_rate(pref[None], jnp.exp(log_pi_t)[None])[0]
        target = jax.nn.log_softmax(log_pi_t + rho * (log_ref - log_pi_t) + kappa * win_hat)
        loss = full_support_loss(log_pi_t, log_ref, pref, eta, beta, "kl")
        np.testing.assert_allclose(minimize(loss, log_pi_t), target, atol=1e-6)


def test_sppo_minimizer_matches_to_first_order():
    """'sppo' drops log Z_t to first order: its minimizer's distance to the 'kl' target (the same
    step with the same Ŵ) is second order in η, shrinking about 4× when η halves. Game 3 has
    π_t far from π_ref (log-ratios near 5), where the second-order term is largest."""
    with jax.enable_x64(True):
        log_pi_t, log_ref, pref = game(3)
        beta = 0.3
        errors = []
        for eta in (0.4, 0.2, 0.1, 0.05):
            kl_min = minimize(full_support_loss(log_pi_t, log_ref, pref, eta, beta, "kl"), log_pi_t)
            sppo_min = minimize(full_support_loss(log_pi_t, log_ref, pref, eta, beta, "sppo"), log_pi_t)
            errors.append(float(jnp.max(jnp.abs(sppo_min - kl_min))))
        assert all(later < earlier / 3.5 for earlier, later in zip(errors, errors[1:])), errors
        assert errors[-1] < 0.01, errors


def test_leave_one_out_win_rate():
    pref = jnp.array([[[0.5, 1.0, 0.0], [0.0, 0.5, 0.25], [1.0, 0.75, 0.5]]])
    w = jnp.array([[1.0, 1.0, 2.0]])
    np.testing.assert_allclose(leave_one_out_win_rate(pref, w), [[(1.0 + 0.0) / 3, (0.0 + 0.5) / 3, (1.0 + 0.75) / 2]])
    np.testing.assert_allclose(leave_one_out_win_rate(pref[:, :1, :1], w[:, :1]), [[0.5]])


def sampled_grad(log_pi_t, log_ref, pref, eta, beta, variant, logits, idx):
    def loss(theta):
        lp = jax.nn.log_softmax(theta)
        return wind(
            lp[idx], log_pi_t[idx], log_ref[idx], pref[idx[..., :, None], idx[..., None, :]],
            eta=eta, beta=beta, variant=variant,
        )[0]

    return jax.grad(loss)(logits)


def test_square_expected_gradient_is_population_gradient():
    """Two samples per prompt: the expected gradient equals ∇E_{i.i.d. pairs}[residual²], which is
    (1 − Σπ_t²) times the gradient of the full-support loss (that one conditions on i ≠ j)."""
    with jax.enable_x64(True):
        log_pi_t, log_ref, pref = game(4)
        eta, beta = 0.5, 0.2
        logits = log_pi_t + 0.3 * jnp.arange(K) / K  # away from the minimizer
        pi_t = jnp.exp(log_pi_t)
        expected = tabular.exact_expectation(
            lambda idx: sampled_grad(log_pi_t, log_ref, pref, eta, beta, "square", logits, idx[None]), [(pi_t, 2)]
        )
        population = jax.grad(full_support_loss(log_pi_t, log_ref, pref, eta, beta, "square"))(logits)
        np.testing.assert_allclose(expected, (1 - jnp.sum(pi_t**2)) * population, atol=1e-12)


@pytest.mark.parametrize("variant", ["square", "sppo", "kl"])
def test_monte_carlo_gradient_matches_exact_expectation(variant):
    """Sampled gradients (fixed seed) against the expected gradient summed over every draw of S = 3."""
    log_pi_t, log_ref, pref = game(5, k=4)
    eta, beta = 0.5, 0.2
    logits = log_pi_t + 0.5 * jnp.arange(4) / 4
    with jax.enable_x64(True):
        exact = tabular.exact_expectation(
            lambda idx: sampled_grad(log_pi_t, log_ref, pref, eta, beta, variant, logits, idx[None]),
            [(jnp.exp(log_pi_t), 3)],
        )

    def estimate(key):
        idx = jax.random.categorical(key, log_pi_t, shape=(8, 3))
        return sampled_grad(log_pi_t, log_ref, pref, eta, beta, variant, logits, idx)

    assert_mc_gradient_matches(estimate, exact, jax.random.PRNGKey(0), num_batches=1000)


def test_wind_equilibrium_is_a_fixed_point():
    with jax.enable_x64(True):
        _, log_ref, pref = game(6)
        beta = 0.5
        eq = tabular.wind_equilibrium(log_ref, pref, beta=beta)
        assert float(tabular.equilibrium_residual(eq, log_ref, pref, beta=beta)) < 1e-10
        np.testing.assert_allclose(tabular.wind_step(eq, log_ref, pref, eta=0.3, beta=beta), eq, atol=1e-10)


def test_iterated_bon_is_bon_of_the_power():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        ref = rng.dirichlet(np.ones(12))
        rewards = rng.integers(0, 5, size=12).astype(np.float64)
        np.testing.assert_allclose(
            tabular.iterated_bon_probs(ref, rewards, 2, rounds=3), bon.bon_probs(ref, rewards, 8), atol=1e-12
        )


@pytest.mark.parametrize("variant", ["square", "sppo", "kl"])
def test_weight_zero_changes_nothing(variant):
    rng = np.random.default_rng(8)
    logp, logp_t, ref = (jnp.asarray(rng.normal(size=(1, 4))) for _ in range(3))
    pref = jnp.asarray(rng.uniform(size=(1, 4, 4)))
    pref = (pref + 1 - jnp.swapaxes(pref, 1, 2)) / 2
    weights = jnp.array([[1.0, 0.0, 1.0, 1.0]])
    keep = jnp.array([0, 2, 3])
    full = wind(logp, logp_t, ref, pref, eta=0.5, beta=0.1, variant=variant, weights=weights)[0]
    removed = wind(
        logp[:, keep], logp_t[:, keep], ref[:, keep], pref[:, keep][:, :, keep], eta=0.5, beta=0.1, variant=variant
    )[0]
    np.testing.assert_allclose(full, removed, rtol=1e-6)


def test_bad_inputs():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="variant"):
        wind(x, x, x, jnp.zeros((2, 3, 3)), eta=1.0, beta=0.1, variant="hinge")
    with pytest.raises(ValueError, match="pref"):
        wind(x, x, x, jnp.zeros((2, 3, 2)), eta=1.0, beta=0.1, variant="square")


def _compositions(total: int, parts: int):
    """Every (n_1, ..., n_parts) of non-negative integers summing to `total`."""
    for cuts in itertools.combinations(range(total + parts - 1), parts - 1):
        bounds = (-1, *cuts, total + parts - 1)
        yield tuple(b - a - 1 for a, b in zip(bounds, bounds[1:]))


def kl_expected_target(log_pi_t, log_ref, pref, eta, beta, group, exact_win_rate=False):
    """E[Σ_i ŵ_i·1[y_i = y]] over `group` i.i.d. draws of π_t: the minimizer of the 'kl' loss's
    expected value (it is linear in log π_θ). ŵ_i = −∂loss/∂log π_θ(y_i) of `wind` itself, or, with
    `exact_win_rate`, the same softmax with the exact W_{π_t} in place of Ŵ. Summed over the
    multisets of draws (multinomial counts), so S = 16 costs 153 terms for 3 responses."""
    k = log_pi_t.shape[-1]
    rho, kappa = wind_coefficients(eta, beta)
    exact_w = tabular.win_rates_against(pref, jnp.exp(log_pi_t))
    counts = list(_compositions(group, k))
    ids = jnp.asarray([[y for y, n in enumerate(c) for _ in range(n)] for c in counts])
    log_multinomial = jnp.asarray([math.lgamma(group + 1) - sum(math.lgamma(n + 1) for n in c) for c in counts])
    log_prob = log_multinomial + jnp.sum(log_pi_t[ids], axis=-1)

    def weights(idx):
        lt, lr, pr = log_pi_t[idx][None], log_ref[idx][None], pref[idx][:, idx][None]
        if exact_win_rate:
            return jax.nn.softmax(rho * (lr - lt) + kappa * exact_w[idx][None], axis=-1)[0]
        return -jax.grad(lambda lp: wind(lp, lt, lr, pr, eta=eta, beta=beta, variant="kl")[0])(jnp.zeros((1, group)))[0]

    w = jax.vmap(weights)(ids)
    return jnp.einsum("c,cs,csk->k", jnp.exp(log_prob), w, jax.nn.one_hot(ids, k))


def test_kl_bias_comes_from_normalizing_within_the_group():
    """The 'kl' loss's expected minimizer misses the exact step by O(1/S): with the exact W in place
    of Ŵ the total variation halves each time S doubles (self-normalized importance weights), and
    it is no smaller than with Ŵ, so the bias is the normalization's, not the estimate's (the
    numbers in bond/losses/wind.py's docstring)."""
    with jax.enable_x64(True):
        log_pi_t, log_ref, pref = game(0, k=3)
        eta, beta = 1.0, 0.2
        step = jnp.exp(tabular.wind_step(log_pi_t, log_ref, pref, eta=eta, beta=beta))
        tv = {}
        for exact in (False, True):
            for group in (4, 8, 16):
                target = kl_expected_target(log_pi_t, log_ref, pref, eta, beta, group, exact_win_rate=exact)
                np.testing.assert_allclose(jnp.sum(target), 1.0, atol=1e-12)
                tv[exact, group] = float(0.5 * jnp.sum(jnp.abs(target - step)))
        for group in (4, 8):
            assert 0.4 < tv[True, 2 * group] / tv[True, group] < 0.6, tv
            assert tv[False, 2 * group] < tv[False, group], tv
        for group in (4, 8, 16):
            assert tv[True, group] >= tv[False, group] > 0, tv
