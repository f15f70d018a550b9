"""The algorithm registry: name → what to sample from which policy, which loss, which anchor rule.

An `Algorithm` is a sampling plan (how many samples per prompt from the policy π, the anchor
π_anchor and the reference π_ref), a loss over those samples, and a default anchor rule. The
online loop (bond/train.py) draws the planned samples, scores them, computes log-probs under
π_ref (and π_anchor) and hands everything to the loss as `LossInputs`; the loss computes the
policy's own log-probs through `inputs.policy_logp` so that they carry the gradient.

A new loss for an experiment is one function and one registration:

    def hinge_bond(inputs):
        logp = inputs.policy_logp(inputs.policy)
        ...
        return loss, metrics

    register(Algorithm("hinge_bond", plan=lambda algo: SamplingPlan(policy=4), loss=hinge_bond))

and then `--config.algorithm=hinge_bond`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from bond import bon, losses
from bond.losses import distribution_matching, policy_gradient, preference, rejection_sft
from bond.losses.wind import VARIANTS as WIND_VARIANTS
from bond.models import preferences_from_rewards


class Samples(NamedTuple):
    """S responses for each of B prompts, scored and with their fixed log-probabilities.

    tokens, attention_mask, response_mask: [B, S, T] (bond/models layout);
    rewards, sampler_logp (log-prob under the policy that drew them), ref_logp: [B, S];
    anchor_logp: [B, S] when the run has an anchor, else zeros.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    rewards: jax.Array
    sampler_logp: jax.Array
    ref_logp: jax.Array
    anchor_logp: jax.Array


class Drawn(NamedTuple):
    """The step's planned samples (`SamplingPlan`): from the policy, the anchor and the reference; None where the plan draws none."""

    policy: Optional[Samples]
    anchor: Optional[Samples]
    reference: Optional[Samples]


class LossInputs(NamedTuple):
    """What a loss sees: samples, the differentiable policy log-prob, traced hyperparameters.

    A sample set's ref_logp / anchor_logp are filled when the algorithm declares that its loss
    reads them (`Algorithm.reads`) or when they are free (the sampler's own log-probs); else None.
    """

    policy_logp: Callable[[Samples], jax.Array]  # Samples [B, S, T] → log π_θ(y) [B, S], differentiable
    policy: Optional[Samples]
    anchor: Optional[Samples]
    reference: Optional[Samples]
    hp: dict[str, jax.Array]  # config.algo's numeric fields, traced
    algo: ml_collections.FrozenConfigDict  # config.algo itself: counts and choices, static
    key: jax.Array  # for tie-breaking
    # Samples [B, S, T] → P[b, i, j] = P(y_i ≻ y_j | x_b) [B, S, S] from the run's pair judge (a
    # preference model); None: the run has none and preferences come from rewards (`preferences`).
    pair_judge: Optional[Callable[[Samples], jax.Array]] = None
    # The algorithm's state carried across steps (`Algorithm.init_state`), None for algorithms without one.
    algo_state: Any = None


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Samples per prompt to draw from the policy, the anchor and the reference at each step.

    The reference never changes, so its samples, rewards and log-probs can be drawn once per
    train prompt and reused whenever the prompt comes round again: `cache_reference` says the
    loss allows that (it only needs *some* fixed set of reference samples per prompt, e.g. for
    quantiles and best-of-N), and config.cache_reference_samples turns it on.
    """

    policy: int = 0
    anchor: int = 0
    reference: int = 0
    cache_reference: bool = True


LossFn = Callable[[LossInputs], tuple[jax.Array, dict[str, jax.Array]]]

# How rewards become pairwise preferences (bond/models/reward.py preferences_from_rewards).
PREFERENCE_KINDS = ("hard", "bradley_terry")
# The fixed log-prob fields of a sample set a loss may read.
FIXED_LOGPROBS = ("ref_logp", "anchor_logp")
SAMPLE_SETS = ("policy", "anchor", "reference")


# The metrics key under which a loss returns its algorithm's next state (`Algorithm.init_state`).
ALGO_STATE = "algo_state"


def split_algo_state(metrics: dict[str, Any], state: Any) -> tuple[dict[str, Any], Any]:
    """(the loss's metrics without its next state, the next state): `state` unchanged when the loss returns none."""
    metrics = dict(metrics)
    return metrics, metrics.pop(ALGO_STATE, state)


@dataclasses.dataclass(frozen=True)
class Knob:
    """A config.algo field: its default, what it means, and the values it allows.

    `check(value)` returns None for an allowed value, else the rule it breaks ("must be > 0").
    """

    default: Any
    doc: str
    check: Callable[[Any], Optional[str]] = lambda value: None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_in(low: float, high: float = math.inf, *, low_open: bool = False, integer: bool = False):
    """A Knob check: a finite number in [low, high] ((low, high] with low_open), an integer if asked."""

    def check(value) -> Optional[str]:
        kind = "an integer" if integer else "a finite number"
        if not _finite(value) or (integer and value != int(value)):
            return f"must be {kind}"
        above = value > low if low_open else value >= low
        if not (above and value <= high):
            what = "an integer " if integer else ""
            low_text = f"> {low:g}" if low_open else f">= {low:g}"
            if high == math.inf:
                return f"must be {what}{low_text}"
            return f"must be {what}in {'(' if low_open else '['}{low:g}, {high:g}]"
        return None

    return check


def one_of(choices: Sequence[str]):
    """A Knob check: one of `choices`."""
    return lambda value: None if value in choices else f"must be one of {tuple(choices)}"


# Every config.algo field, declared once; bond/config_base.py builds config.algo from these
# defaults and each algorithm names the ones it reads (`Algorithm.knobs`), which `validate` checks.
KNOBS: dict[str, Knob] = {
    "n": Knob(8.0, "N of best-of-N", number_in(2, integer=True)),
    "beta": Knob(0.5, "Jeffreys mix: (1−β)·forward + β·backward", number_in(0, 1)),
    "gamma": Knob(0.0, "J-BOND's γ·KL(π‖π_anchor)", number_in(0)),
    "num_samples": Knob(1, "policy samples per prompt", number_in(1, integer=True)),
    "num_ref_samples": Knob(16, "k reference (or anchor) samples per prompt for quantiles (BOND draws max(k, N))",
                            number_in(1, integer=True)),
    "kl_coef": Knob(0.05, "β of REINFORCE's KL(π‖π_ref) penalty", number_in(0)),
    "pref_beta": Knob(0.1, "β of DPO / IPO / SPPO", number_in(0, low_open=True)),
    "wind_eta": Knob(1.0, "WIND step size η", number_in(0, low_open=True)),
    "sppo_eta": Knob(10.0, "iterative SPPO's η: log π_θ − log π_t regresses onto η·(P̂(y ≻ π_t) − ½)",
                     number_in(0, low_open=True)),
    "wind_beta": Knob(0.1, "WIND KL-to-reference strength β", number_in(0)),
    "wind_variant": Knob("square", "WIND loss", one_of(WIND_VARIANTS)),
    "preference": Knob("hard", "how rewards become P(y ≻ y')", one_of(PREFERENCE_KINDS)),
    "target_temperature": Knob(1.0, "GDC++ target P = π_ref·exp(r / τ)", number_in(0, low_open=True)),
    "bonbon_alpha": Knob(0.5, "BoNBoN's SFT weight α", number_in(0, 1)),
}


def default_algo_config() -> ml_collections.ConfigDict:
    """config.algo with every declared knob at its default (`KNOBS`)."""
    return ml_collections.ConfigDict({name: knob.default for name, knob in KNOBS.items()})


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """A registered algorithm: everything the runner needs to know about it, in one declaration.

    plan: config.algo → SamplingPlan (sample counts are static shapes).
    loss: LossInputs → (loss, metrics).
    anchor: the default anchor rule ('none', 'hard' or 'ema'); config.anchor.kind may override
      it for algorithms that use an anchor.
    knobs: the config.algo fields it reads (names in `KNOBS`); `validate` checks each against its
      Knob's rule (`check_config`). A knob not in KNOBS is declared by `extra_knobs` (name → Knob) and added to
      config.algo with its default when the config lacks it.
    reads: the fixed log-prob passes its loss reads, as "<set>.<field>" ("policy.ref_logp",
      "policy.anchor_logp", "reference.ref_logp", ...); the step computes only those (and the free
      ones, the sampler's own log-probs). None: every pass of every set (always correct, slower).
    validate: optional extra config checks across knobs; raise ValueError naming the field.
    needs_on_policy_samples: its gradient estimate assumes samples of the policy that drew them
      (score-function losses: BOND's backward term, J-BOND, REINFORCE, vBoN, GDC++; the regressions
      of WIND and SPPO onto samples of π_t): config validation rejects non-plain sampling for it
      (bond.validation, `bond.sampling.PLAIN_SAMPLING`) unless config.allow_biased_samples.
    init_state: optional () → the algorithm's state carried across steps (a pytree of arrays, e.g.
      GDC++'s running Ẑ): the train state holds it (`TrainState.algo_state`, checkpointed, one per
      member of a population), the loss reads it as `LossInputs.algo_state` and returns the next
      one in its metrics under `ALGO_STATE` (`split_algo_state`).
    """

    name: str
    plan: Callable[[ml_collections.ConfigDict], SamplingPlan]
    loss: LossFn
    anchor: str = "none"
    knobs: tuple[str, ...] = ()
    reads: Optional[tuple[str, ...]] = None
    extra_knobs: Mapping[str, Knob] = dataclasses.field(default_factory=dict)
    validate: Optional[Callable[[ml_collections.ConfigDict], None]] = None
    paper: str = ""
    needs_on_policy_samples: bool = False
    init_state: Optional[Callable[[], Any]] = None

    def __post_init__(self):
        unknown = [k for k in self.knobs if k not in KNOBS and k not in self.extra_knobs]
        if unknown:
            raise ValueError(f"algorithm {self.name!r}: knobs {unknown} are not declared; add them to extra_knobs.")
        for entry in self.reads or ():
            name, _, field = entry.partition(".")
            if name not in SAMPLE_SETS or field not in FIXED_LOGPROBS:
                raise ValueError(f"algorithm {self.name!r}: reads entry {entry!r} is not '<set>.<field>' with set in "
                                 f"{SAMPLE_SETS} and field in {FIXED_LOGPROBS}.")

    def initial_state(self) -> Any:
        """The algorithm's state before the first step (`init_state`), None for algorithms without one."""
        return None if self.init_state is None else self.init_state()

    def reads_of(self, sample_set: str) -> frozenset[str]:
        """The fixed log-prob fields the loss reads of `sample_set`'s samples."""
        if self.reads is None:
            return frozenset(FIXED_LOGPROBS)
        return frozenset(field for name, _, field in (r.partition(".") for r in self.reads) if name == sample_set)

    def with_defaults(self, algo: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """`algo` with this algorithm's extra knobs added at their defaults where missing."""
        algo = ml_collections.ConfigDict(algo)
        for name, knob in self.extra_knobs.items():
            if name not in algo:
                algo[name] = knob.default
        return algo

    def check_config(self, algo: ml_collections.ConfigDict) -> None:
        """Raises ValueError naming the first knob this algorithm reads whose value is not allowed."""
        for name in self.knobs:
            knob = self.extra_knobs.get(name) or KNOBS[name]
            if name not in algo:
                raise ValueError(f"config.algo.{name} is missing; algorithm {self.name!r} reads it ({knob.doc}).")
            problem = knob.check(algo[name])
            if problem:
                raise ValueError(f"config.algo.{name}={algo[name]!r} {problem} ({knob.doc}).")
        if self.validate is not None:
            self.validate(algo)


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Adds `algorithm` to the registry (a later registration under the same name replaces it)."""
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called `name`; a ValueError lists the registered names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"config.algorithm={name!r} is not registered; choose one of {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def names() -> list[str]:
    """The registered algorithm names, sorted."""
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the losses below.


def take_sample(samples: Samples, index: jax.Array) -> Samples:
    """The sample `index[b]` of each prompt, as a group of one: [B, S, ...] → [B, 1, ...]."""

    def take(x):
        idx = index.reshape(index.shape + (1,) * (x.ndim - 1))
        return jnp.take_along_axis(x, idx, axis=1)

    return jax.tree.map(take, samples)


def first(samples: Samples, count: int) -> Samples:
    """The first `count` samples of each prompt."""
    return jax.tree.map(lambda x: x[:, :count], samples)


def policy_logps(inputs: LossInputs, *sets: Samples) -> list[jax.Array]:
    """log π_θ of several sample sets of the same prompts ([B, S_i, T] each) in one differentiated
    pass: [B, S_1], [B, S_2], ...

    The sets are joined along the samples axis, so each prompt is run once for all of them and the
    backward pass makes one gradient contribution per weight instead of one per set. A field is
    joined where every set has it, and None where one lacks it: the sets may differ in which fixed
    log-probs are filled (a policy set has ref_logp, a Best-of-N pick of anchor samples anchor_logp).
    """
    def join(field: str):
        values = [getattr(s, field) for s in sets]
        return None if any(v is None for v in values) else jnp.concatenate(values, axis=1)

    joined = Samples(*(join(field) for field in Samples._fields))
    logp = inputs.policy_logp(joined)
    bounds = list(itertools.accumulate(s.tokens.shape[1] for s in sets))[:-1]
    return jnp.split(logp, bounds, axis=1)


def log_quantiles(samples: Samples, against: Samples) -> jax.Array:
    """Smoothed log p̂_le of each sample's reward among `against`'s rewards (bon.smoothed_log_quantile)."""
    return bon.smoothed_log_quantile(samples.rewards, against.rewards)


def best_of(samples: Samples, n: int, key: jax.Array) -> Samples:
    """The best of the first n samples of each prompt, ties broken uniformly: an exact best-of-n sample."""
    pool = first(samples, n)
    return take_sample(pool, bon.best_index(pool.rewards, key))


# ---------------------------------------------------------------------------------------------
# The paper algorithms.


def _count(algo, field: str) -> int:
    return int(round(float(algo[field])))


def _bond_plan(target: str) -> Callable[[ml_collections.ConfigDict], SamplingPlan]:
    """Policy samples, and max(k, N) samples of `target` ('reference' or 'anchor') for quantiles and BoN."""

    def plan(algo) -> SamplingPlan:
        return SamplingPlan(policy=algo.num_samples, **{target: max(algo.num_ref_samples, _count(algo, "n"))})

    return plan


def _bond_loss(target: str) -> LossFn:
    """Jeffreys BOND towards Best-of-N of `target`: the fixed reference (BOND §4) or, for
    iterative BOND (§5), the moving anchor, which then also takes the reference's place in the
    backward KL. Quantiles come from the target's samples; the forward term's best-of-N sample
    is the best of the first N of them."""

    def loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
        samples = getattr(inputs, target)
        target_logp = inputs.policy.ref_logp if target == "reference" else inputs.policy.anchor_logp
        bon_sample = best_of(samples, _count(inputs.algo, "n"), inputs.key)
        policy_logp, bon_logp = policy_logps(inputs, inputs.policy, bon_sample)
        return losses.jeffreys_bond(
            policy_logp,
            target_logp,
            log_quantiles(inputs.policy, samples),
            bon_logp[:, 0],
            n=inputs.hp["n"],
            beta=inputs.hp["beta"],
        )

    return loss


def _j_bond_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
    anchor = first(inputs.anchor, 2)
    bo2 = best_of(anchor, 2, inputs.key)
    policy_logp, bo2_logp = policy_logps(inputs, inputs.policy, bo2)
    return losses.j_bond(
        policy_logp,
        inputs.policy.anchor_logp,
        inputs.policy.rewards,
        anchor.rewards,
        bo2_logp[:, 0],
        beta=inputs.hp["beta"],
        gamma=inputs.hp["gamma"],
    )


def preferences(inputs: LossInputs, samples: Samples) -> jax.Array:
    """P[b, i, j] = P(y_i ≻ y_j | x_b) among each prompt's samples, without gradient: from the run's
    pair judge when it has one, else from the rewards as config.algo.preference says ('hard':
    1[r_i > r_j] + ½·1[r_i = r_j], 'soft': σ(r_i − r_j))."""
    if inputs.pair_judge is not None:
        return jax.lax.stop_gradient(inputs.pair_judge(samples))
    return preferences_from_rewards(samples.rewards, kind=inputs.algo.preference)


def mean_decidedness(pref: jax.Array) -> jax.Array:
    """Mean |P_ij − ½| over i ≠ j of [B, S, S] preferences: 0 when indifferent, ½ when every pair is decided."""
    group = pref.shape[-1]
    off = 1.0 - jnp.eye(group, dtype=pref.dtype)
    return jnp.sum(jnp.abs(pref - 0.5) * off) / jnp.maximum(jnp.sum(off) * pref.shape[0], 1.0)


def _wind_loss(*, iteration_anchor: bool) -> LossFn:
    """WIND (bond.losses.wind) on a prompt's S samples of π_t, fitting one exact step from π_t.

    iteration_anchor=True is WIND as published (Yang et al. 2024): π_t is the anchor, held fixed
    for an iteration of config.anchor.period steps (a hard anchor), the samples are drawn from it
    and log π_t is its log-probability; the parameters fit the exact mirror-descent step from π_t
    (`bond.tabular.wind_step`, with the paper's η and β) and the next iteration starts from the
    result. False is one-step self-play: π_t = stop_gradient(π_θ) on the policy's own samples. Its
    expected gradient is then parallel to the policy gradient of E_π[W_π] − β·KL(π‖π_ref) for every
    η, so under Adam η has no effect: a different method (design notes, ALGORITHMS.md §4).
    """

    def loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
        samples = inputs.anchor if iteration_anchor else inputs.policy
        logp = inputs.policy_logp(samples)
        logp_t = samples.anchor_logp if iteration_anchor else jax.lax.stop_gradient(logp)
        pref = preferences(inputs, samples)
        value, metrics = losses.wind(
            logp,
            logp_t,
            samples.ref_logp,
            pref,
            eta=inputs.hp["wind_eta"],
            beta=inputs.hp["wind_beta"],
            variant=inputs.algo.wind_variant,
        )
        return value, {**metrics, "preference_decidedness": mean_decidedness(pref)}

    return loss


def _sppo_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
    """Iterative SPPO (Wu et al. 2024, arXiv 2405.00675, Alg. 1): on S samples of π_t (the anchor,
    held fixed for an iteration of config.anchor.period steps), mean of
    [log π_θ(y_i) − log π_t(y_i) − η·(P̂(y_i ≻ π_t) − ½)]², P̂ the mean of P(y_i ≻ y_j) over the
    prompt's other samples, an unbiased estimate of y_i's win rate against π_t (the paper averages
    over all K samples, y_i's own ½ included, which shrinks the estimate towards ½ by (K−1)/K).

    This is WIND's single-sample ('sppo') loss without a reference pull (β = 0, so κ = η): its
    expected gradient is that of E_{π_t}[(log π_θ − log π_t − η(W_{π_t} − ½))²], the paper's
    regression with log Z_t replaced by its first-order value η/2.
    """
    samples = inputs.anchor
    logp_t = samples.anchor_logp
    pref = preferences(inputs, samples)
    value, metrics = losses.wind(inputs.policy_logp(samples), logp_t, logp_t, pref, eta=inputs.hp["sppo_eta"],
                                 beta=jnp.zeros_like(inputs.hp["sppo_eta"]), variant="sppo")
    return value, {**metrics, "preference_decidedness": mean_decidedness(pref)}


def _reinforce_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
    return policy_gradient.reinforce(
        inputs.policy_logp(inputs.policy), inputs.policy.ref_logp, inputs.policy.rewards, beta=inputs.hp["kl_coef"]
    )


def _chosen_rejected(samples: Samples, key: jax.Array) -> tuple[Samples, Samples]:
    """Best and worst of each prompt's samples by reward, ties broken at random."""
    k_best, k_worst = jax.random.split(key)
    chosen = take_sample(samples, bon.best_index(samples.rewards, k_best))
    rejected = take_sample(samples, bon.best_index(-samples.rewards, k_worst))
    return chosen, rejected


def _pairwise_loss(fn, *, mask_ties: bool) -> LossFn:
    """Online DPO / IPO / sppo_hard: chosen and rejected are the best and worst of the policy's samples.

    mask_ties: a prompt whose best and worst rewards are equal carries no preference, so its pair
    has weight 0 (DPO, IPO; as BoNBoN's IPO term does); else the tie-break picks a direction at random.
    """

    def loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
        chosen, rejected = _chosen_rejected(inputs.policy, inputs.key)
        decided = (chosen.rewards[:, 0] > rejected.rewards[:, 0]).astype(chosen.ref_logp.dtype)
        return fn(
            inputs.policy_logp(chosen)[:, 0],
            inputs.policy_logp(rejected)[:, 0],
            chosen.ref_logp[:, 0],
            rejected.ref_logp[:, 0],
            beta=inputs.hp["pref_beta"],
            weights=decided if mask_ties else None,
        )

    return loss


def _gdc_log_target(samples: Samples, hp) -> jax.Array:
    """log P(y) = log π_ref(y) + r(y)/τ: the KL-control target π_ref·exp(r/τ) (Korbak et al. 2022)."""
    return samples.ref_logp + samples.rewards / hp["target_temperature"]


def _gdcpp_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
    """GDC++ on policy samples (q = π) towards p(y|x) ∝ P(x, y) = π_ref(y|x)·exp(r(x, y)/τ), with one
    running Ẑ = mean of P/q over every sample of the previous steps (Korbak et al. 2022;
    experiments/distribution_matching.py), carried in the train state; the first step, with no
    previous samples, uses its own.

    Ẑ from the same samples the gradient uses would bias the gradient's direction (it is correlated
    with them: relative error 0.44 at 4 samples per prompt); a Ẑ from earlier batches does not. The
    targets are per prompt, with normalizers Z_x, and one pooled Ẑ estimates their mean Z̄ over the
    prompts seen: the expected gradient, for B prompts of S samples, is

        (1/B)·Σ_x (Z_x/Ẑ)·∇KL(p_x‖π_θ(·|x)),

    the gradient of the prompts' KLs weighted by Z_x/Ẑ. Its minimizer is unchanged (π_θ(·|x) = p_x
    for every x); only the prompts' weights along the way differ from a plain mean. A running Ẑ_x
    per prompt would weight them equally but needs a state the size of the prompt set and still
    leans on few samples per prompt in early epochs; the pooled one is what the papers use.
    """
    proposal_logp = inputs.policy.sampler_logp
    log_target = _gdc_log_target(inputs.policy, inputs.hp)
    before = inputs.algo_state
    after = distribution_matching.running_log_z(before, proposal_logp, log_target)
    log_z = jnp.where(before.count > 0, distribution_matching.log_z_estimate(before),
                      distribution_matching.log_z_estimate(after))
    loss, metrics = distribution_matching.gdc_pp(inputs.policy_logp(inputs.policy), proposal_logp, log_target,
                                                 log_z=log_z)
    return loss, {**metrics, "log_z_estimate": log_z, ALGO_STATE: after}


def _raft_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
    return rejection_sft.best_of_n_sft(inputs.policy_logp(inputs.policy), inputs.policy.rewards, key=inputs.key)


def _bonbon_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
    n = _count(inputs.algo, "n")
    ref = first(inputs.reference, n)
    return rejection_sft.bonbon(
        inputs.policy_logp(ref), ref.ref_logp, ref.rewards, alpha=inputs.hp["bonbon_alpha"],
        beta=rejection_sft.bonbon_beta(n), key=inputs.key,
    )


def _vbon_loss(inputs: LossInputs) -> tuple[jax.Array, dict]:
    return policy_gradient.vbon(
        inputs.policy_logp(inputs.policy),
        inputs.policy.ref_logp,
        log_quantiles(inputs.policy, inputs.reference),
        n=inputs.hp["n"],
    )


def _need_pairs(algo) -> None:
    if algo.num_samples < 2:
        raise ValueError(f"config.algo.num_samples={algo.num_samples} must be at least 2 for pairwise losses.")


BOND = "arXiv 2407.14622 (Sessa et al. 2024)"
_policy_plan = lambda algo: SamplingPlan(policy=algo.num_samples)

register(Algorithm(
    "bond", needs_on_policy_samples=True, plan=_bond_plan("reference"), loss=_bond_loss("reference"),
    knobs=("n", "beta", "num_samples", "num_ref_samples"), reads=("policy.ref_logp",), paper=BOND + ", §4",
))
register(Algorithm(
    "iterative_bond", needs_on_policy_samples=True, plan=_bond_plan("anchor"), loss=_bond_loss("anchor"), anchor="hard",
    knobs=("n", "beta", "num_samples", "num_ref_samples"), reads=("policy.anchor_logp",), paper=BOND + ", §5",
))
register(Algorithm(
    "j_bond", needs_on_policy_samples=True, plan=lambda algo: SamplingPlan(policy=algo.num_samples, anchor=2), loss=_j_bond_loss, anchor="ema",
    knobs=("beta", "gamma", "num_samples"), reads=("policy.anchor_logp",), paper=BOND + ", §6",
))
WIND = "arXiv 2410.20727 (Yang et al. 2024)"
_WIND_KNOBS = ("num_samples", "wind_eta", "wind_beta", "wind_variant", "preference")
register(Algorithm(
    "wind", needs_on_policy_samples=True, plan=lambda algo: SamplingPlan(anchor=algo.num_samples), loss=_wind_loss(iteration_anchor=True),
    anchor="hard", validate=_need_pairs, knobs=_WIND_KNOBS, reads=("anchor.anchor_logp", "anchor.ref_logp"),
    paper=WIND + ": π_t an anchor held for an iteration of config.anchor.period steps",
))
register(Algorithm(
    "wind_self_play", needs_on_policy_samples=True, plan=_policy_plan, loss=_wind_loss(iteration_anchor=False), validate=_need_pairs,
    knobs=_WIND_KNOBS, reads=("policy.ref_logp",),
    paper=WIND + "'s losses with π_t = stop_gradient(π_θ): one-step self-play, not the paper's method",
))
register(Algorithm(
    "reinforce", needs_on_policy_samples=True, plan=_policy_plan, loss=_reinforce_loss, knobs=("num_samples", "kl_coef"), reads=("policy.ref_logp",),
    paper="RLOO: Ahmadian et al. 2024, arXiv 2402.14740",
))
for _name, _fn, _mask_ties, _paper in (
    ("dpo", preference.dpo, True, "arXiv 2305.18290 (online: samples of the policy)"),
    ("ipo", preference.ipo, True, "arXiv 2310.12036 (online)"),
    ("sppo_hard", preference.sppo_hard, False,
     "arXiv 2405.00675 with hard labels and π_ref in place of π_t (TRL's sppo_hard), online"),
):
    register(Algorithm(
        _name, plan=_policy_plan, loss=_pairwise_loss(_fn, mask_ties=_mask_ties), validate=_need_pairs, knobs=("num_samples", "pref_beta"),
        reads=("policy.ref_logp",), paper=_paper,
    ))
register(Algorithm(
    "sppo", needs_on_policy_samples=True, plan=lambda algo: SamplingPlan(anchor=algo.num_samples), loss=_sppo_loss, anchor="hard",
    validate=_need_pairs, knobs=("num_samples", "sppo_eta", "preference"), reads=("anchor.anchor_logp",),
    paper="arXiv 2405.00675 (Wu et al. 2024), Alg. 1: π_t an anchor refreshed every config.anchor.period steps",
))
register(Algorithm(
    "gdcpp", needs_on_policy_samples=True, plan=_policy_plan, loss=_gdcpp_loss, knobs=("num_samples", "target_temperature"),
    reads=("policy.ref_logp",), paper="arXiv 2206.00761 (Korbak et al. 2022)",
    init_state=distribution_matching.init_log_z_state,
))
register(Algorithm(
    "raft", plan=_policy_plan, loss=_raft_loss, validate=_need_pairs, knobs=("num_samples",), reads=(),
    paper="arXiv 2304.06767 (Dong et al. 2023)",
))
register(Algorithm(
    "bonbon", plan=lambda algo: SamplingPlan(reference=_count(algo, "n")), loss=_bonbon_loss,
    knobs=("n", "bonbon_alpha"), reads=("reference.ref_logp",), paper="arXiv 2406.00832 (Gui et al. 2024)",
))
register(Algorithm(
    "vbon", needs_on_policy_samples=True, plan=lambda algo: SamplingPlan(policy=algo.num_samples, reference=algo.num_ref_samples), loss=_vbon_loss,
    knobs=("n", "num_samples", "num_ref_samples"), reads=("policy.ref_logp",), paper="arXiv 2407.06057 (Amini et al. 2024)",
))
