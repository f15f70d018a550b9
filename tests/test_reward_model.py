"""Tests of bond.models.reward and the preferences of rewards: reward-model scores, the RewardFn of a
reward model, Bradley-Terry loss, preference matrices of a reward and of an inconsistent judge."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bond.models import (
    Responses,
    TransformerConfig,
    bradley_terry_loss,
    init_reward_params,
    preference_matrix,
    preferences_from_rewards,
    reward_model_fn,
    reward_model_scores,
    reward_param_logical_axes,
)
from bond.models.preference import reward_judge

TINY = TransformerConfig(vocab_size=16, num_layers=1, d_model=32, num_heads=4, d_ff=64, max_len=16)


@pytest.fixture(scope="module")
def params():
    return init_reward_params(TINY, jax.random.key(0))


def test_bradley_terry_loss_closed_form():
    chosen, rejected = jnp.array([1.0, 0.0, -2.0]), jnp.array([0.0, 0.0, 1.0])
    # -log sigmoid(m) = log(1 + exp(-m)) for margins m = 1, 0, -3.
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0) + math.log1p(math.exp(3.0))) / 3
    loss, metrics = jax.jit(bradley_terry_loss)(chosen, rejected)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 1 / 3)
    np.testing.assert_allclose(metrics["margin"], -2 / 3, rtol=1e-6)
    # d loss / d r_c = -sigmoid(-m) / n.
    grad = jax.jit(jax.grad(lambda c: bradley_terry_loss(c, rejected)[0]))(chosen)
    np.testing.assert_allclose(grad, -jax.nn.sigmoid(-(chosen - rejected)) / 3, rtol=1e-6)
    weighted, _ = jax.jit(bradley_terry_loss)(chosen, rejected, jnp.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(weighted, (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(3.0))) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(chosen, rejected[:2])


def test_score_is_read_at_the_last_real_token(params):
    tokens = jnp.array([[0, 0, 3, 4, 5, 6, 0, 0], [1, 2, 3, 4, 5, 6, 7, 0]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], jnp.int32)
    scores = reward_model_scores(params, tokens, mask, model=TINY)
    assert scores.shape == (2,) and scores.dtype == jnp.float32
    # Its RewardFn reads the same score from Responses (the response mask does not enter).
    np.testing.assert_array_equal(reward_model_fn(TINY)(params, Responses(tokens, mask, jnp.zeros_like(mask))), scores)
    # Tokens outside the mask (left pads and anything after the last real token) do not matter.
    changed = tokens.at[0, 0].set(7).at[0, 7].set(2).at[1, 7].set(5)
    np.testing.assert_allclose(reward_model_scores(params, changed, mask, model=TINY), scores, atol=1e-6)
    # The same real tokens without padding give the same score.
    unpadded = jnp.array([[3, 4, 5, 6, 1, 1, 1, 1]], jnp.int32)
    unpadded_mask = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_allclose(reward_model_scores(params, jnp.concatenate([unpadded, tokens[1:]]),
                                                   jnp.concatenate([unpadded_mask, mask[1:]]), model=TINY),
                               scores, atol=1e-5)
    # A real token that changes does change the score.
    assert not np.allclose(reward_model_scores(params, tokens.at[0, 5].set(1), mask, model=TINY)[0], scores[0])


def test_reward_param_axes_match_params(params):
    axes = reward_param_logical_axes(TINY)
    assert jax.tree_util.tree_structure(axes) == jax.tree_util.tree_structure(params)
    assert set(params) == {"transformer", "head"}
    assert "lm_head" not in params["transformer"]


def test_bradley_terry_training_separates_pairs(params):
    # Chosen responses are made of even tokens, rejected of odd ones: a separable preference.
    keys = jax.random.split(jax.random.key(1), 3)
    prompts = jax.random.randint(keys[0], (32, 4), 1, TINY.vocab_size)
    chosen = jnp.concatenate([prompts, 2 * jax.random.randint(keys[1], (32, 4), 1, 8)], axis=1)
    rejected = jnp.concatenate([prompts, 2 * jax.random.randint(keys[2], (32, 4), 0, 8) + 1], axis=1)
    both = jnp.concatenate([chosen, rejected])
    optimizer = optax.adam(3e-3)

    def loss_fn(p):
        scores = reward_model_scores(p, both, jnp.ones_like(both), model=TINY)
        return bradley_terry_loss(scores[:32], scores[32:])

    @jax.jit
    def train_step(p, opt_state):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, metrics

    p, opt_state = params, optimizer.init(params)
    _, _, first_loss, first = train_step(p, opt_state)
    for _ in range(30):
        p, opt_state, loss, metrics = train_step(p, opt_state)
    assert loss < 0.5 * first_loss
    assert metrics["accuracy"] > max(first["accuracy"], 0.9)


def test_preferences_from_rewards_closed_forms():
    preferences = jax.jit(preferences_from_rewards, static_argnames="kind")
    rewards = jnp.array([[1.0, 2.0, 1.0, -1.0]])
    hard = preferences(rewards, kind="hard")
    np.testing.assert_array_equal(hard[0], [[0.5, 0.0, 0.5, 1.0],
                                            [1.0, 0.5, 1.0, 1.0],
                                            [0.5, 0.0, 0.5, 1.0],
                                            [0.0, 0.0, 0.0, 0.5]])
    soft = preferences(rewards, kind="bradley_terry")
    np.testing.assert_allclose(soft[0, 1, 3], 1 / (1 + math.exp(-3.0)), rtol=1e-6)
    random_rewards = np.random.default_rng(0).normal(size=(3, 5)).round(1)  # rounding makes ties
    for kind in ("hard", "bradley_terry"):
        prefs = np.asarray(preferences(random_rewards, kind=kind))
        np.testing.assert_allclose(prefs + np.swapaxes(prefs, 1, 2), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.diagonal(prefs, axis1=1, axis2=2), 0.5)
    with pytest.raises(ValueError, match="kind"):
        preferences_from_rewards(rewards, kind="soft")
    with pytest.raises(ValueError, match="rewards"):
        preferences_from_rewards(rewards[0])


def fraction_even(params, responses):
    """A programmatic RewardFn: fraction of even ids among the counted response tokens."""
    del params
    even = (responses.tokens % 2 == 0).astype(jnp.float32)
    counted = responses.response_mask
    return jnp.sum(even * counted, axis=-1) / jnp.maximum(jnp.sum(counted, axis=-1), 1.0)


def _groups(tokens, response_mask):
    """Responses [B, S, T] whose attention mask is 1 wherever a token is real (here: everywhere)."""
    return Responses(jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens)), jnp.asarray(response_mask))


@pytest.mark.parametrize("kind", ["hard", "bradley_terry"])
def test_programmatic_reward_through_the_preference_matrix(kind):
    tokens = np.random.default_rng(3).integers(0, 8, size=(2, 4, 6))
    response_mask = np.zeros((2, 4, 6), np.float32)
    response_mask[:, :, 2:] = 1.0
    judge = reward_judge(fraction_even, kind)
    prefs = jax.jit(preference_matrix, static_argnums=0)(judge, None, _groups(tokens, response_mask))
    rewards = (tokens[:, :, 2:] % 2 == 0).mean(axis=-1)
    assert len(np.unique(rewards)) < rewards.size, "precondition: some rewards tie"
    difference = rewards[:, :, None] - rewards[:, None, :]
    if kind == "hard":
        expected = (difference > 0) + 0.5 * (difference == 0)
    else:
        expected = 1 / (1 + np.exp(-difference))
    np.testing.assert_allclose(prefs, expected, atol=1e-6)
    np.testing.assert_allclose(prefs, preferences_from_rewards(rewards, kind), atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        reward_judge(fraction_even, "soft")


def test_preference_matrix_antisymmetrises_an_inconsistent_judge():
    def biased_judge(params, a, b):  # prefers a by +0.2 whatever the order
        return jnp.clip(jax.nn.sigmoid(fraction_even(params, a) - fraction_even(params, b)) + 0.2, 0, 1)

    groups = _groups(np.random.default_rng(4).integers(0, 8, size=(1, 3, 5)), np.ones((1, 3, 5)))
    prefs = np.asarray(jax.jit(preference_matrix, static_argnums=0)(biased_judge, None, groups))
    np.testing.assert_allclose(prefs + np.swapaxes(prefs, 1, 2), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diagonal(prefs, axis1=1, axis2=2), 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="one probability per pair"):
        preference_matrix(lambda params, a, b: jnp.zeros(2), None, groups)
