"""Pairwise preferences: P(y ≻ y' | x) from a reward, from a pair scorer, or from a group's rewards.

WIND (Yang et al. 2024, arXiv 2410.20727) and SPPO (Wu et al. 2024, arXiv 2405.00675) need a
preference P(y ≻ y' | x) ∈ [0, 1] with P(y ≻ y') + P(y' ≻ y) = 1. Two judges give one, both
built on the one reward interface (`RewardFn`, bond/models/reward.py):

* a reward r(x, y) through Bradley–Terry (Bradley & Terry 1952), `reward_judge`:

      P(y ≻ y' | x) = σ(r(x, y) − r(x, y')),

  symmetric by construction, P(y ≻ y) = σ(0) = 1/2 (or the hard 1[r > r'] + ½ 1[r = r']);

* a pair scorer (the PairRM slot: Jiang et al. 2023, "LLM-Blender", arXiv 2306.02561) that
  reads prompt and both responses jointly and returns a logit s(x, y, y') that the FIRST is
  better. Such a model is position-biased in general (σ(s(x, y, y')) + σ(s(x, y', y)) ≠ 1), so
  both orders are averaged:

      P(y ≻ y' | x) = ½ [ σ(s(x, y, y')) + 1 − σ(s(x, y', y)) ],

  which satisfies P(y ≻ y') + P(y' ≻ y) = 1 and P(y ≻ y) = 1/2 exactly, and equals σ(s) when
  the scorer is already consistent. `pair_scorer_judge` fills the slot with any RewardFn of one
  sequence, e.g. a sequence-classification checkpoint (`reward_model_fn`) fed x ⊕ y ⊕ [separator] ⊕ y'.

A judge here is a `PairJudge`: (params, a, b) → q(a ≻ b) [N], the raw probability for the order
given; `symmetric_preference` and `preference_matrix` apply the averaging above. Params are an
argument (not closed over) so that a large judge enters a jitted step as an input, not as a
constant baked into the program. When the rewards of a group are already at hand (the losses'
samples carry them), `preferences_from_rewards` gives the same matrices without a judge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from bond.models.reward import Responses, RewardFn

PairJudge = Callable[[Any, Responses, Responses], jax.Array]
"""(params, a, b) → q(a ≻ b) [N] in [0, 1] for the order given; row n of a and b share a prompt."""

PreferenceKind = Literal["hard", "bradley_terry"]


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


def _check_pair(a: Responses, b: Responses) -> None:
    for name, x in (("a", a), ("b", b)):
        if x.tokens.ndim != 2 or x.attention_mask.shape != x.tokens.shape or x.response_mask.shape != x.tokens.shape:
            raise ValueError(
                f"responses {name} must have tokens, attention_mask and response_mask all [N, T]; got "
                f"{x.tokens.shape}, {x.attention_mask.shape}, {x.response_mask.shape}."
            )
    if a.tokens.shape != b.tokens.shape:
        raise ValueError(f"responses a {a.tokens.shape} and b {b.tokens.shape} must have the same shape.")


def reward_judge(reward_fn: RewardFn, kind: PreferenceKind = "bradley_terry") -> PairJudge:
    """The preference of a reward: q(a ≻ b) = σ(r(a) − r(b)) (Bradley–Terry), or with kind='hard'
    1[r(a) > r(b)] + ½ 1[r(a) = r(b)]; symmetric already, as `preferences_from_rewards`."""
    _check_kind(kind)

    def judge(params, a: Responses, b: Responses) -> jax.Array:
        _check_pair(a, b)
        r_a = jnp.asarray(reward_fn(params, a), jnp.float32)
        r_b = jnp.asarray(reward_fn(params, b), jnp.float32)
        return _preference(r_a, r_b, kind)

    return judge


def joint_pair_inputs(a: Responses, b: Responses, prompt_length: int, separator: Sequence[int] = ()) -> Responses:
    """One sequence x ⊕ y_a ⊕ separator ⊕ y_b per row: Responses [N, T + K + (T − P)].

    Columns: a's prompt and response as given (T), the K separator ids (always real), then b's
    response part (columns P.. of b). Padding after a's EOS stays in the middle, masked: models
    here take positions from the mask (cumsum − 1), so the gap shifts no real token and is never
    attended to, and the last real token, where a sequence classifier reads its score, is y_b's last.
    The response mask covers y_a, the separator and y_b (everything after the prompt).
    """
    _check_pair(a, b)
    num = a.tokens.shape[0]
    sep = jnp.broadcast_to(jnp.asarray(list(separator), a.tokens.dtype), (num, len(separator)))
    tokens = jnp.concatenate([a.tokens, sep, b.tokens[:, prompt_length:]], axis=1)
    b_response = b.response_mask[:, prompt_length:]
    attention = jnp.concatenate(
        [a.attention_mask, jnp.ones_like(sep, a.attention_mask.dtype), (b_response > 0).astype(a.attention_mask.dtype)],
        axis=1,
    )
    response = jnp.concatenate([a.response_mask, jnp.ones_like(sep, a.response_mask.dtype), b_response], axis=1)
    return Responses(tokens, attention, response)


def pair_scorer_judge(pair_logit: RewardFn, prompt_length: int, separator: Sequence[int] = ()) -> PairJudge:
    """The PairRM slot: q(a ≻ b) = σ(s(x, y_a, y_b)) with s = `pair_logit` on `joint_pair_inputs`."""

    def judge(params, a: Responses, b: Responses) -> jax.Array:
        logit = pair_logit(params, joint_pair_inputs(a, b, prompt_length, separator))
        return jax.nn.sigmoid(jnp.asarray(logit, jnp.float32))

    return judge


def symmetric_preference(judge: PairJudge, params, a: Responses, b: Responses) -> jax.Array:
    """P(a ≻ b) = ½ [q(a ≻ b) + 1 − q(b ≻ a)]: [N] with P(a ≻ b) + P(b ≻ a) = 1 exactly."""
    return 0.5 * (judge(params, a, b) + 1.0 - judge(params, b, a))


def preference_matrix(judge: PairJudge, params, responses) -> jax.Array:
    """P[b, i, j] = P(y_i ≻ y_j | x_b) for groups of S responses: [B, S, S].

    `responses` has tokens, attention_mask and response_mask [B, S, T] (a `Responses` of groups,
    or `bond.algorithms.Samples`). The judge sees all S² ordered pairs once (one batch of B·S²
    rows), Q[b, i, j] = q(y_i ≻ y_j), and P = ½ (Q + 1 − Qᵀ), so that P + Pᵀ = 1 with 1/2 on
    the diagonal.
    """
    fields = Responses(*(jnp.asarray(x) for x in (responses.tokens, responses.attention_mask, responses.response_mask)))
    if fields.tokens.ndim != 3 or any(x.shape != fields.tokens.shape for x in fields):
        raise ValueError(
            f"tokens, attention_mask and response_mask must all be [B, S, T]; got "
            f"{', '.join(str(x.shape) for x in fields)}."
        )
    batch, group, length = fields.tokens.shape

    def pairs(x: jax.Array, axis: int) -> jax.Array:  # row (b, i, j) holds sample i (axis=2) or j (axis=1)
        return jnp.broadcast_to(jnp.expand_dims(x, axis), (batch, group, group, length)).reshape(-1, length)

    first = Responses(*(pairs(x, 2) for x in fields))
    second = Responses(*(pairs(x, 1) for x in fields))
    q = jnp.asarray(judge(params, first, second), jnp.float32)
    if q.shape != (batch * group * group,):
        raise ValueError(f"the judge must return one probability per pair, shape {(batch * group * group,)}; got {q.shape}.")
    q = q.reshape(batch, group, group)
    return 0.5 * (q + 1.0 - jnp.swapaxes(q, 1, 2))


def borda_scores(preferences: ArrayLike) -> jax.Array:
    """Each sample's mean win probability against the other samples of its group: [B, S, S] → [B, S].

    s_i = (1 / (S − 1)) Σ_{j≠i} P[i, j], an estimate of P(y_i ≻ π | x), the win rate SPPO regresses
    on (Wu et al. 2024, §3); S = 1 gives 1/2.
    """
    p = jnp.asarray(preferences, jnp.float32)
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"preferences must be [B, S, S], got {p.shape}.")
    group = p.shape[1]
    if group == 1:
        return jnp.full(p.shape[:2], 0.5, jnp.float32)
    return (p.sum(-1) - jnp.diagonal(p, axis1=1, axis2=2)) / (group - 1)
