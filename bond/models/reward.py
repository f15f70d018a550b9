"""The one reward interface, reward models and the Bradley-Terry loss.

Every reward in the code base is a `RewardFn`: (params, responses) -> rewards [N] float32, where
`responses` is a `Responses` of rows [N, T] (prompt + response in the codebase layout: tokens,
attention mask, response mask) and params are the judge's parameters, or None for a reward that
has none. The built-in tasks' programmatic rewards (bond.tasks.programmatic_reward), a learned
reward model (`reward_model_fn`, the proxy reward model and a pretrained checkpoint's alike) and
the benchmark's reward all have it, and so do `Setup.reward_fn` and `Setup.eval_reward_fn`.
Params are an argument (not closed over) so that a large judge enters a jitted step as an input,
not as a constant baked into the program. Pairwise preferences are built on this interface in
bond/models/preference.py.

The reward model is the transformer trunk (bond.models.transformer) with a scalar linear head read
at the last real token, trained with the Bradley-Terry loss (Bradley & Terry 1952; Ouyang et al.
2022, "Training language models to follow instructions with human feedback", eq. 1).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.models.transformer import Transformer, TransformerConfig, positions_from_mask


class Responses(NamedTuple):
    """Prompt + response rows [N, T]: tokens int, attention_mask (1 = real token), response_mask (1 on the response).

    The layout is the codebase's: the prompt left-padded to length P, the response from index P,
    response_mask 1 up to and including the first EOS.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array


RewardFn = Callable[[Any, Responses], jax.Array]
"""(params or None, responses rows [N, T]) -> rewards [N] float32."""


def response_rows(responses) -> Responses:
    """The rows [N, T] of responses [..., T]: anything with tokens, attention_mask and response_mask
    (a `Responses`, the sampler's output, `bond.algorithms.Samples`), leading axes flattened."""
    rows = lambda x: x.reshape(-1, x.shape[-1])
    return Responses(rows(responses.tokens), rows(responses.attention_mask), rows(responses.response_mask))


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


def reward_model_fn(model: RewardModel | TransformerConfig) -> RewardFn:
    """The RewardFn of a reward model: `reward_model_scores` of its params on the rows' tokens and
    attention mask (the score is read at the last real token, so the response mask is not needed)."""

    def reward(params, responses: Responses) -> jax.Array:
        return reward_model_scores(params, responses.tokens, responses.attention_mask, model=model)

    return reward


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
