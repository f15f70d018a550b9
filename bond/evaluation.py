"""Evaluation of a policy against the reference: exact on enumerable tasks, by sampling otherwise."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bond import bon, exact, sharding
from bond.context import Setup
from bond.models import Responses, response_rows
from bond.models.preference import symmetric_preference
from bond.step import draw_samples, reward_params
from bond.tasks import Prompts

# Exact evaluation enumerates every response; beyond this many per prompt it falls back to sampling.
MAX_EXACT_RESPONSES = 200_000


class Evaluator:
    """Evaluates a policy on the task's eval prompts against the reference.

    Exact (enumerating every response, bond/exact.py) when the task is small enough and
    config.eval.exact is set: expected reward, KL(π‖π_ref), win rate against π_ref, the expected
    log-quantile E_π[log p_le] and the BoN KLs for config.eval.bon_ns. Otherwise by sampling config.eval.num_samples responses per prompt
    from the policy and the reference: reward, a Monte-Carlo KL(π‖π_ref), win rate against the
    reference samples and the policy samples' log-quantile among them.

    It runs outside jit on arrays this process holds in full: with several processes pass it
    `sharding.process_local(params)` (every process then computes the same metrics).
    """

    def __init__(self, setup: Setup, ref_params, key: jax.Array, prompts: Optional[Prompts] = None):
        """prompts: the prompts to evaluate on; None: the task's eval prompts (config.eval.num_prompts, config.seed)."""
        self.setup = setup
        self.judge_params = sharding.process_local(setup.judge_params)
        c = setup.config
        task = setup.task
        if prompts is None:
            prompts = task.prompts("eval", c.eval.num_prompts, c.seed)
        self.prompts, self.prompt_mask = jnp.asarray(prompts.tokens), jnp.asarray(prompts.mask)
        self.ref_params = ref_params
        self.key = key
        size = exact.num_responses(task.vocab_size, task.max_response_length)
        self.exact = bool(c.eval.exact) and size <= MAX_EXACT_RESPONSES
        if self.exact:
            self.space = exact.enumerate_responses(task.vocab_size, task.max_response_length, task.eos_id)
            self.ref_logprobs = self._logprobs(ref_params)
            self.rewards = self._space_rewards(setup.eval_reward_fn)
            self.log_p_le = jnp.log(bon.reward_quantiles(jnp.exp(self.ref_logprobs), self.rewards).p_le)

    def _logprobs(self, params) -> jax.Array:
        return exact.response_logprobs(self.setup.model, params, self.prompts, self.prompt_mask, self.space)

    def _space_rewards(self, reward_fn) -> jax.Array:
        """r(x, y) of every response for every eval prompt: [B, M]."""
        b, p = self.prompts.shape
        m, length = self.space.tokens.shape
        tokens = jnp.concatenate(
            [jnp.broadcast_to(self.prompts[:, None], (b, m, p)), jnp.broadcast_to(self.space.tokens, (b, m, length))], -1
        )
        response = jnp.concatenate(
            [jnp.zeros((b, m, p), jnp.float32), jnp.broadcast_to(self.space.response_mask, (b, m, length))], -1
        )
        attention = jnp.concatenate(
            [jnp.broadcast_to(self.prompt_mask[:, None], (b, m, p)).astype(jnp.float32), response[..., p:]], -1
        )
        rows = response_rows(Responses(tokens, attention, response))
        return reward_fn(reward_params(self.judge_params), rows).reshape(b, m)

    def __call__(self, params) -> dict[str, float]:
        if self.exact:
            logprobs = self._logprobs(params)
            metrics = exact.exact_metrics(logprobs, self.ref_logprobs, self.rewards, self.setup.config.eval.bon_ns)["mean"]
            # E_π[log p_le(y)]: the log-quantile BOND's backward term rewards, under π_ref's reward CDF.
            metrics["log_quantile"] = jnp.mean(jnp.sum(jnp.exp(logprobs) * self.log_p_le, axis=-1))
            return {k: float(v) for k, v in metrics.items()}
        return self._sampled(params)

    def reference_points(self) -> Optional[dict]:
        """π_ref's exact Best-of-N points (config.eval.bon_ns) and KL-regularized front on the eval
        prompts, averaged over them as the metrics are (`exact.reference_front`); None when sampling."""
        if not self.exact:
            return None
        ref_probs = np.exp(np.asarray(self.ref_logprobs, np.float64))
        return exact.reference_front(ref_probs, np.asarray(self.rewards), self.setup.config.eval.bon_ns)

    def _sampled(self, params) -> dict[str, float]:
        c = self.setup.config
        k_policy, k_ref = jax.random.split(self.key)
        logp_params = {"reference": self.ref_params}
        judge_params = self.judge_params
        draw = functools.partial(draw_samples, self.setup, prompts=self.prompts, prompt_mask=self.prompt_mask,
                                 count=c.eval.num_samples, judges=judge_params, logp_params=logp_params,
                                 reads={"ref_logp"})
        policy = draw(params=params, key=k_policy, source="policy")
        ref = draw(params=self.ref_params, key=k_ref, source="reference")
        gold = lambda s: self.setup.eval_reward_fn(reward_params(judge_params), response_rows(s))
        r_policy, r_ref = (gold(s).reshape(s.rewards.shape) for s in (policy, ref))
        wins = (r_policy[:, :, None] > r_ref[:, None, :]) + 0.5 * (r_policy[:, :, None] == r_ref[:, None, :])
        metrics = {
            "reward": jnp.mean(r_policy),
            "kl_policy_ref": jnp.mean(policy.sampler_logp - policy.ref_logp),
            "win_rate_vs_ref": jnp.mean(wins),
            "log_quantile": jnp.mean(bon.smoothed_log_quantile(r_policy, r_ref)),
        }
        if self.setup.config.reward_model.use_proxy:
            metrics["proxy_reward"] = jnp.mean(policy.rewards)
        if self.setup.preference_judge is not None:  # P(y ≻ y_ref) under the pair scorer, sample i against sample i
            metrics["preference_win_rate_vs_ref"] = jnp.mean(symmetric_preference(
                self.setup.preference_judge, judge_params["preference"], response_rows(policy), response_rows(ref)))
        return {k: float(v) for k, v in metrics.items()}


def exact_reference(config, log=print) -> tuple[np.ndarray, np.ndarray]:
    """(π_ref(y|x) [B, M] in float64, normalized; r(x, y) [B, M]) over the whole response space of
    the eval prompts `config`'s runs are evaluated on: the exact evaluator's tables. Raises
    ValueError when the task is not enumerable (or config.eval.exact is off)."""
    from bond.context import eval_key, make_setup

    setup, ref_params = make_setup(config, log)
    evaluator = Evaluator(setup, ref_params, eval_key(config.seed))
    if not evaluator.exact:
        raise ValueError(f"config.task={config.task!r} is not enumerable (or config.eval.exact is off); "
                         "the exact tables need the exact evaluation.")
    probs = np.exp(np.asarray(evaluator.ref_logprobs, np.float64))
    return probs / probs.sum(-1, keepdims=True), np.asarray(evaluator.rewards, np.float64)
