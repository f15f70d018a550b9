"""The train step, composed of named phases, and its named inputs.

One online step, as data flows (each arrow a function below, each usable on its own — the
benchmark jits and times these same functions):

    sample_responses  prompts → responses of a policy (the compiled sampler)
    score             responses → rewards (the run's reward judge)
    fixed_logprobs    responses → log π_ref(y), log π_anchor(y) without gradient (only the passes
                      the algorithm's loss reads; the sampler's own log-probs where they are exact)
    loss_and_grad     samples → (loss, metrics), ∇θ loss (the registered algorithm's loss)
    optimizer_update  ∇θ → θ' (Adam with clipping on float32 master weights, learning rate traced)
    anchor_update     θ_anchor → (1−η)θ_anchor + ηθ' (EMA, float32) or a periodic hard copy
    step_metrics      the loss's metrics, gradient norm, per-sample-set reward / length / KL

The step's inputs are named structures, each declaring its shardings and its population axis
next to its fields:

    step(state: TrainState, batch: Batch, fixed: Fixed, traced: Traced) → (state, metrics)

`Batch` is the step's prompts, `Fixed` the parameters the step reads and never changes (reference
policy, judges), `Traced` the run's values that no compiled shape depends on (the hyperparameters
sweeps vary, the seed key, the reference samples drawn from that seed). A population of runs
(bond/population.py) vmaps the step over the state and `Traced` and shares `Batch` and `Fixed`.

Master weights: the state holds the policy and the anchor in float32; `compute_params` casts them
to the model's parameter dtype for sampling, the log-prob passes and the loss gradient (taken with
respect to that low-precision copy: one copy serves all three, and the gradient tree is the copy's
size, not float32's), and the Adam and EMA updates are float32. A float32 model runs unchanged.

Micro-batches (config.memory.micro_batches = M): sampling (each row keeps its uniforms, so the
samples do not change), scoring and the fixed log-prob passes run over M strided micro-batches of
the prompts in turn, and so does the gradient, without changing the loss: the
loss is first evaluated on stop-gradient policy log-probs (computed micro-batched), its gradient
with respect to those log-prob arrays is taken on the whole batch, so baselines, normalizers and
batch means are the full batch's, and ∇θ is then the sum over micro-batches of the log-prob passes'
vector-Jacobian products with those cotangents, accumulated in float32
(`micro_batched_loss_and_grad`). M = 1 is the plain value_and_grad of the loss.

Determinism: step t's randomness is fold_in(seed_key, t), split into the policy's, the anchor's,
the reference's and the loss's keys.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bond import lora, sharding
from bond.algorithms import Drawn, LossInputs, Samples, split_algo_state
from bond.models import param_logical_axes, response_rows, sequence_logprobs
from bond.models.preference import preference_matrix
from bond.sampling import PLAIN_SAMPLING, SampleOutput, sample

if TYPE_CHECKING:
    from bond.context import Setup


class TrainState(NamedTuple):
    """Everything a step changes; checkpointed whole.

    params and anchor_params are the float32 master copies: the step computes with
    `compute_params` of them (the model's parameter dtype, bfloat16 for the pretrained Gemma
    configs) and updates them in float32, so that small updates (lr 3e-6, EMA η 0.02) are kept.
    """

    step: jax.Array  # int32 scalar: steps completed
    params: Any  # float32 master weights of the policy
    anchor_params: Any  # float32 master weights of the anchor; None when the run has no anchor
    opt_state: Any
    nonfinite_step: jax.Array  # int32: first step whose loss was NaN/inf, −1 while none was
    algo_state: Any = None  # the algorithm's own state (`Algorithm.init_state`, e.g. GDC++'s running Ẑ), or None


class Batch(NamedTuple):
    """What step t reads that changes from step to step: its prompts, rows [t·B, (t+1)·B) of the
    train prompt stream (`bond.tasks.prompts.batch_rows`), and whether its metrics are written.

    The prompts are split over the mesh's batch axes in a single run; everything is shared
    (population axis None) by the members of a population, which train on the same prompts.
    `logging` is an input rather than a function of the step counter, so that the compiled step
    does not depend on the run's length or logging period: runs that differ only in their budget
    share one program.
    """

    prompts: jax.Array  # [B, P] int32, left-padded
    prompt_mask: jax.Array  # [B, P] int32
    prompt_rows: jax.Array  # [B] int32: each prompt's row in the train set (indexes Traced.reference_samples)
    logging: jax.Array  # bool scalar: the run writes this step's metrics (the metric-only passes run)

    population_axis = None

    @staticmethod
    def shardings(mesh: jax.sharding.Mesh, split: bool = True) -> Batch:
        rows = sharding.batch_sharding(mesh) if split else sharding.replicated(mesh)
        return Batch(rows, rows, rows, sharding.replicated(mesh))


class Fixed(NamedTuple):
    """Parameters the step reads and never changes: the reference policy and the judges'.

    Passed as arguments (not closed over) so that large models are not compiled in as constants;
    shared by the members of a population.
    """

    reference: Any
    judges: Any = None  # {'reward': ..., 'preference': ...} or None (a task's own reward needs none)

    population_axis = None


class Traced(NamedTuple):
    """One run's values that no compiled shape depends on: what the members of a population vary.

    hparams: `hparams(config)`, float32 scalars (β, γ, η, N, learning rate, ...);
    seed_key: PRNGKey(config.seed); step t uses fold_in(seed_key, t);
    reference_samples: the per-train-prompt reference samples drawn from that seed
      (`bond.context.build_reference_cache`, [N_prompts, k, ...] leaves), None when the run draws
      its reference samples at every step.
    """

    hparams: dict[str, jax.Array]
    seed_key: jax.Array
    reference_samples: Optional[Samples] = None

    population_axis = 0


def hparams(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """The traced hyperparameters: config.algo's numbers, the learning rate and the anchor's η."""
    hp = {k: v for k, v in config.algo.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    hp.update(learning_rate=config.learning_rate, lr_scale=config.lr_scale, anchor_eta=config.anchor.eta)
    return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}


def traced_inputs(config: ml_collections.ConfigDict, reference_samples: Optional[Samples] = None) -> Traced:
    """`Traced` of a config: its hyperparameters and seed key (and the given reference samples)."""
    return Traced(hparams(config), jax.random.PRNGKey(config.seed), reference_samples)


# ---------------------------------------------------------------------------------------------
# State


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam with global-norm clipping; the learning rate is applied in the step (it is traced).

    Its state and the update math are float32 whatever the parameters' dtype (`as_float32`), so
    bfloat16 parameters keep float32 moments."""
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    return optax.chain(*parts, optax.scale_by_adam())


def as_float32(tree):
    """Every leaf of `tree` in float32 (a no-op on float32 leaves)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def compute_params(setup: Setup, master):
    """The copy of float32 master weights the model computes with: each floating leaf in the
    model's parameter dtype (`setup.model.param_dtype`); the master itself when that is float32.

    The step samples, runs its log-prob passes and takes the loss gradient with this copy, and
    evaluation reads it too: it is the policy the run trains. None stays None (no anchor)."""
    dtype = jnp.dtype(setup.model.param_dtype)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return jax.tree.map(cast, master)


def master_copy(tree):
    """A new float32 copy of `tree` (always a copy: the step donates the state, never the reference)."""
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.array(x),
                        tree)


def init_state(setup: Setup, ref_params) -> TrainState:
    """The policy (and anchor) start at the reference, as float32 master weights (`master_copy`).

    With LoRA (`setup.model` has adapters) the trained weights are the adapters alone, with B = 0,
    so the policy base ∪ adapters starts exactly at the reference (the base); the anchor's adapters
    start as a copy, and the optimizer state is the adapters'. A is drawn from a fixed key (`lora.INIT_KEY`):
    every seed starts from the same adapters, as every full fine-tuning run starts from the reference,
    so a population member and the single run of its config start alike."""
    if lora.adapted(setup.model):
        start = lora.init_adapters(setup.model, jax.random.PRNGKey(lora.INIT_KEY))
    else:
        start = ref_params
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=master_copy(start),
        anchor_params=master_copy(start) if setup.anchor_kind != "none" else None,
        opt_state=make_optimizer(setup.config).init(as_float32(start)),
        nonfinite_step=jnp.full((), -1, jnp.int32),
        algo_state=setup.algorithm.initial_state(),
    )


def trained_part(setup: Setup, tree):
    """The part of a model-shaped tree (parameters, their shapes or logical axes) that a run trains:
    all of it, or its adapters alone in a LoRA run."""
    return lora.adapters_of(tree) if lora.adapted(setup.model) else tree


def trained_logical_axes(setup: Setup):
    """The logical axes of the weights a run trains (`trained_part` of `param_logical_axes`)."""
    return trained_part(setup, param_logical_axes(setup.model))


def model_params(setup: Setup, trained, base):
    """The parameters the model computes with, from the compute copy of the trained weights: those
    weights themselves, or in a LoRA run the frozen `base` (the reference) with them as its adapters."""
    if trained is None:
        return None
    return lora.with_adapters(base, trained) if lora.adapted(setup.model) else trained


def state_shardings(setup: Setup, state: TrainState) -> TrainState:
    """Parameters by their logical axes (bond/sharding.py rules), optimizer state like them, the rest replicated."""
    mesh = setup.mesh
    params = sharding.param_shardings(state.params, trained_logical_axes(setup), mesh)
    rep = sharding.replicated(mesh)
    return TrainState(
        step=rep,
        params=params,
        anchor_params=params if state.anchor_params is not None else None,
        opt_state=sharding.shardings_like_params(state.opt_state, state.params, params, mesh),
        nonfinite_step=rep,
        algo_state=jax.tree.map(lambda _: rep, state.algo_state),
    )


def reference_shardings(setup: Setup, ref_params):
    """The reference's shardings, by the model's logical axes (without adapters: in a LoRA run the
    reference is the frozen base)."""
    return sharding.param_shardings(ref_params, lora.logical_axes(setup.model, ref_params), setup.mesh)


# ---------------------------------------------------------------------------------------------
# Phases


def is_plain_sampling(config) -> bool:
    """Whether the sampler draws from the model itself (temperature 1, no top-k/top-p, no forced
    length): then its own log-probs are the model's and a log-prob pass of the sampling policy is free."""
    return all(config[field] == plain for field, plain in PLAIN_SAMPLING.items())


def sample_responses(setup: Setup, params, prompts, prompt_mask, key, count: int) -> SampleOutput:
    """Phase 1: `count` responses per prompt from `params` through the compiled sampler: [B, count, T]
    (decoded over the step's micro-batches of prompts in turn; the same samples for any count)."""
    c = setup.config
    return sample(
        setup.model, params, prompts, prompt_mask, key, num_samples=count,
        max_new_tokens=setup.task.max_response_length, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
        eos_id=setup.task.eos_id, min_new_tokens=c.min_new_tokens, decode_weights=c.memory.decode_weights,
        micro_batches=micro_batch_count(setup),
    )


def reward_params(judges) -> Any:
    """The reward model's parameters among the run's judges ({'reward': ..., 'preference': ...}), None without one."""
    return None if judges is None else judges.get("reward")


def score(setup: Setup, judges, out: SampleOutput) -> jax.Array:
    """Phase 2: the reward judge's r(x, y) of every response: [B, S] (over the step's micro-batches
    of prompts in turn)."""
    def score_rows(part: SampleOutput) -> jax.Array:
        return setup.reward_fn(reward_params(judges), response_rows(part)).reshape(part.tokens.shape[:2])

    return sharding.map_micro_batches(score_rows, out, micro_batch_count(setup))


def policy_logprobs(setup: Setup, params, samples: Samples, prompt_length: int) -> jax.Array:
    """log π(y | x) of [B, S, T] samples whose first `prompt_length` columns are their prompt: [B, S]."""
    return sequence_logprobs(
        params, samples.tokens, samples.response_mask, model=setup.model, attention_mask=samples.attention_mask,
        shared_prompt_len=prompt_length, vocab_chunk=setup.config.memory.logprob_vocab_chunk,
    )[1]


def micro_batch_count(setup: Setup) -> int:
    """config.memory.micro_batches: the micro-batches the step splits its prompts into for the
    log-prob passes and the gradient (1: the whole batch at once)."""
    return int(setup.config.memory.micro_batches)


def sequences(samples: Samples) -> Samples:
    """`samples` with only what a log-prob pass reads (tokens and masks); the other fields None."""
    return Samples(samples.tokens, samples.attention_mask, samples.response_mask, None, None, None, None)


def micro_batched_logprobs(setup: Setup, params, samples: Samples, prompt_length: int, micro_batches: int = 1):
    """`policy_logprobs` [B, S] computed over `micro_batches` strided micro-batches of the prompts
    in turn (lax.map), so that one pass holds the activations of B/micro_batches prompts only."""
    return sharding.map_micro_batches(lambda part: policy_logprobs(setup, params, part, prompt_length),
                                      sequences(samples), micro_batches)


def fixed_logprobs(setup: Setup, samples: Samples, source: str, logp_params: dict[str, Any],
                   reads: frozenset[str] | set[str], prompt_length: int, micro_batches: int = 1) -> Samples:
    """Phase 3: `samples` (drawn from `source`) with ref_logp and anchor_logp filled, without gradient.

    A field is computed when it is free — the sampler's own log-probs, when `source` drew the
    samples from the model itself (`is_plain_sampling`) — or when `reads` names it ('ref_logp',
    'anchor_logp'). A policy absent from `logp_params` (a run without an anchor) gives zeros.
    Fields neither free nor read stay None, so a loss that reads one it did not declare fails
    instead of silently reading zeros. The passes run over `micro_batches` micro-batches of the
    prompts (`micro_batched_logprobs`).
    """
    plain = is_plain_sampling(setup.config)

    def under(name: str, field: str) -> Optional[jax.Array]:
        if name == source and plain:
            return samples.sampler_logp
        if field not in reads:
            return None
        if logp_params.get(name) is None:
            return jnp.zeros_like(samples.sampler_logp)
        return micro_batched_logprobs(setup, logp_params[name], samples, prompt_length, micro_batches)

    return samples._replace(ref_logp=under("reference", "ref_logp"), anchor_logp=under("anchor", "anchor_logp"))


def draw_samples(setup: Setup, params, prompts, prompt_mask, key, count: int, judges, source: str,
                 logp_params: dict[str, Any], reads: frozenset[str] | set[str],
                 micro_batches: int = 1) -> Optional[Samples]:
    """Phases 1–3 for one sample set: `count` responses of `source`'s `params`, scored, with the
    fixed log-probs `reads` names (see `fixed_logprobs`, over `micro_batches` micro-batches); None
    when count is 0."""
    if not count:
        return None
    out = sample_responses(setup, params, prompts, prompt_mask, key, count)
    samples = Samples(out.tokens, out.attention_mask, out.response_mask, score(setup, judges, out),
                      out.logprobs.sum(-1), None, None)
    return fixed_logprobs(setup, samples, source, logp_params, reads, prompts.shape[1], micro_batches)


def pair_judge_of(setup: Setup, judges) -> Optional[Callable[[Samples], jax.Array]]:
    """Samples [B, S, T] → P(y_i ≻ y_j) [B, S, S] from the run's pair scorer; None without one."""
    if setup.preference_judge is None:
        return None
    return lambda s: preference_matrix(setup.preference_judge, judges["preference"], s)


def loss_and_grad(setup: Setup, params, drawn: Drawn, hp, key, pair_judge, prompt_length: int, algo_state=None,
                  micro_batches: int = 1, base=None):
    """Phase 4: the algorithm's (loss, metrics) on the drawn samples and its gradient in `params`
    (the compute copy, `compute_params`: the gradient has its dtype with one micro-batch, float32
    when accumulated over several).

    The policy's log-probs are the only differentiable quantity (`LossInputs.policy_logp`). An
    algorithm with a state reads `algo_state` and returns the next one in the metrics
    (`bond.algorithms.split_algo_state`). With `micro_batches` > 1 the gradient is accumulated
    over micro-batches of the prompts while the loss keeps the whole batch's statistics
    (`micro_batched_loss_and_grad`). In a LoRA run `params` are the adapters, the model computes
    with `base` ∪ adapters (`model_params`) and the gradient is the adapters' alone."""
    as_model = lambda trained: model_params(setup, trained, base)

    def loss_of(policy_logp: Callable[[Samples], jax.Array]):
        inputs = LossInputs(
            policy_logp=policy_logp, policy=drawn.policy, anchor=drawn.anchor, reference=drawn.reference, hp=hp,
            algo=setup.config.algo, key=key, pair_judge=pair_judge, algo_state=algo_state,
        )
        return setup.algorithm.loss(inputs)

    if micro_batches == 1:
        loss_fn = lambda p: loss_of(functools.partial(policy_logprobs, setup, as_model(p), prompt_length=prompt_length))
        return jax.value_and_grad(loss_fn, has_aux=True)(params)
    return micro_batched_loss_and_grad(setup, params, loss_of, prompt_length, micro_batches, as_model)


def micro_batched_loss_and_grad(setup: Setup, params, loss_of: Callable, prompt_length: int, micro_batches: int,
                                as_model: Callable = lambda p: p):
    """((loss, metrics), ∇θ loss) with the policy's differentiable log-prob passes over `micro_batches`
    micro-batches of the prompts, exact for every loss.

    `loss_of(policy_logp)` is the loss as a function of its policy log-prob function. A loss
    depends on θ only through its calls policy_logp(samples_i) = ℓ_i(θ) ([B, S_i] each, on the
    drawn sets or sets derived from them: best-of-2 picks, chosen / rejected), so with
    L(θ) = f(ℓ_1(θ), …, ℓ_k(θ)):

      1. record: run the loss once with a policy_logp that returns the stop-gradient ℓ_i,
         computed micro-batched (`micro_batched_logprobs`), and remembers each call's samples in
         call order;
      2. replay: (loss, metrics), g_i = ∂f/∂ℓ_i by jax.value_and_grad of the loss as a function of
         the recorded arrays (a replaying policy_logp returns them in the same order). Every batch
         statistic (baselines, normalizers, quantiles, batch means) is inside f and sees the whole
         batch: nothing is averaged per micro-batch;
      3. accumulate: ∇θ L = Σ_m Σ_i vjp(ℓ_i restricted to micro-batch m)(g_i[m]), one backward pass
         per micro-batch in a lax.scan, summed in float32.

    `as_model` maps the differentiated weights to the model's parameters (`model_params`).
    The forward log-prob pass therefore runs twice (record, then inside each vjp). The loss must
    call policy_logp at its top level (not inside a vmap, scan or cond of its own) and in an order
    that does not depend on the log-probs' values, which holds for every registered loss.
    """
    calls: list[tuple[Samples, jax.Array]] = []

    def record(samples: Samples) -> jax.Array:
        logp = jax.lax.stop_gradient(micro_batched_logprobs(setup, as_model(params), samples, prompt_length,
                                                            micro_batches))
        calls.append((sequences(samples), logp))
        return logp

    loss_of(record)  # only its calls are kept; the loss itself is computed again in the replay
    recorded_sets = [s for s, _ in calls]

    def replay(values: list[jax.Array]):
        queue = list(values)

        def policy_logp(samples: Samples) -> jax.Array:
            value = queue.pop(0)
            if value.shape != samples.tokens.shape[:2]:
                raise RuntimeError("the loss called policy_logp in another order when replayed; micro-batching "
                                   "needs the same calls each time (set config.memory.micro_batches=1).")
            return value

        return loss_of(policy_logp)

    (loss, metrics), cotangents = jax.value_and_grad(replay, has_aux=True)([v for _, v in calls])

    def accumulate(total, part):
        sets, cots = part
        surrogate = lambda p: sum(jnp.sum(policy_logprobs(setup, as_model(p), s, prompt_length) * g)
                                  for s, g in zip(sets, cots))
        grads = jax.grad(surrogate)(params)
        return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    if not calls:  # a loss without policy log-probs has no gradient
        return (loss, metrics), zeros
    grads, _ = jax.lax.scan(accumulate, zeros, sharding.split_micro_batches((recorded_sets, cotangents), micro_batches))
    return (loss, metrics), grads


def optimizer_update(optimizer: optax.GradientTransformation, params, opt_state, grads, hp):
    """Phase 5: θ ← θ − lr·Adam(∇θ) on the float32 master weights `params`, with float32 optimizer
    state and update math (gradients of any dtype are read in float32). Nothing is rounded to a
    low-precision dtype here: an update far below a bfloat16 step (lr 3e-6) still moves θ."""
    params, grads = as_float32(params), as_float32(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    lr = hp["learning_rate"] * hp["lr_scale"]
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state


def anchor_update(kind: str, anchor, params, step, hp, period: int):
    """Phase 6: the anchor rule on float32 master weights. 'ema': θ_anchor ← (1 − η)·θ_anchor + η·θ
    (BOND §6), in float32; 'hard': copy θ every `period` steps (iterative BOND, §5)."""
    if kind == "ema":
        eta = hp["anchor_eta"]
        return jax.tree.map(lambda a, p: (1.0 - eta) * a.astype(jnp.float32) + eta * p.astype(jnp.float32), anchor, params)
    if kind == "hard":
        move = (step + 1) % period == 0
        return jax.tree.map(lambda a, p: jnp.where(move, p, a), anchor, params)
    return anchor


def step_metrics(loss, loss_metrics, grads, drawn: Drawn,
                 kl_ref_estimate: Callable[[str, Samples], jax.Array]) -> dict[str, jax.Array]:
    """Phase 7: the loss's metrics, the gradient norm, and per sample set (policy, anchor) its mean
    reward, mean length and the Monte-Carlo KL(·‖π_ref) estimate mean(log q − log π_ref)."""
    metrics = {**loss_metrics, "loss": loss, "grad_norm": optax.tree.norm(as_float32(grads))}
    for name in ("policy", "anchor"):
        samples = getattr(drawn, name)
        if samples is not None:
            metrics.update({
                f"{name}_reward": jnp.mean(samples.rewards),
                f"{name}_length": jnp.mean(jnp.sum(samples.response_mask, axis=-1)),
                f"{name}_kl_ref_estimate": kl_ref_estimate(name, samples),
            })
    return metrics


# ---------------------------------------------------------------------------------------------
# The step


def make_train_step(setup: Setup) -> Callable[[TrainState, Batch, Fixed, Traced], tuple[TrainState, dict]]:
    """The step (state, batch, fixed, traced) → (state, metrics), the phases above in order.

    Metrics are complete on the steps whose `batch.logging` is set (`bond.train.run` sets it on the
    steps it logs); elsewhere a KL-to-reference estimate whose log-prob pass the loss does not read
    (the algorithm declares what it reads, `Algorithm.reads`) is NaN and its pass skipped."""
    plan, algorithm = setup.plan, setup.algorithm
    optimizer = make_optimizer(setup.config)
    period = int(setup.config.anchor.period)
    micro_batches = micro_batch_count(setup)

    def step(state: TrainState, batch: Batch, fixed: Fixed, traced: Traced) -> tuple[TrainState, dict]:
        hp, prompt_length = traced.hparams, batch.prompts.shape[1]
        key = jax.random.fold_in(traced.seed_key, state.step)
        k_policy, k_anchor, k_ref, k_loss = jax.random.split(key, 4)
        # The policy and anchor as the model computes with them; the master weights stay float32.
        trained_c = compute_params(setup, state.params)
        params_c = model_params(setup, trained_c, fixed.reference)
        anchor_c = model_params(setup, compute_params(setup, state.anchor_params), fixed.reference)
        logp_params = {"reference": fixed.reference, "anchor": anchor_c}

        def draw(params, k, count, source):
            return draw_samples(setup, params, batch.prompts, batch.prompt_mask, k, count, fixed.judges, source,
                                logp_params, algorithm.reads_of(source), micro_batches)

        policy = draw(params_c, k_policy, plan.policy, "policy")
        anchor = draw(anchor_c, k_anchor, plan.anchor, "anchor")
        if traced.reference_samples is not None:  # this batch's rows of the per-prompt reference samples
            reference = jax.tree.map(lambda x: x[batch.prompt_rows], traced.reference_samples)
        else:
            reference = draw(fixed.reference, k_ref, plan.reference, "reference")
        drawn = Drawn(policy, anchor, reference)

        (loss, loss_metrics), grads = loss_and_grad(setup, trained_c, drawn, hp, k_loss, pair_judge_of(setup, fixed.judges),
                                                    prompt_length, state.algo_state, micro_batches, fixed.reference)
        loss_metrics, algo_state = split_algo_state(loss_metrics, state.algo_state)
        params, opt_state = optimizer_update(optimizer, state.params, state.opt_state, grads, hp)
        anchor_params = anchor_update(setup.anchor_kind, state.anchor_params, params, state.step, hp, period)
        first_bad = jnp.where((state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step, state.nonfinite_step)

        # Reference log-probs that only the metrics read are computed on the steps that log them.
        def kl_ref_estimate(name: str, samples: Samples) -> jax.Array:
            if samples.ref_logp is not None:
                return jnp.mean(samples.sampler_logp - samples.ref_logp)
            estimate = lambda: jnp.mean(samples.sampler_logp - micro_batched_logprobs(
                setup, fixed.reference, samples, prompt_length, micro_batches))
            return jax.lax.cond(batch.logging, estimate, lambda: jnp.float32(jnp.nan))

        metrics = step_metrics(loss, loss_metrics, grads, drawn, kl_ref_estimate)
        return TrainState(state.step + 1, params, anchor_params, opt_state, first_bad, algo_state), metrics

    return step


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where each of the step's inputs lives on the mesh (jax.jit's in_shardings, by name)."""

    state: TrainState
    batch: Batch
    fixed: Fixed
    traced: Traced

    def inputs(self) -> tuple:
        return (self.state, self.batch, self.fixed, self.traced)


def compile_train_step(setup: Setup, shardings: StepShardings) -> Callable:
    """jax.jit of the step with its shardings (the successor of pjit); the state is donated.

    With the prompts split over the batch axes (a single run), it is traced under the mesh so that
    every activation is split like them (`sharding.constrain_batch`)."""
    split = shardings.batch.prompts == sharding.batch_sharding(setup.mesh)
    return sharding.jit_sharded(
        make_train_step(setup),
        in_shardings=shardings.inputs(),
        out_shardings=(shardings.state, sharding.replicated(setup.mesh)),
        donate_argnums=(0,),
        activation_mesh=setup.mesh if split else None,
    )
