"""The online loop: sample → score → log-probs → loss → optax update → anchor update → evaluate → checkpoint.

Read top to bottom: setup (config → task, models, algorithm, mesh), the jitted train step,
evaluation (exact on enumerable tasks), and `run`, the loop with checkpoints and metrics.

Determinism: step t's randomness is fold_in(PRNGKey(seed), t) and its prompts are rows
[t·B, (t+1)·B) of the task's train prompt stream, so a run resumed from a checkpoint continues
exactly as if never stopped. Hyperparameters that sweeps vary (β, γ, η, N, learning-rate scale)
enter the step as traced arrays (`hparams`): changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bond import algorithms, bon, exact, sharding, stages
from bond.algorithms import Algorithm, LossInputs, Samples, SamplingPlan
from bond.checkpoint import Checkpointer, abstract_like, install_sigterm_handler
from bond.metrics import MetricWriter, Progress, check_finite, read_metrics
from bond.plots import plot_run
from bond.models import TransformerConfig, param_logical_axes, reward_model_scores, sequence_logprobs
from bond.models.preference import Responses, preference_matrix, symmetric_preference
from bond.sampling import sample
from bond.tasks import Task, get_task, synthetic_language
from bond.tasks import pretrained as pretrained_task
from bond.tasks.prompts import load_prompts, read_prompt_batch
from bond.validation import ConfigError, validate

# Exact evaluation enumerates every response; beyond this many per prompt it falls back to sampling.
MAX_EXACT_RESPONSES = 200_000


class TrainState(NamedTuple):
    """Everything a step changes; checkpointed whole."""

    step: jax.Array  # int32 scalar: steps completed
    params: Any
    anchor_params: Any  # None when the run has no anchor
    opt_state: Any
    nonfinite_step: jax.Array  # int32: first step whose loss was NaN/inf, −1 while none was


@dataclasses.dataclass(frozen=True)
class Setup:
    """Static facts of a run, derived once from the config."""

    config: ml_collections.FrozenConfigDict
    task: Task
    model: TransformerConfig
    algorithm: Algorithm
    plan: SamplingPlan
    anchor_kind: str  # 'none', 'hard' or 'ema'
    # (judge_params, tokens, attention, response) → [N]; judge_params is `Setup.judge_params`,
    # passed into the jitted step as an argument so that large judges are not compiled in as constants.
    reward_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    eval_reward_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
    mesh: jax.sharding.Mesh
    judge_params: Any = None  # parameters of the reward / preference models ({'reward': ..., 'preference': ...})
    # A pair scorer's P(y ≻ y') (bond/models/preference.py) on judge_params['preference']: the losses
    # that learn from preferences (WIND) read it through LossInputs.pair_judge.
    preference_judge: Optional[Callable] = None
    train_prompts: Any = None  # the train prompt source when the task brings its own (else its TFDS set)


# ---------------------------------------------------------------------------------------------
# Setup


def anchor_kind(config, algorithm: Algorithm) -> str:
    """The anchor rule: none for algorithms without one, else config.anchor.kind."""
    return "none" if algorithm.anchor == "none" else config.anchor.kind


def hparams(config) -> dict[str, jax.Array]:
    """The traced hyperparameters: config.algo's numbers, the learning rate and the anchor's η."""
    hp = {k: v for k, v in config.algo.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    hp.update(learning_rate=config.learning_rate, lr_scale=config.lr_scale, anchor_eta=config.anchor.eta)
    return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam with global-norm clipping; the learning rate is applied in the step (it is traced).

    Its state and the update math are float32 whatever the parameters' dtype (`as_float32`), so
    bfloat16 parameters keep float32 moments."""
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    return optax.chain(*parts, optax.scale_by_adam())


def as_float32(tree):
    """Every leaf of `tree` in float32 (a no-op on float32 leaves)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def make_setup(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> tuple[Setup, Any]:
    """Validates the config, builds (or loads) the reference and reward models; → (Setup, ref params)."""
    validate(config)
    algorithm = algorithms.get_algorithm(config.algorithm)
    mesh = sharding.make_mesh(config.mesh_shape, devices=jax.devices()[: config.num_devices or None])
    sharding.check_batch_divides(config.batch_size, mesh, field="config.batch_size")
    build = _pretrained_setup if config.task == pretrained_task.TASK_NAME else _builtin_setup
    setup, ref_params = build(config, algorithm, mesh, log)
    if config.min_new_tokens > setup.task.max_response_length:
        raise ConfigError(
            f"config.min_new_tokens={config.min_new_tokens} exceeds the task's response length "
            f"{setup.task.max_response_length}; lower it (0 = off)."
        )
    return setup, ref_params


def _pretrained_setup(config, algorithm: Algorithm, mesh, log) -> tuple[Setup, Any]:
    """A pretrained checkpoint: policy = reference from its files, judges from theirs, text prompts."""
    loaded = pretrained_task.load_pretrained_task(config, mesh, log)
    judge = loaded.preference_judge
    setup = Setup(
        config=ml_collections.FrozenConfigDict(config),
        task=loaded.task,
        model=loaded.model,
        algorithm=algorithm,
        plan=algorithm.plan(config.algo),
        anchor_kind=anchor_kind(config, algorithm),
        reward_fn=loaded.reward_fn,
        eval_reward_fn=loaded.reward_fn,
        mesh=mesh,
        judge_params=_on_mesh(loaded.judge_params, mesh),
        preference_judge=judge,
        train_prompts=loaded.train_prompts,
    )
    return setup, loaded.params


def _builtin_setup(config, algorithm: Algorithm, mesh, log) -> tuple[Setup, Any]:
    """A built-in task: the reference pretrained (SFT) on its corpus, its reward or a proxy reward model."""
    task = get_task(config.task)
    model, ref_params = stages.pretrained_reference(config, task, log)

    def task_reward(judge_params, tokens, attention_mask, response_mask):
        return task.reward(tokens, response_mask)

    reward_fn, judge_params = task_reward, None
    if config.reward_model.use_proxy:
        rm_model, rm_params = stages.proxy_reward_model(config, task, synthetic_language.preference_corpus, log)
        judge_params = _on_mesh({"reward": rm_params}, mesh)

        def proxy_reward(judge_params, tokens, attention_mask, response_mask):
            return reward_model_scores(judge_params["reward"], tokens, attention_mask, model=rm_model)

        reward_fn = proxy_reward

    setup = Setup(
        config=ml_collections.FrozenConfigDict(config),
        task=task,
        model=model,
        algorithm=algorithm,
        plan=algorithm.plan(config.algo),
        anchor_kind=anchor_kind(config, algorithm),
        reward_fn=reward_fn,
        eval_reward_fn=task_reward,
        mesh=mesh,
        judge_params=judge_params,
    )
    return setup, ref_params


def judge_shardings(setup: Setup):
    """Where the judges' parameters live: as the checkpoint loader placed them on the mesh, else replicated."""
    return jax.tree.map(lambda x: _mesh_sharding(x, setup.mesh), setup.judge_params)


def _mesh_sharding(x, mesh):
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
        return sh
    return sharding.replicated(mesh)


def _on_mesh(tree, mesh):
    """`tree` placed on `mesh`: leaves already there stay, the others (held in full by every process) are replicated."""
    return jax.tree.map(
        lambda x: x if _mesh_sharding(x, mesh) is getattr(x, "sharding", None) else sharding.place(x, sharding.replicated(mesh)),
        tree,
    )


def train_prompt_source(setup: Setup):
    """The random-access train prompt source: the task's own (pretrained) or its TFDS prompt set."""
    if setup.train_prompts is not None:
        return setup.train_prompts
    c = setup.config
    return load_prompts(c.task, "train", stages.cache_root(c.cache_dir) / "tfds")


def init_state(setup: Setup, ref_params) -> TrainState:
    """The policy (and anchor) start at the reference."""
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=copy(ref_params),
        anchor_params=copy(ref_params) if setup.anchor_kind != "none" else None,
        opt_state=make_optimizer(setup.config).init(as_float32(ref_params)),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def state_shardings(setup: Setup, state: TrainState) -> TrainState:
    """Parameters by their logical axes (bond/sharding.py rules), optimizer state like them, the rest replicated."""
    mesh = setup.mesh
    params = sharding.param_shardings(state.params, param_logical_axes(setup.model), mesh)
    rep = sharding.replicated(mesh)
    return TrainState(
        step=rep,
        params=params,
        anchor_params=params if state.anchor_params is not None else None,
        opt_state=sharding.shardings_like_params(state.opt_state, state.params, params, mesh),
        nonfinite_step=rep,
    )


# ---------------------------------------------------------------------------------------------
# The train step


def _draw(setup: Setup, params, prompts, prompt_mask, key, count: int, logp_params: dict, source: str,
          judge_params: Any) -> Samples:
    """`count` samples per prompt from `params`, scored by the judges, with log-probs under reference and anchor."""
    c = setup.config
    out = sample(
        setup.model, params, prompts, prompt_mask, key, num_samples=count,
        max_new_tokens=setup.task.max_response_length, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
        eos_id=setup.task.eos_id, min_new_tokens=c.min_new_tokens,
    )
    b, s, t = out.tokens.shape
    flat = lambda x: x.reshape(b * s, t)
    rewards = setup.reward_fn(judge_params, flat(out.tokens), flat(out.attention_mask), flat(out.response_mask))
    rewards = rewards.reshape(b, s)
    sampler_logp = out.logprobs.sum(-1)
    plain = c.temperature == 1.0 and c.top_k == 0 and c.top_p == 1.0 and c.min_new_tokens == 0

    def logp_under(name: str) -> jax.Array:
        if name == source and plain:  # the sampler's own log-probs are exact then: skip a forward pass
            return sampler_logp
        if logp_params.get(name) is None:
            return jnp.zeros_like(sampler_logp)
        return sequence_logprobs(
            logp_params[name], out.tokens, out.response_mask, model=setup.model, attention_mask=out.attention_mask,
            shared_prompt_len=prompts.shape[1],
        )[1]

    return Samples(
        out.tokens, out.attention_mask, out.response_mask, rewards, sampler_logp,
        logp_under("reference"), logp_under("anchor"),
    )


def _update_anchor(kind: str, anchor, params, step, hp, period: int):
    if kind == "ema":  # θ_anchor ← (1 − η)·θ_anchor + η·θ   (BOND §6), in float32, stored in the anchor's dtype
        eta = hp["anchor_eta"]
        return jax.tree.map(lambda a, p: ((1.0 - eta) * a.astype(jnp.float32) + eta * p).astype(a.dtype), anchor, params)
    if kind == "hard":  # copy every `period` steps (iterative BOND, §5)
        move = (step + 1) % period == 0
        return jax.tree.map(lambda a, p: jnp.where(move, p, a), anchor, params)
    return anchor


def _sample_metrics(name: str, samples: Optional[Samples],
                    kl_ref_estimate: Callable[[str, Samples], jax.Array]) -> dict[str, jax.Array]:
    if samples is None:
        return {}
    return {
        f"{name}_reward": jnp.mean(samples.rewards),
        f"{name}_length": jnp.mean(jnp.sum(samples.response_mask, axis=-1)),
        f"{name}_kl_ref_estimate": kl_ref_estimate(name, samples),
    }


def ref_logps_unread_by_loss(loss: Callable[[LossInputs], Any], inputs: LossInputs) -> set[str]:
    """The sample sets ('policy', 'anchor') whose ref_logp the loss never reads.

    Found by tracing the loss with those arrays as its only inputs and following its outputs back
    through the operations that compute them (without evaluating anything; an operation with a
    needed output needs all its operands). A log-prob pass the loss does not read serves only the
    metrics, so the step computes it on logging steps only.
    """
    names = [name for name in ("policy", "anchor") if getattr(inputs, name) is not None]
    if not names:
        return set()

    def loss_of(*ref_logps):
        return loss(inputs._replace(**{
            name: getattr(inputs, name)._replace(ref_logp=value) for name, value in zip(names, ref_logps)
        }))

    jaxpr = jax.make_jaxpr(loss_of)(*(getattr(inputs, name).ref_logp for name in names)).jaxpr
    needed = {id(v) for v in jaxpr.outvars}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(id(v) in needed for v in eqn.outvars):
            needed.update(id(v) for v in eqn.invars)
    return {name for name, var in zip(names, jaxpr.invars) if id(var) not in needed}


def make_train_step(setup: Setup) -> Callable:
    """The jitted step (state, ref_params, prompts, prompt_mask, prompt_rows, hp, seed_key, ref_cache[, judge_params])
    → (state, metrics). prompt_rows [B] are the prompts' rows in the train set; ref_cache is
    `build_reference_cache`'s output or None; judge_params defaults to `setup.judge_params`
    (then compiled in as constants: pass them for large judges). Metrics are complete on the steps
    `run` logs (every config.log_every-th and the last); elsewhere a KL-to-reference estimate whose
    log-prob pass the loss does not need is NaN, its pass skipped."""
    plan, algorithm, model = setup.plan, setup.algorithm, setup.model
    optimizer = make_optimizer(setup.config)
    period = int(setup.config.anchor.period)
    log_every, num_steps = int(setup.config.log_every), int(setup.config.steps)

    def step(state: TrainState, ref_params, prompts, prompt_mask, prompt_rows, hp, seed_key, ref_cache,
             judge_params=None):
        judge_params = setup.judge_params if judge_params is None else judge_params
        key = jax.random.fold_in(seed_key, state.step)
        k_policy, k_anchor, k_ref, k_loss = jax.random.split(key, 4)
        logp_params = {"reference": ref_params, "anchor": state.anchor_params}

        def draw(params, k, count, source):
            return _draw(setup, params, prompts, prompt_mask, k, count, logp_params, source, judge_params) if count else None

        policy = draw(state.params, k_policy, plan.policy, "policy")
        anchor = draw(state.anchor_params, k_anchor, plan.anchor, "anchor")
        if ref_cache is not None:  # this batch's rows of the per-prompt reference samples
            reference = jax.tree.map(lambda x: x[prompt_rows], ref_cache)
        else:
            reference = draw(ref_params, k_ref, plan.reference, "reference")
        pair_judge = None if setup.preference_judge is None else (
            lambda s: preference_matrix(setup.preference_judge, judge_params["preference"], s.tokens,
                                        s.attention_mask, s.response_mask))
        inputs = LossInputs(None, policy, anchor, reference, hp, setup.config.algo, k_loss, pair_judge)

        def logp(params, s: Samples) -> jax.Array:  # every sample's first P columns are its prompt
            return sequence_logprobs(params, s.tokens, s.response_mask, model=model, attention_mask=s.attention_mask,
                                     shared_prompt_len=prompts.shape[1])[1]

        def loss_fn(params, loss_inputs=inputs):
            return algorithm.loss(loss_inputs._replace(policy_logp=functools.partial(logp, params)))

        # Reference log-probs that only the metrics read are computed on the steps that log them.
        metric_only = ref_logps_unread_by_loss(functools.partial(loss_fn, state.params), inputs)
        logging = ((state.step + 1) % log_every == 0) | (state.step + 1 == num_steps)

        def kl_ref_estimate(name: str, samples: Samples) -> jax.Array:
            if name not in metric_only:
                return jnp.mean(samples.sampler_logp - samples.ref_logp)
            estimate = lambda: jnp.mean(samples.sampler_logp - logp(ref_params, samples))
            return jax.lax.cond(logging, estimate, lambda: jnp.float32(jnp.nan))

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # float32 optimizer state and update math, parameters stored in their own dtype (bfloat16 allowed)
        updates, opt_state = optimizer.update(as_float32(grads), state.opt_state, as_float32(state.params))
        lr = hp["learning_rate"] * hp["lr_scale"]
        params = jax.tree.map(lambda p, u: (p.astype(jnp.float32) - lr * u).astype(p.dtype), state.params, updates)
        anchor_params = _update_anchor(setup.anchor_kind, state.anchor_params, params, state.step, hp, period)
        first_bad = jnp.where((state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step, state.nonfinite_step)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            **_sample_metrics("policy", policy, kl_ref_estimate),
            **_sample_metrics("anchor", anchor, kl_ref_estimate),
        }
        new_state = TrainState(state.step + 1, params, anchor_params, opt_state, first_bad)
        return new_state, metrics

    return step


def compile_train_step(setup: Setup, state: TrainState, ref_params) -> Callable:
    """jax.jit of the step with its shardings (the successor of pjit); the state is donated.
    Call it with the judges' parameters last (`setup.judge_params`)."""
    mesh = setup.mesh
    state_sh = state_shardings(setup, state)
    params_sh = state_sh.params
    batch_sh = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    return sharding.jit_sharded(
        make_train_step(setup),
        in_shardings=(state_sh, params_sh, batch_sh, batch_sh, batch_sh, rep, rep, rep, judge_shardings(setup)),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )


def eval_key(seed: int) -> jax.Array:
    """The key of a run's sampled evaluation (the same at every evaluation, so curves compare like with like)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 2**30)


def reference_cache_key(seed: int) -> jax.Array:
    """The key the reference-sample cache is drawn with."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 2**30 + 1)


def uses_reference_cache(setup: Setup) -> bool:
    """Whether the run draws its reference samples once per train prompt (see SamplingPlan)."""
    return bool(setup.plan.reference and setup.plan.cache_reference and setup.config.cache_reference_samples)


def build_reference_cache(setup: Setup, ref_params, prompt_source, key: jax.Array, chunk: int = 512) -> Samples:
    """plan.reference samples of π_ref for every train prompt, scored: Samples with [N, k, ...] leaves.

    Drawn once, deterministically from `key` (so a resumed run rebuilds the same cache), in
    chunks of `chunk` prompts through the same compiled sampler the step uses. With several
    processes pass process-local `ref_params` (`sharding.process_local`): every process draws the
    whole cache itself, identically.
    """
    judge_params = sharding.process_local(setup.judge_params)
    num = len(prompt_source)
    parts = []
    for start in range(0, num, chunk):
        size = min(chunk, num - start)
        batch = read_prompt_batch(prompt_source, start, size)
        parts.append(
            _draw(setup, ref_params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask), jax.random.fold_in(key, start),
                  setup.plan.reference, {"reference": ref_params}, "reference", judge_params)
        )
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


# ---------------------------------------------------------------------------------------------
# Evaluation


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

    def __init__(self, setup: Setup, ref_params, key: jax.Array):
        self.setup = setup
        self.judge_params = sharding.process_local(setup.judge_params)
        c = setup.config
        task = setup.task
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
        flat = lambda x: x.reshape(b * m, p + length)
        return reward_fn(self.judge_params, flat(tokens), flat(attention), flat(response)).reshape(b, m)

    def __call__(self, params) -> dict[str, float]:
        if self.exact:
            logprobs = self._logprobs(params)
            metrics = exact.exact_metrics(logprobs, self.ref_logprobs, self.rewards, self.setup.config.eval.bon_ns)["mean"]
            # E_π[log p_le(y)]: the log-quantile BOND's backward term rewards, under π_ref's reward CDF.
            metrics["log_quantile"] = jnp.mean(jnp.sum(jnp.exp(logprobs) * self.log_p_le, axis=-1))
            return {k: float(v) for k, v in metrics.items()}
        return self._sampled(params)

    def _sampled(self, params) -> dict[str, float]:
        c = self.setup.config
        k_policy, k_ref = jax.random.split(self.key)
        logp_params = {"reference": self.ref_params}
        judge_params = self.judge_params
        policy = _draw(self.setup, params, self.prompts, self.prompt_mask, k_policy, c.eval.num_samples,
                       logp_params, "policy", judge_params)
        ref = _draw(self.setup, self.ref_params, self.prompts, self.prompt_mask, k_ref, c.eval.num_samples,
                    logp_params, "reference", judge_params)
        gold = lambda s: self.setup.eval_reward_fn(
            judge_params, s.tokens.reshape(-1, s.tokens.shape[-1]), s.attention_mask.reshape(-1, s.tokens.shape[-1]),
            s.response_mask.reshape(-1, s.tokens.shape[-1]),
        ).reshape(s.rewards.shape)
        r_policy, r_ref = gold(policy), gold(ref)
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
            flat = lambda s: Responses(*(x.reshape(-1, x.shape[-1]) for x in (s.tokens, s.attention_mask, s.response_mask)))
            metrics["preference_win_rate_vs_ref"] = jnp.mean(
                symmetric_preference(self.setup.preference_judge, judge_params["preference"], flat(policy), flat(ref))
            )
        return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The run


def run(config: ml_collections.ConfigDict, workdir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Trains `config` into `workdir`, resuming from its last checkpoint; returns the summary dict.

    Under jax.distributed every process calls it with the same config and a `workdir` on a file
    system all processes share: the mesh spans all devices, each process feeds its rows of each
    batch, orbax writes the checkpoints collectively, and only process 0 writes the other files.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setup, ref_params = make_setup(config, log)
    c = setup.config
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1, default=str))

    state = init_state(setup, ref_params)
    shardings = state_shardings(setup, state)
    state = sharding.place(state, shardings)
    ref_params = sharding.place(ref_params, shardings.params)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep)
    writer = MetricWriter(workdir)
    start, state, _ = checkpointer.restore_latest(abstract_like(state, shardings), log) or (0, state, None)
    if start:
        log(f"Resumed from the checkpoint at step {start} in {workdir / 'checkpoints'}")
    writer.truncate_after(start)  # lines a killed run wrote after its last checkpoint

    replicated = sharding.replicated(setup.mesh)
    seed_key = sharding.place(jax.random.PRNGKey(c.seed), replicated)
    hp = sharding.place(hparams(c), replicated)
    train_step = compile_train_step(setup, state, ref_params)
    prompt_source = _first_on_process_zero(lambda: train_prompt_source(setup), "bond.train:prompts")
    batch_sh = sharding.batch_sharding(setup.mesh)
    local_rows = sharding.local_batch_rows(batch_sh, c.batch_size)
    local_ref_params = sharding.process_local(ref_params)
    ref_cache = None
    if uses_reference_cache(setup):
        ref_cache = build_reference_cache(setup, local_ref_params, prompt_source, reference_cache_key(c.seed))
        ref_cache = sharding.place(ref_cache, replicated)
    evaluator = Evaluator(setup, local_ref_params, eval_key(c.seed))
    stop = install_sigterm_handler()
    progress = Progress(c.steps)

    def evaluate(step: int) -> dict:
        metrics = {f"eval/{k}": v for k, v in evaluator(sharding.process_local(state.params)).items()}
        writer.write(step, metrics)
        return metrics

    if start == 0:
        evaluate(0)
    last_saved = start if start else None
    step = start
    try:
        while step < c.steps:
            if stop.stop_requested():
                checkpointer.save(step, state)
                checkpointer.wait_until_finished()
                log(f"Stopped by SIGTERM after step {step}; saved a checkpoint.")
                return {"stopped_at": step}
            batch = read_prompt_batch(prompt_source, step * c.batch_size, c.batch_size)
            rows = (step * c.batch_size + np.arange(c.batch_size)) % len(prompt_source)
            tokens, mask, rows = sharding.host_local_to_global(
                (batch.tokens[local_rows], batch.mask[local_rows], rows[local_rows]), batch_sh
            )
            state, metrics = train_step(
                state, ref_params, tokens, mask, rows, hp, seed_key, ref_cache, setup.judge_params
            )
            step += 1
            if step % c.log_every == 0 or step == c.steps:
                host = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
                _stop_if_nonfinite(state, last_saved)
                writer.write(step, host)
                progress.update(step, host)
            if step % c.eval.every == 0 or step == c.steps:
                progress.update(step, evaluate(step))
            if step % c.checkpoint.every == 0 or step == c.steps:
                _stop_if_nonfinite(state, last_saved)
                checkpointer.save(step, state)
                last_saved = step
    finally:
        writer.close()
        stop.close()
        checkpointer.close()  # waits for the last save; raises CheckpointSaveError if a save failed

    sharding.sync_processes("bond.train:finished")  # metrics.jsonl is complete for every process
    return finish_run(workdir, c)


def _first_on_process_zero(make: Callable[[], Any], name: str) -> Any:
    """make() on process 0, then (after a barrier) on the others: for steps that fill a shared cache."""
    first = jax.process_index() == 0
    result = make() if first else None
    sharding.sync_processes(name)
    return result if first else make()


def finish_run(workdir: Path, config) -> dict:
    """Writes summary.json (the first and last evaluation, read from metrics.jsonl) and the plots; returns the summary.

    Every process returns the summary; only process 0 writes files."""
    evals = [r for r in read_metrics(Path(workdir) / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    pick = lambda row: {k: v for k, v in row.items() if k.startswith("eval/")}
    summary = {
        "steps": config.steps, "algorithm": config.algorithm, "task": config.task,
        "before": pick(evals[0]) if evals else {}, "after": pick(evals[-1]) if evals else {},
    }
    if jax.process_index() == 0:
        (Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=1))
        if config.plots:
            plot_run(workdir)
    return summary


def _stop_if_nonfinite(state: TrainState, last_saved: Optional[int]) -> None:
    """Raises NonFiniteLossError naming the first step whose loss was NaN/inf and the last good checkpoint."""
    bad = int(state.nonfinite_step)
    if bad >= 0:
        check_finite(bad + 1, {"loss": float("nan")}, last_saved)


