"""Reward models, the Bradley-Terry loss, and the one pairwise-preference interface.

Two kinds of judges feed the alignment losses:

* a scalar reward, `RewardFn`: (tokens [B, T], response_mask [B, T]) -> rewards [B] float32, e.g.
  a programmatic reward (a Python/JAX function of the tokens). A learned reward model scores the
  same sequences with `reward_model_scores(params, tokens, attention_mask, model=...)`, which also
  needs the attention mask (the sampler returns it) because prompt padding is not visible in the
  tokens alone;
* a pairwise preference, `PreferenceFn`: (tokens_a, response_mask_a, tokens_b, response_mask_b)
  -> P(a > b) [B] in [0, 1], where row b of both sides continues the same prompt. WIND and SPPO
  consume preferences; any RewardFn becomes one with `preference_fn_from_reward`, and a group of
  rewards [B, S] becomes a preference matrix with `preferences_from_rewards`.

The reward model is the transformer trunk (bond.models.transformer) with a scalar linear head read
at the last real token, trained with the Bradley-Terry loss (Bradley & Terry 1952; Ouyang et al.
2022, "Training language models to follow instructions with human feedback", eq. 1).
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.models.transformer import Transformer, TransformerConfig, positions_from_mask

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]
"""(tokens [B, T] int, response_mask [B, T]) -> rewards [B] float32."""

PreferenceKind = Literal["hard", "bradley_terry"]


class PreferenceFn(Protocol):
    """P(response a is preferred to response b), one probability per row.

    tokens_a/tokens_b [B, T] hold prompt + response in the codebase layout (left-padded prompt,
    response from index P); row b of both continues the same prompt. Returns [B] in [0, 1].
    """

    def __call__(
        self,
        tokens_a: jax.Array,
        response_mask_a: jax.Array,
        tokens_b: jax.Array,
        response_mask_b: jax.Array,
    ) -> jax.Array: ...


class RewardModel(nn.Module):
    """Transformer trunk + linear head on the final hidden state of the last real token.

    `__call__(tokens [B, T], attention_mask [B, T]) -> scores [B]` float32. Its parameters are
    {'transformer': <Transformer params without an untied lm_head>, 'head': {...}}, so a reward
    model can start from a policy's trunk.
    """

    config: TransformerConfig

    def setup(self):
        self.transformer = Transformer(self.config)
        self.head = nn.Dense(
            1,
            dtype=self.config.dtype,
            param_dtype=self.config.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.config.d_model**-0.5), ("embed", None)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        )

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
        hidden, _ = self.transformer.hidden_states(tokens, positions_from_mask(attention_mask), attention_mask)
        length = tokens.shape[1]
        last_real = length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
        summary = jnp.take_along_axis(hidden, last_real[:, None, None], axis=1)[:, 0]
        return self.head(summary)[:, 0].astype(jnp.float32)


def _as_reward_model(model: RewardModel | TransformerConfig) -> RewardModel:
    if isinstance(model, RewardModel):
        return model
    if isinstance(model, TransformerConfig):
        return RewardModel(model)
    raise ValueError(f"model must be a RewardModel or a TransformerConfig, got {type(model).__name__}.")


def _init_reward_variables(config: TransformerConfig, key: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return RewardModel(config).init(key, tokens, jnp.ones((1, 1), jnp.int32))


@functools.partial(jax.jit, static_argnames="config")
def init_reward_params(config: TransformerConfig, key: jax.Array) -> dict:
    """Randomly initialised reward-model parameters as a plain nested dict."""
    return nn.unbox(_init_reward_variables(config, key)["params"])


def reward_param_logical_axes(config: TransformerConfig) -> dict:
    """Same tree as `init_reward_params`; leaves are PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(lambda key: _init_reward_variables(config, key), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def reward_model_scores(
    params,
    tokens: ArrayLike,
    attention_mask: ArrayLike,
    *,
    model: RewardModel | TransformerConfig,
) -> jax.Array:
    """Scalar scores [B] float32 of sequences `tokens` [B, T] (1 in `attention_mask` = real token).

    The score is read at the last position whose mask is 1; tokens after it and padding do not
    influence it.
    """
    module = _as_reward_model(model)
    tokens, attention_mask = jnp.asarray(tokens), jnp.asarray(attention_mask)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an int array [batch, length], got shape {tokens.shape} dtype {tokens.dtype}.")
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the shape of tokens {tokens.shape}, got {attention_mask.shape}.")
    if tokens.shape[1] > module.config.max_len:
        raise ValueError(
            f"tokens have length {tokens.shape[1]} > TransformerConfig.max_len={module.config.max_len}."
        )
    return _scores_jit(module.config, params, tokens, attention_mask)


@functools.partial(jax.jit, static_argnames="config")
def _scores_jit(config: TransformerConfig, params, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return RewardModel(config).apply({"params": params}, tokens, attention_mask)


def bradley_terry_loss(
    chosen_scores: ArrayLike,
    rejected_scores: ArrayLike,
    weights: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry negative log-likelihood of observed preferences chosen > rejected.

    loss = -sum_i w_i log sigmoid(r_c,i - r_r,i) / sum_i w_i (w = 1 by default), i.e. the
    reward-model loss of Ouyang et al. (2022), eq. 1, under P(c > r) = sigmoid(r_c - r_r)
    (Bradley & Terry 1952).

    Args:
      chosen_scores: [...] scores of the preferred responses.
      rejected_scores: [...] scores of the dispreferred responses, same shape.
      weights: optional non-negative [...] pair weights (padding masks).

    Returns:
      (loss, metrics) with metrics 'accuracy' (weighted fraction with r_c > r_r) and 'margin'
      (weighted mean of r_c - r_r).
    """
    chosen, rejected = jnp.asarray(chosen_scores, jnp.float32), jnp.asarray(rejected_scores, jnp.float32)
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen_scores {chosen.shape} and rejected_scores {rejected.shape} must have the same shape."
        )
    weights = jnp.ones_like(chosen) if weights is None else jnp.asarray(weights, jnp.float32)
    if weights.shape != chosen.shape:
        raise ValueError(f"weights must have the shape of the scores {chosen.shape}, got {weights.shape}.")
    margin = chosen - rejected
    total = jnp.sum(weights)
    mean = lambda x: jnp.sum(weights * x) / total
    loss = mean(jax.nn.softplus(-margin))  # -log sigmoid(m) = softplus(-m), stable for any m
    return loss, {"accuracy": mean((margin > 0).astype(jnp.float32)), "margin": mean(margin)}


def _check_kind(kind: str) -> None:
    if kind not in ("hard", "bradley_terry"):
        raise ValueError(f"kind must be 'hard' or 'bradley_terry', got {kind!r}.")


def _preference(rewards_a: jax.Array, rewards_b: jax.Array, kind: PreferenceKind) -> jax.Array:
    """P(a > b) from two rewards: hard = 1[a > b] + 1/2 1[a = b], bradley_terry = sigmoid(a - b)."""
    _check_kind(kind)
    if kind == "hard":
        return (rewards_a > rewards_b).astype(jnp.float32) + 0.5 * (rewards_a == rewards_b).astype(jnp.float32)
    return jax.nn.sigmoid(rewards_a - rewards_b)


def preferences_from_rewards(rewards: ArrayLike, kind: PreferenceKind = "hard") -> jax.Array:
    """Preference matrices [B, S, S] of a group of rewards [B, S]: P[b, i, j] = P(y_i > y_j).

    hard: 1[r_i > r_j] + 1/2 1[r_i = r_j] (a reward that decides; ties split evenly);
    bradley_terry: sigmoid(r_i - r_j). Both satisfy P + P^T = 1 with 1/2 on the diagonal.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape [batch, samples], got {rewards.shape}.")
    return _preference(rewards[:, :, None], rewards[:, None, :], kind)


def preference_fn_from_reward(reward_fn: RewardFn, kind: PreferenceKind = "hard") -> PreferenceFn:
    """The PreferenceFn P(a > b) = pref(reward_fn(a), reward_fn(b)) with `kind` as in
    `preferences_from_rewards`."""
    _check_kind(kind)

    def preference(tokens_a, response_mask_a, tokens_b, response_mask_b):
        return _preference(reward_fn(tokens_a, response_mask_a), reward_fn(tokens_b, response_mask_b), kind)

    return preference


def pairwise_preferences(
    preference_fn: PreferenceFn,
    tokens: ArrayLike,
    response_mask: ArrayLike,
) -> jax.Array:
    """Preference matrices [B, S, S] of groups of S responses: P[b, i, j] = P(y_i > y_j).

    Calls `preference_fn` once on all S * S ordered pairs of every group (batch B * S * S) and
    returns the antisymmetrised (P + 1 - P^T) / 2, so that P + P^T = 1 and the diagonal is 1/2
    even for a judge that is not exactly consistent under swapping a and b.

    Args:
      preference_fn: a PreferenceFn.
      tokens: [B, S, T] int, S responses per prompt (prompt + response layout).
      response_mask: [B, S, T].
    """
    tokens, response_mask = jnp.asarray(tokens), jnp.asarray(response_mask)
    if tokens.ndim != 3 or response_mask.shape != tokens.shape:
        raise ValueError(
            f"tokens and response_mask must both have shape [batch, samples, length], got {tokens.shape} "
            f"and {response_mask.shape}."
        )
    batch, group, length = tokens.shape

    def all_pairs(x, axis):
        x = jnp.expand_dims(x, axis)
        return jnp.broadcast_to(x, (batch, group, group, length)).reshape(-1, length)

    probs = preference_fn(all_pairs(tokens, 2), all_pairs(response_mask, 2),
                          all_pairs(tokens, 1), all_pairs(response_mask, 1))
    probs = jnp.asarray(probs, jnp.float32)
    if probs.shape != (batch * group * group,):
        raise ValueError(
            f"preference_fn must return one probability per pair, shape {(batch * group * group,)}, "
            f"got {probs.shape}."
        )
    probs = probs.reshape(batch, group, group)
    return 0.5 * (probs + 1.0 - jnp.swapaxes(probs, 1, 2))
