"""BOND, Jeffreys BOND and J-BOND losses against exact gradients on a finite support.

A softmax policy π_θ = softmax(θ) over K responses of one prompt. Each loss is checked two ways:
its expected gradient, summed exactly over every joint draw of its samples (bond.tabular.
exact_expectation), equals the exact gradient of the objective it names (no Monte-Carlo error,
float64); and its sample-averaged gradient with a fixed seed matches within the variance-derived
tolerance of tests/gradient_checks.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond import bon, tabular
from bond.losses.distillation import bond_backward_kl, bond_forward_kl, j_bond, j_bond_reward, jeffreys_bond
from gradient_checks import assert_mc_gradient_matches

K = 5


def problem(seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=K))
    ref_log_probs = jax.nn.log_softmax(jnp.asarray(rng.normal(size=K)))
    rewards = jnp.asarray(rng.normal(size=K))
    log_p_le = jnp.log(bon.reward_quantiles(jnp.exp(ref_log_probs), rewards).p_le)
    return logits, ref_log_probs, rewards, log_p_le


def backward_grad(logits, ref_lp, log_q, n, idx):
    """Gradient of bond_backward_kl for sample indices idx [B, S]."""

    def loss(theta):
        lp = jax.nn.log_softmax(theta)
        return bond_backward_kl(lp[idx], ref_lp[idx], log_q[idx], n=n)[0]

    return jax.grad(loss)(logits)


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_backward_kl_expected_gradient_is_exact(samples):
    with jax.enable_x64(True):
        logits, ref_lp, _, log_q = problem()
        n = 4.0
        exact = jax.grad(lambda t: tabular.bond_backward_objective(t, ref_lp, log_q, n=n))(logits)
        expected = tabular.exact_expectation(
            lambda idx: backward_grad(logits, ref_lp, log_q, n, idx[None]), [(jax.nn.softmax(logits), samples)]
        )
        np.testing.assert_allclose(expected, exact, atol=1e-12)


def test_backward_kl_monte_carlo_matches_exact_gradient():
    logits, ref_lp, _, log_q = problem(1)
    n = 8.0
    pi = jax.nn.softmax(logits)
    exact = jax.grad(lambda t: tabular.bond_backward_objective(t, ref_lp, log_q, n=n))(logits)

    def estimate(key):
        idx = jax.random.categorical(key, jnp.log(pi), shape=(8, 4))
        return backward_grad(logits, ref_lp, log_q, n, idx)

    se = assert_mc_gradient_matches(estimate, exact, jax.random.PRNGKey(0), num_batches=1000)
    # Power: the tolerance is far below the gradient, so a 2× wrong estimator would fail.
    assert 5 * np.max(se) < 0.1 * np.linalg.norm(exact)


def test_leave_one_out_baseline_lowers_variance():
    """A baseline pays off when the mean cost is large against its spread; shifting every cost by a
    constant (π_ref putting mass outside these K responses) leaves the gradient unchanged."""
    logits, ref_lp, _, log_q = problem(2)
    ref_lp = ref_lp - 5.0
    n = 4.0
    idx = jax.random.categorical(jax.random.PRNGKey(1), logits, shape=(500, 1, 4))
    with_baseline = jax.vmap(lambda i: backward_grad(logits, ref_lp, log_q, n, i))(idx)
    # Same samples, each prompt's samples as groups of one: no baseline.
    no_baseline = jax.vmap(lambda i: backward_grad(logits, ref_lp, log_q, n, i.reshape(4, 1)))(idx)
    assert np.sum(np.var(with_baseline, axis=0)) < 0.5 * np.sum(np.var(no_baseline, axis=0))


def test_forward_kl_gradient_is_sft_on_target():
    with jax.enable_x64(True):
        logits, ref_lp, rewards, _ = problem(3)
        target = bon.bon_probs(jnp.exp(ref_lp), rewards, 4)
        exact = jax.grad(lambda t: tabular.forward_kl_objective(t, target))(logits)
        # With weights = target probabilities over the whole support the weighted mean is the expectation.
        full = jax.grad(lambda t: bond_forward_kl(jax.nn.log_softmax(t), weights=target)[0])(logits)
        np.testing.assert_allclose(full, exact, atol=1e-12)
    idx_key = jax.random.PRNGKey(2)

    def estimate(key):
        idx = jax.random.categorical(key, jnp.log(target.astype(jnp.float32)), shape=(16,))
        return jax.grad(lambda t: bond_forward_kl(jax.nn.log_softmax(t)[idx])[0])(logits.astype(jnp.float32))

    assert_mc_gradient_matches(estimate, exact, idx_key, num_batches=1000)


def test_jeffreys_mixes_forward_and_backward():
    with jax.enable_x64(True):
        logits, ref_lp, rewards, log_q = problem(4)
        n, beta = 4.0, 0.3
        target = bon.bon_probs(jnp.exp(ref_lp), rewards, n)
        pi = jax.nn.softmax(logits)

        def grad_for(policy_idx, bon_idx):
            def loss(theta):
                lp = jax.nn.log_softmax(theta)
                return jeffreys_bond(
                    lp[policy_idx][None], ref_lp[policy_idx][None], log_q[policy_idx][None], lp[bon_idx], n=n, beta=beta
                )[0]

            return jax.grad(loss)(logits)

        expected = tabular.exact_expectation(grad_for, [(pi, 2), (target, 1)])
        exact = jax.grad(lambda t: tabular.jeffreys_bond_objective(t, ref_lp, log_q, target, n=n, beta=beta))(logits)
        np.testing.assert_allclose(expected, exact, atol=1e-12)


def test_jeffreys_endpoints():
    rng = np.random.default_rng(5)
    logp, ref, lq = (jnp.asarray(rng.normal(size=(3, 4))) for _ in range(3))
    bon_logp = jnp.asarray(rng.normal(size=3))
    fwd = bond_forward_kl(bon_logp)[0]
    bwd = bond_backward_kl(logp, ref, lq, n=4)[0]
    np.testing.assert_allclose(jeffreys_bond(logp, ref, lq, bon_logp, n=4, beta=0.0)[0], fwd, rtol=1e-6)
    np.testing.assert_allclose(jeffreys_bond(logp, ref, lq, bon_logp, n=4, beta=1.0)[0], bwd, rtol=1e-6)


def test_j_bond_reward_is_strict():
    rewards = jnp.array([[0.0], [1.0], [2.0], [1.0]])
    anchors = jnp.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(j_bond_reward(rewards, anchors)[:, 0], [-np.log(16.0), 0.0, 0.0, 0.0])


def j_bond_grad(logits, anchor_lp, rewards, beta, gamma, policy_idx, anchor_idx):
    """Gradient of j_bond for B prompts: policy_idx [B], anchor_idx [2B] (two anchor samples per prompt)."""
    pairs = anchor_idx.reshape(-1, 2)
    # Distinct rewards here, so the better anchor sample is unique.
    better = jnp.where(rewards[pairs[:, 0]] > rewards[pairs[:, 1]], pairs[:, 0], pairs[:, 1])

    def loss(theta):
        lp = jax.nn.log_softmax(theta)
        return j_bond(
            lp[policy_idx][:, None], anchor_lp[policy_idx][:, None], rewards[policy_idx][:, None], rewards[pairs],
            lp[better], beta=beta, gamma=gamma,
        )[0]

    return jax.grad(loss)(logits)


@pytest.mark.parametrize("beta, gamma", [(0.5, 0.0), (0.5, 1.0), (0.2, 2.0)])
def test_j_bond_expected_gradient_is_exact(beta, gamma):
    """Two prompts with one policy sample each (batch leave-one-out baseline) and two anchor samples."""
    with jax.enable_x64(True):
        logits, anchor_lp, rewards, _ = problem(6)
        pi, anchor = jax.nn.softmax(logits), jnp.exp(anchor_lp)
        expected = tabular.exact_expectation(
            lambda p, a: j_bond_grad(logits, anchor_lp, rewards, beta, gamma, p, a), [(pi, 2), (anchor, 4)]
        )
        exact = jax.grad(lambda t: tabular.j_bond_objective(t, anchor_lp, rewards, beta=beta, gamma=gamma))(logits)
        np.testing.assert_allclose(expected, exact, atol=1e-12)


def test_j_bond_monte_carlo_matches_exact_gradient():
    logits, anchor_lp, rewards, _ = problem(7)
    beta, gamma = 0.5, 0.5
    exact = jax.grad(lambda t: tabular.j_bond_objective(t, anchor_lp, rewards, beta=beta, gamma=gamma))(logits)

    def estimate(key):
        k1, k2 = jax.random.split(key)
        policy_idx = jax.random.categorical(k1, logits, shape=(16,))
        anchor_idx = jax.random.categorical(k2, anchor_lp, shape=(32,))
        return j_bond_grad(logits, anchor_lp, rewards, beta, gamma, policy_idx, anchor_idx)

    se = assert_mc_gradient_matches(estimate, exact, jax.random.PRNGKey(3), num_batches=1000)
    assert 5 * np.max(se) < 0.2 * np.linalg.norm(exact)


def test_j_bond_regularizer_lowers_kl_to_anchor():
    """The γ term's expected gradient is +∇KL(π‖π_anchor), so a small step along −gradient lowers that KL."""
    with jax.enable_x64(True):
        logits, anchor_lp, rewards, _ = problem(8)
        pi, anchor = jax.nn.softmax(logits), jnp.exp(anchor_lp)

        def expected_grad(gamma):
            return tabular.exact_expectation(
                lambda p, a: j_bond_grad(logits, anchor_lp, rewards, 0.5, gamma, p, a), [(pi, 2), (anchor, 4)]
            )

        regularizer_grad = expected_grad(1.0) - expected_grad(0.0)
        kl_to_anchor = lambda t: bon.kl_divergence_from_logs(jax.nn.log_softmax(t), anchor_lp)
        np.testing.assert_allclose(regularizer_grad, jax.grad(kl_to_anchor)(logits), atol=1e-12)
        assert kl_to_anchor(logits - 0.1 * regularizer_grad) < kl_to_anchor(logits)


def test_weight_zero_is_the_same_as_removal():
    rng = np.random.default_rng(9)
    logp, ref, lq = (jnp.asarray(rng.normal(size=(2, 4))) for _ in range(3))
    weights = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])
    keep = jnp.array([0, 1, 3])
    grad_w = jax.grad(lambda x: bond_backward_kl(x, ref, lq, n=4, weights=weights)[0])(logp)
    grad_removed_1 = jax.grad(lambda x: bond_backward_kl(x[1:, keep], ref[1:, keep], lq[1:, keep], n=4)[0])(logp)
    grad_removed_0 = jax.grad(lambda x: bond_backward_kl(x[:1], ref[:1], lq[:1], n=4)[0])(logp)
    # Weighted mean over 7 samples = (4·mean_0 + 3·mean_1)/7.
    np.testing.assert_allclose(grad_w, (4 * grad_removed_0 + 3 * grad_removed_1) / 7, atol=1e-6)
    assert float(grad_w[1, 2]) == 0.0


def test_shape_errors_name_the_argument():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="ref_logp"):
        bond_backward_kl(x, jnp.zeros((2, 4)), x, n=4)
    with pytest.raises(ValueError, match="anchor_rewards"):
        j_bond(x, x, x, jnp.zeros((2, 3)), jnp.zeros(2), beta=0.5, gamma=0.0)
    with pytest.raises(ValueError, match="bo2_logp"):
        j_bond(x, x, x, jnp.zeros((2, 2)), jnp.zeros(3), beta=0.5, gamma=0.0)
    with pytest.raises(ValueError, match="weights"):
        bond_backward_kl(x, x, x, n=4, weights=jnp.ones(3))
