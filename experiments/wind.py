"""Experiment 8 — WIND (Yang et al. 2024, "Faster WIND", arXiv 2410.20727).

(a) Bandit. K responses with a reward, a reference π_ref and hard preferences
P(y ≻ y') = 1[r > r'] + ½·1[r = r']. The exact WIND step (bond.tabular.wind_step)

    log π_{t+1} = [log π_t + ηβ·log π_ref + η·W_{π_t}] / (1 + ηβ) − log Z_t

is magnetic mirror descent on the β-regularized win-rate game. Theory gives two rates:
  - the global bound of magnetic mirror descent (Sokota et al. 2023, arXiv 2206.05825, Thm 3.4),
    KL(π*‖π_{t+1}) <= KL(π*‖π_t) / (1 + ηβ), proved for η small enough (η <= β/L²);
  - the exact asymptotic rate: the spectral radius of the step's Jacobian at π*. Writing
    P = ½·11ᵀ + A with A antisymmetric, the Jacobian is (I + η·A·diag(π*)·(I − 1π*ᵀ)) / (1 + ηβ),
    whose eigenvalues are (1 + iηω)/(1 + ηβ) with ω real, so the log-probability error contracts
    by max|1 + iηω| / (1 + ηβ) >= 1/(1 + ηβ) per step (and KL, quadratic in it, by its square).
Measured: the per-step contraction of max|log π_t − log π*| and of KL(π*‖π_t) for several η.
Then each sample-based loss of bond.losses.wind ('square', 'sppo', 'kl') is run on the same
bandit: every outer step t fits softmax logits θ to one step from π_t by Adam on fresh sampled
batches y ~ π_t (groups of S samples), and we measure TV(π_t^loss, π_t^exact) to the exact
iterates and the one-step fitting error TV(π_{t+1}^loss, wind_step(π_t^loss)).

(b) Language task. WIND (square, sppo, kl) against J-BOND and iterative SPPO through the runner, as
published (WIND and SPPO hold π_t fixed for an iteration of hard-anchor steps), on the toy language
with exact evaluation, each with the seeds of `common.seeds` (one population per algorithm): win
rate against π_ref and reward, against the number of samples drawn (the algorithm's sampling plan,
bond/algorithms.py, times the batch size) and against wall-clock (steps × the measured seconds per
train step, compile excluded: the step is compiled ahead of time with `jit(...).lower(...).compile()`
and only the calls of the compiled step are timed, the algorithms' steps interleaved so that load
changes hit all alike), and against KL(π‖π_ref). At matched KL (the paper's comparison): within the
lowest KL every run reaches, each algorithm's win rate there, and the samples and seconds every
algorithm needs to reach it without leaving that KL budget (`within_kl_budget`).

    python -m experiments.wind [--quick] [--out DIR]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
import optax
from jax.typing import ArrayLike

from bond import algorithms, tabular
from bond.context import build_context
from bond.losses.wind import VARIANTS, wind as wind_loss
from experiments import common

NAME = "wind"

BANDIT_SIZE = 8
BANDIT_SEED = 0
BANDIT_BETA = 0.2
RATE_ETAS = (0.25, 0.5, 1.0, 2.0)
TRACK_ETA = 1.0


# ---------------------------------------------------------------------------------------------
# (a) The bandit


class Bandit(NamedTuple):
    """A finite support: log π_ref [K], rewards [K] and hard preferences P [K, K]."""

    ref_log_probs: jax.Array
    rewards: jax.Array
    pref: jax.Array


def make_bandit(num_responses: int, seed: int) -> Bandit:
    """π_ref = softmax of standard normal logits, rewards standard normal (distinct almost surely),
    P_ij = 1[r_i > r_j] + ½·1[r_i = r_j]."""
    if num_responses < 2:
        raise ValueError(f"num_responses must be at least 2, got {num_responses}.")
    k_ref, k_reward = jax.random.split(jax.random.PRNGKey(seed))
    ref_log_probs = jax.nn.log_softmax(jax.random.normal(k_ref, (num_responses,)))
    rewards = jax.random.normal(k_reward, (num_responses,))
    diff = rewards[:, None] - rewards[None, :]
    pref = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    return Bandit(ref_log_probs, rewards, pref)


def exact_iterates(bandit: Bandit, *, eta: float, beta: float, steps: int) -> jax.Array:
    """[steps + 1, K] log π_t of the exact WIND iteration from π_0 = π_ref."""

    def body(log_pi, _):
        nxt = tabular.wind_step(log_pi, bandit.ref_log_probs, bandit.pref, eta=eta, beta=beta)
        return nxt, nxt

    _, path = jax.lax.scan(body, bandit.ref_log_probs, None, length=steps)
    return jnp.concatenate([bandit.ref_log_probs[None], path])


def local_rate(bandit: Bandit, equilibrium_log_probs: ArrayLike, *, eta: float, beta: float) -> float:
    """Spectral radius of the exact step's Jacobian at π* (logits → normalized log-probs): the
    asymptotic per-step contraction of the log-probability error."""
    step = lambda z: tabular.wind_step(jax.nn.log_softmax(z), bandit.ref_log_probs, bandit.pref, eta=eta, beta=beta)
    jacobian = np.asarray(jax.jacfwd(step)(jnp.asarray(equilibrium_log_probs)), np.float64)
    return float(np.max(np.abs(np.linalg.eigvals(jacobian))))


def kl(p_log: ArrayLike, q_log: ArrayLike) -> jax.Array:
    """KL(p‖q) over the last axis from log-probabilities."""
    p_log, q_log = jnp.asarray(p_log), jnp.asarray(q_log)
    return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def total_variation(p_log: ArrayLike, q_log: ArrayLike) -> jax.Array:
    """TV(p, q) = ½ Σ |p − q| over the last axis from log-probabilities."""
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(jnp.asarray(p_log)) - jnp.exp(jnp.asarray(q_log))), axis=-1)


def measured_rate(errors: ArrayLike, floor: float) -> float:
    """Asymptotic per-step contraction: exp(slope) of a least-squares line through log(error) over
    the second half of the steps whose error is above `floor` (float32 round-off lies below it;
    the first half holds the transient before the slowest mode dominates)."""
    errors = np.asarray(errors, np.float64)
    above = np.flatnonzero(errors > floor)
    last = above[-1] if above.size else -1
    steps = np.arange(last // 2, last + 1)
    if steps.size < 3:
        raise ValueError(f"fewer than 3 steps with error above floor={floor}; lower it or run more steps.")
    slope = np.polyfit(steps, np.log(errors[steps]), 1)[0]
    return float(np.exp(slope))


def rate_table(bandit: Bandit, etas: tuple[float, ...], beta: float, steps: int) -> dict[str, Any]:
    """For each η: the theory rates and the measured contraction of the exact iteration."""
    equilibrium = tabular.wind_equilibrium(bandit.ref_log_probs, bandit.pref, beta=beta, eta=1.0, num_steps=3000)
    rows = []
    for eta in etas:
        path = exact_iterates(bandit, eta=eta, beta=beta, steps=steps)
        log_error = jnp.max(jnp.abs(path - equilibrium), axis=-1)
        kl_error = kl(equilibrium, path)
        local = local_rate(bandit, equilibrium, eta=eta, beta=beta)
        rows.append(
            {
                "eta": eta,
                "mmd_kl_bound": 1.0 / (1.0 + eta * beta),
                "local_rate": local,
                "local_rate_kl": local**2,
                "measured_log_error_rate": measured_rate(log_error, floor=1e-5),
                "measured_kl_rate": measured_rate(kl_error, floor=1e-6),
                "log_error": np.asarray(log_error).tolist(),
                "kl_to_equilibrium": np.asarray(kl_error).tolist(),
                "final_residual": float(
                    tabular.equilibrium_residual(path[-1], bandit.ref_log_probs, bandit.pref, beta=beta)
                ),
            }
        )
    residual = float(tabular.equilibrium_residual(equilibrium, bandit.ref_log_probs, bandit.pref, beta=beta))
    return {"beta": beta, "equilibrium": np.exp(np.asarray(equilibrium)).tolist(), "equilibrium_residual": residual,
            "rows": rows}


def sampled_iterates(
    bandit: Bandit,
    key: jax.Array,
    variant_index: ArrayLike,
    *,
    eta: float,
    beta: float,
    outer_steps: int,
    inner_steps: int,
    groups: int,
    group_size: int,
    learning_rate: float,
) -> jax.Array:
    """[outer_steps + 1, K] log π_t when each WIND step is fitted by the sampled loss VARIANTS[variant_index].

    Outer step t: π_t = softmax(θ_t) is frozen as the sampler; θ starts at θ_t and takes
    `inner_steps` Adam steps (learning rate cosine-decayed to 0, fresh optimizer state) on the
    loss of `groups` × `group_size` fresh samples of π_t per inner step; π_{t+1} = softmax(θ).
    The variant is a traced index (lax.switch), so every variant and seed share one program.
    """
    schedule = optax.cosine_decay_schedule(learning_rate, inner_steps)
    optimizer = optax.adam(schedule)
    ref, pref = bandit.ref_log_probs, bandit.pref

    def loss_fn(theta, log_pi_t, idx):
        args = (jax.nn.log_softmax(theta)[idx], log_pi_t[idx], ref[idx], pref[idx[:, :, None], idx[:, None, :]])
        branches = [lambda a, v=v: wind_loss(*a, eta=eta, beta=beta, variant=v)[0] for v in VARIANTS]
        return jax.lax.switch(variant_index, branches, args)

    def inner(carry, k):
        theta, opt_state, log_pi_t = carry
        idx = jax.random.categorical(k, log_pi_t, shape=(groups, group_size))
        grads = jax.grad(loss_fn)(theta, log_pi_t, idx)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        return (optax.apply_updates(theta, updates), opt_state, log_pi_t), None

    def outer(theta, k):
        log_pi_t = jax.nn.log_softmax(theta)
        (theta, _, _), _ = jax.lax.scan(inner, (theta, optimizer.init(theta), log_pi_t), jax.random.split(k, inner_steps))
        return theta, jax.nn.log_softmax(theta)

    _, path = jax.lax.scan(outer, ref, jax.random.split(key, outer_steps))
    return jnp.concatenate([ref[None], path])


def sampled_paths(bandit: Bandit, seeds: tuple[int, ...], variants: tuple[str, ...], **kwargs) -> jax.Array:
    """[len(variants), len(seeds), T + 1, K] log π_t of `sampled_iterates`, one vmapped program."""
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    index = jnp.asarray([VARIANTS.index(v) for v in variants])
    per_seed = jax.vmap(lambda k, i: sampled_iterates(bandit, k, i, **kwargs), in_axes=(0, None))
    return jax.jit(jax.vmap(per_seed, in_axes=(None, 0)))(keys, index)


def tracking(bandit: Bandit, seeds: tuple[int, ...], *, eta: float, beta: float, outer_steps: int,
             inner_steps: int, groups: int, group_size: int, learning_rate: float) -> dict[str, Any]:
    """Each sampled loss against the exact iterates, for every seed."""
    exact = exact_iterates(bandit, eta=eta, beta=beta, steps=outer_steps)
    equilibrium = tabular.wind_equilibrium(bandit.ref_log_probs, bandit.pref, beta=beta, eta=1.0, num_steps=3000)
    all_paths = sampled_paths(bandit, seeds, VARIANTS, eta=eta, beta=beta, outer_steps=outer_steps,
                              inner_steps=inner_steps, groups=groups, group_size=group_size,
                              learning_rate=learning_rate)
    step = lambda lp: tabular.wind_step(lp, bandit.ref_log_probs, bandit.pref, eta=eta, beta=beta)
    result: dict[str, Any] = {"exact_tv_to_equilibrium": np.asarray(total_variation(exact, equilibrium)).tolist()}
    for variant, paths in zip(VARIANTS, all_paths):  # paths [seeds, T + 1, K]
        one_step = jax.vmap(jax.vmap(step))(paths[:, :-1])
        result[variant] = {
            "tv_to_exact": np.asarray(total_variation(paths, exact[None])).tolist(),
            "tv_to_equilibrium": np.asarray(total_variation(paths, equilibrium)).tolist(),
            "one_step_tv": np.asarray(total_variation(paths[:, 1:], one_step)).tolist(),
            "final_probs": np.exp(np.asarray(paths[:, -1])).tolist(),
        }
    return result


# ---------------------------------------------------------------------------------------------
# (b) The language task


LANGUAGE_SPECS = {
    "wind_square": "wind.py:square",
    "wind_sppo": "wind.py:sppo",
    "wind_kl": "wind.py:kl",
    "j_bond": "j_bond.py",
    "sppo": "sppo.py",
}
QUICK_LABELS = ("wind_square",)  # each algorithm is its own program (two compiles with its timing): one in quick mode
METRICS = ("eval/win_rate_vs_ref", "eval/reward", "eval/kl_policy_ref")


def language_configs(quick: bool) -> dict[str, ml_collections.ConfigDict]:
    """label → config of every language run, each algorithm with every seed of `common.seeds` (the
    seeds of one algorithm train as one population); the full budget evaluates every 25 of 300 steps."""
    labels = QUICK_LABELS if quick else tuple(LANGUAGE_SPECS)
    overrides = {"steps": 10, "eval.every": 10, "checkpoint.every": 10} if quick else {"eval.every": 25}
    return {common.seed_label(label, seed): common.config(LANGUAGE_SPECS[label], quick, **overrides, seed=seed,
                                                          num_devices=1)
            for label in labels for seed in common.seeds(quick)}


def samples_per_step(config: ml_collections.ConfigDict) -> int:
    """Responses drawn per train step: the algorithm's sampling plan (policy + anchor + reference
    samples per prompt) times the prompts per step. Cached reference samples are drawn once per
    train prompt and counted here at every step (an upper bound; none of the compared algorithms has any)."""
    plan = algorithms.get_algorithm(config.algorithm).plan(config.algo)
    return int((plan.policy + plan.anchor + plan.reference) * config.batch_size)


def step_timer(config: ml_collections.ConfigDict):
    """A closure that runs one more train step of `config` and returns its wall-clock seconds, and
    the seconds it took to compile the step.

    The runner's step (the run context's `step`, as `train.run` calls it) is compiled ahead of time with
    `.lower(...).compile()`, so the timed calls exclude compilation; each call is timed with
    time.perf_counter around the call and jax.block_until_ready on its outputs.
    """
    context = build_context(config, log=lambda _: None)
    start = time.perf_counter()
    step_fn = context.step.lower(context.state, context.batch(0), context.fixed, context.traced).compile()
    compile_s = time.perf_counter() - start
    position = {"step": 0, "state": context.state}

    def timed_step() -> float:
        batch = context.batch(position["step"])
        start = time.perf_counter()
        new_state, metrics = step_fn(position["state"], batch, context.fixed, context.traced)
        jax.block_until_ready((new_state, metrics))
        position.update(step=position["step"] + 1, state=new_state)
        return time.perf_counter() - start

    return timed_step, compile_s


def seconds_per_step(configs: dict[str, ml_collections.ConfigDict], timed_steps: int,
                     warmup_steps: int = 2) -> dict[str, dict[str, float]]:
    """label → median wall-clock seconds of one train step (compile excluded) and compile seconds.

    The steps of the different configs are interleaved (one step of each in turn, `timed_steps`
    rounds after `warmup_steps`), so a change in machine load hits every algorithm alike.
    """
    timers = {label: step_timer(c) for label, c in configs.items()}
    times: dict[str, list[float]] = {label: [] for label in configs}
    for round_ in range(warmup_steps + timed_steps):
        for label, (timed_step, _) in timers.items():
            seconds = timed_step()
            if round_ >= warmup_steps:
                times[label].append(seconds)
    return {label: {"step_s": float(np.median(times[label])), "compile_s": timers[label][1],
                    "step_s_all": times[label]} for label in configs}


def first_crossing(x: ArrayLike, values: ArrayLike, target: float) -> float | None:
    """The x at which `values` first reaches `target` (linear interpolation), None if never."""
    x, values = np.asarray(x, np.float64), np.asarray(values, np.float64)
    above = np.flatnonzero(values >= target)
    if above.size == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(x[0])
    frac = (target - values[i - 1]) / (values[i] - values[i - 1])
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def crossing_value(x: ArrayLike, y: ArrayLike, x0: float) -> float:
    """y where x first reaches x0, interpolated linearly between the two evaluations around it (x
    must reach x0)."""
    x = np.asarray(x, np.float64)
    if not np.any(x >= x0):
        raise ValueError(f"the curve never reaches {x0}")
    return float(truncated_at(x, x0, y)[0][-1])


def truncated_at(x: ArrayLike, limit: float, *series: ArrayLike) -> list[np.ndarray]:
    """Each of `series` (curves over the same evaluations as x) up to where x first reaches `limit`,
    ending at that point (linear interpolation between the two evaluations around it); whole when x
    never reaches it."""
    x = np.asarray(x, np.float64)
    series = [np.asarray(y, np.float64) for y in series]
    above = np.flatnonzero(x >= limit)
    if above.size == 0:
        return series
    i = int(above[0])
    if i == 0:
        return [y[:1] for y in series]
    frac = (limit - x[i - 1]) / (x[i] - x[i - 1])
    return [np.append(y[:i], y[i - 1] + frac * (y[i] - y[i - 1])) for y in series]


def run_curves(history: list[dict], config: ml_collections.ConfigDict, timing: dict[str, float]) -> dict[str, Any]:
    """One run's evaluations against steps, samples drawn and seconds (steps × the measured step time)."""
    steps, _ = common.series(history, METRICS[0])
    per_step = samples_per_step(config)
    return {
        "steps": steps.tolist(),
        "samples_per_step": per_step,
        "samples": (steps * per_step).tolist(),
        "seconds_per_step": timing["step_s"],
        "seconds": (steps * timing["step_s"]).tolist(),
        **{key.split("/")[1]: common.series(history, key)[1].tolist() for key in METRICS},
    }


def common_targets(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The points every run reaches, so that all runs are compared at the same place:
    - target_win_rate: the lowest final win rate;
    - equal_samples / equal_seconds: the fewest samples / seconds any run trained for;
    - equal_kl: the lowest KL(π‖π_ref) any run ends at, and matched_kl_win_rate: the lowest win rate
      any run has when its KL first reaches equal_kl, the common win rate at matched KL."""
    equal_kl = min(max(r["kl_policy_ref"]) for r in runs.values())
    return {
        "target_win_rate": min(r["win_rate_vs_ref"][-1] for r in runs.values()),
        "equal_samples": min(r["samples"][-1] for r in runs.values()),
        "equal_seconds": min(r["seconds"][-1] for r in runs.values()),
        "equal_kl": equal_kl,
        "matched_kl_win_rate": min(crossing_value(r["kl_policy_ref"], r["win_rate_vs_ref"], equal_kl)
                                   for r in runs.values()),
    }


def run_summary(r: dict[str, Any], targets: dict[str, float]) -> dict[str, float]:
    """One run's numbers at the common targets. The matched-KL cost is the samples and seconds to first
    reach matched_kl_win_rate on the part of the run where KL(π‖π_ref) is still below equal_kl: the
    cost of the win rate every run reaches within the same KL budget (it exists for every run, because
    its win rate where its KL reaches equal_kl is at least that target)."""
    summary = {
        "final_win_rate": r["win_rate_vs_ref"][-1], "final_reward": r["reward"][-1],
        "final_kl": r["kl_policy_ref"][-1],
        "samples_to_target": first_crossing(r["samples"], r["win_rate_vs_ref"], targets["target_win_rate"]),
        "seconds_to_target": first_crossing(r["seconds"], r["win_rate_vs_ref"], targets["target_win_rate"]),
        "win_rate_at_equal_kl": crossing_value(r["kl_policy_ref"], r["win_rate_vs_ref"], targets["equal_kl"]),
        "reward_at_equal_kl": crossing_value(r["kl_policy_ref"], r["reward"], targets["equal_kl"]),
    }
    for name, x0 in (("samples", targets["equal_samples"]), ("seconds", targets["equal_seconds"])):
        for metric in ("win_rate_vs_ref", "reward", "kl_policy_ref"):
            summary[f"{metric}_at_equal_{name}"] = float(np.interp(x0, r[name], r[metric]))
    win, samples, seconds = truncated_at(r["kl_policy_ref"], targets["equal_kl"], r["win_rate_vs_ref"],
                                         r["samples"], r["seconds"])
    summary["samples_to_matched_kl_win_rate"] = first_crossing(samples, win, targets["matched_kl_win_rate"])
    summary["seconds_to_matched_kl_win_rate"] = first_crossing(seconds, win, targets["matched_kl_win_rate"])
    return summary


def language_results(histories: dict[str, list[dict]], configs: dict[str, ml_collections.ConfigDict],
                     timings: dict[str, dict[str, float]], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Each run's curves and its numbers at targets common to all runs of all seeds (`common_targets`),
    and those numbers per algorithm as mean ± standard error over the seeds. Seconds use the step time
    measured for the algorithm (the seeds share its program)."""
    bases = [label for label in LANGUAGE_SPECS if label in timings]
    runs = {common.seed_label(base, seed): run_curves(histories[common.seed_label(base, seed)],
                                                       configs[common.seed_label(base, seed)], timings[base])
            for base in bases for seed in seeds}
    targets = common_targets(runs)
    summaries = {label: run_summary(r, targets) for label, r in runs.items()}
    return {**targets, "seeds": list(seeds), "timings": timings, "runs": runs, "summaries": summaries,
            "across_seeds": common.across_seeds(summaries, bases, seeds),
            "within_kl_budget": within_kl_budget(runs, summaries, bases, seeds, targets["equal_kl"])}


def within_kl_budget(runs: dict[str, dict], summaries: dict[str, dict], bases: list[str], seeds: tuple[int, ...],
                     kl_budget: float) -> dict[str, Any]:
    """The cost of each algorithm's win rate at matched KL, for every algorithm: for each base B, the
    level w_B = B's lowest win rate over seeds where its KL(π‖π_ref) reaches `kl_budget`; then for
    every algorithm, how many of its seeds reach w_B before their KL exceeds the budget, and the
    samples and seconds they take (mean ± standard error when every seed reaches it)."""
    out = {}
    for level_of in bases:
        level = min(summaries[common.seed_label(level_of, s)]["win_rate_at_equal_kl"] for s in seeds)
        costs = {}
        for base in bases:
            per_seed = {"samples": [], "seconds": []}
            for seed in seeds:
                r = runs[common.seed_label(base, seed)]
                win, samples, seconds = truncated_at(r["kl_policy_ref"], kl_budget, r["win_rate_vs_ref"],
                                                     r["samples"], r["seconds"])
                per_seed["samples"].append(first_crossing(samples, win, level))
                per_seed["seconds"].append(first_crossing(seconds, win, level))
            reached = sum(x is not None for x in per_seed["samples"])
            costs[base] = {"seeds_reaching": reached, **{
                name: common.mean_and_standard_error(values) if reached == len(seeds) else {"per_seed": values}
                for name, values in per_seed.items()}}
        out[level_of] = {"win_rate": level, "cost": costs}
    return out


# ---------------------------------------------------------------------------------------------
# The experiment


def budget(quick: bool) -> dict[str, Any]:
    """Bandit sizes of the two modes (the language budgets are in `language_configs`)."""
    if quick:
        return dict(rate_etas=(1.0,), rate_steps=60, seeds=(0,), outer_steps=6, inner_steps=20, timed_steps=2,
                    extra_group_sizes=())
    return dict(rate_etas=RATE_ETAS, rate_steps=150, seeds=(0, 1, 2), outer_steps=30, inner_steps=50, timed_steps=20,
                extra_group_sizes=(16,))


TRACK = dict(groups=16, group_size=4, learning_rate=0.05)


def run(out: Path, quick: bool) -> dict:
    b = budget(quick)
    clock = {"start": time.perf_counter()}
    bandit = make_bandit(BANDIT_SIZE, BANDIT_SEED)
    rates = rate_table(bandit, b["rate_etas"], BANDIT_BETA, b["rate_steps"])
    clock["rates"] = time.perf_counter()
    track_args = dict(eta=TRACK_ETA, beta=BANDIT_BETA, outer_steps=b["outer_steps"], inner_steps=b["inner_steps"])
    track = tracking(bandit, b["seeds"], **track_args, **TRACK)
    for size in b["extra_group_sizes"]:  # the 'kl' loss's within-group softmax is biased at small S
        kl_only = sampled_group_size(bandit, b["seeds"], size, **track_args)
        track[f"kl_group{size}"] = kl_only
    clock["tracking"] = time.perf_counter()

    configs = language_configs(quick)
    histories = common.train_runs(configs, out / "runs" / NAME)
    clock["language_runs"] = time.perf_counter()
    seeds = common.seeds(quick)
    timings = seconds_per_step({label: c for label, c in configs.items() if label in LANGUAGE_SPECS},
                               b["timed_steps"])  # the first seed's config of each algorithm
    clock["step_timing"] = time.perf_counter()
    language = language_results(histories, configs, timings, seeds)

    plot(out, rates, track, language)
    names = list(clock)
    return {
        "phase_seconds": {b_: clock[b_] - clock[a_] for a_, b_ in zip(names, names[1:])},
        "bandit": {"num_responses": BANDIT_SIZE, "seed": BANDIT_SEED, "beta": BANDIT_BETA,
                   "ref_probs": np.exp(np.asarray(bandit.ref_log_probs)).tolist(),
                   "rewards": np.asarray(bandit.rewards).tolist()},
        "rates": rates,
        "tracking": {"eta": TRACK_ETA, "beta": BANDIT_BETA, "seeds": list(b["seeds"]), **TRACK,
                     "outer_steps": b["outer_steps"], "inner_steps": b["inner_steps"], **track},
        "language": language,
    }


def sampled_group_size(bandit: Bandit, seeds: tuple[int, ...], group_size: int, **kwargs) -> dict[str, Any]:
    """The 'kl' variant with `group_size` samples per group (the same number of samples per inner step)."""
    groups = TRACK["groups"] * TRACK["group_size"] // group_size
    exact = exact_iterates(bandit, eta=kwargs["eta"], beta=kwargs["beta"], steps=kwargs["outer_steps"])
    paths = sampled_paths(bandit, seeds, ("kl",), groups=groups, group_size=group_size,
                          learning_rate=TRACK["learning_rate"], **kwargs)[0]
    return {"group_size": group_size, "tv_to_exact": np.asarray(total_variation(paths, exact[None])).tolist()}


def plot(out: Path, rates: dict, track: dict, language: dict) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    ax = axes[0, 0]
    for row in rates["rows"]:
        line, = ax.semilogy(row["log_error"], label=f"η={row['eta']:g}: measured {row['measured_log_error_rate']:.3f}")
        steps = np.arange(len(row["log_error"]))
        ax.semilogy(steps, row["log_error"][0] * row["local_rate"] ** steps, ls=":", color=line.get_color())
    ax.set(title=f"(a) exact WIND step, β={rates['beta']:g}: max|log π_t − log π*|\n(dotted: local rate ρ^t)",
           xlabel="step t", ylim=(1e-7, 10))
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for row in rates["rows"]:
        line, = ax.semilogy(row["kl_to_equilibrium"], label=f"η={row['eta']:g}: {row['measured_kl_rate']:.3f} "
                                                            f"(ρ²={row['local_rate_kl']:.3f}, 1/(1+ηβ)={row['mmd_kl_bound']:.3f})")
        steps = np.arange(len(row["kl_to_equilibrium"]))
        ax.semilogy(steps, row["kl_to_equilibrium"][0] * row["mmd_kl_bound"] ** steps, ls="--", color=line.get_color())
    ax.set(title="(a) KL(π*‖π_t); dashed: MMD bound (1+ηβ)^-t", xlabel="step t", ylim=(1e-7, 10))
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    ax.semilogy(track["exact_tv_to_equilibrium"], color="k", label="exact: TV(π_t, π*)")
    for variant in (*VARIANTS, *[k for k in track if k.startswith("kl_group")]):
        tv = np.asarray(track[variant]["tv_to_exact"])
        mean = tv.mean(0)
        line, = ax.semilogy(np.maximum(mean, 1e-4), label=f"{variant}: TV(π_t^loss, π_t^exact)")
        ax.fill_between(np.arange(tv.shape[1]), np.maximum(tv.min(0), 1e-4), np.maximum(tv.max(0), 1e-4),
                        color=line.get_color(), alpha=0.2)
    ax.set(title=f"(a) sampled losses vs exact iterates, η={TRACK_ETA:g}\n(mean and min–max over seeds)",
           xlabel="outer step t")
    ax.legend(fontsize=7)
    ax = axes[0, 3]
    for variant in VARIANTS:
        tv = np.asarray(track[variant]["one_step_tv"])
        ax.plot(np.arange(1, tv.shape[1] + 1), tv.mean(0), label=variant)
    ax.set(title="(a) one-step fit error\nTV(π_{t+1}^loss, exact step(π_t^loss)), seed mean", xlabel="outer step t")
    ax.legend(fontsize=7)
    panels = [("samples", "win_rate_vs_ref", "samples drawn"), ("seconds", "win_rate_vs_ref", "train seconds (compile excluded)"),
              ("samples", "reward", "samples drawn"), ("kl_policy_ref", "win_rate_vs_ref", "exact KL(π‖π_ref)")]
    for ax, (x_key, y_key, x_label) in zip(axes[1], panels):
        for base in language["across_seeds"]:  # the seeds evaluate at the same steps: their mean curve
            seed_runs = [language["runs"][common.seed_label(base, s)] for s in language["seeds"]]
            x, y = (np.mean([r[key] for r in seed_runs], axis=0) for key in (x_key, y_key))
            ax.plot(x, y, marker=".", label=base, ls="-" if base.startswith("wind") else "--")
        if y_key == "win_rate_vs_ref" and x_key != "kl_policy_ref":
            ax.axhline(language["target_win_rate"], color="gray", lw=0.8, ls=":")
        if x_key == "kl_policy_ref":
            ax.plot(language["equal_kl"], language["matched_kl_win_rate"], "k*", ms=10, label="common win rate at matched KL")
        ax.set(title=f"(b) toy language: exact {y_key} vs {x_key.split('_')[0]}\n(mean over seeds {language['seeds']})",
               xlabel=x_label, ylabel=y_key)
        ax.legend(fontsize=7)
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    """Invariants of any budget: rates in (0, 1), TV in [0, 1], curves of the expected length, finite numbers."""
    rates = record["rates"]
    assert rates["equilibrium_residual"] < 1e-4, f"equilibrium residual {rates['equilibrium_residual']}"
    assert abs(sum(rates["equilibrium"]) - 1) < 1e-4, "equilibrium probabilities must sum to 1"
    for row in rates["rows"]:
        for key in ("mmd_kl_bound", "local_rate", "measured_log_error_rate", "measured_kl_rate"):
            assert 0 < row[key] < 1, f"η={row['eta']}: {key}={row[key]} is not a contraction"
        assert row["log_error"][-1] < row["log_error"][0], f"η={row['eta']}: exact iteration did not approach π*"
    track = record["tracking"]
    for variant in VARIANTS:
        tv = np.asarray(track[variant]["tv_to_exact"])
        assert tv.shape == (len(track["seeds"]), track["outer_steps"] + 1), f"{variant}: tv shape {tv.shape}"
        assert np.all((tv >= -1e-6) & (tv <= 1 + 1e-6)) and np.all(tv[:, 0] < 1e-6), f"{variant}: TV out of [0, 1]"
        for probs in track[variant]["final_probs"]:
            assert abs(sum(probs) - 1) < 1e-4, f"{variant}: final probabilities do not sum to 1"
    language = record["language"]
    assert language["runs"], "no language runs"
    for label, r in language["runs"].items():
        n = len(r["steps"])
        assert n >= 2 and all(len(r[k]) == n for k in ("samples", "seconds", "win_rate_vs_ref", "reward")), label
        assert r["samples_per_step"] > 0 and r["seconds_per_step"] > 0, label
        assert all(0 <= w <= 1 for w in r["win_rate_vs_ref"]), f"{label}: win rate out of [0, 1]"
        assert all(k >= -1e-4 for k in r["kl_policy_ref"]), f"{label}: negative KL"
        assert np.all(np.isfinite(r["reward"])), f"{label}: non-finite reward"
    targets = ("target_win_rate", "matched_kl_win_rate")
    assert all(0 <= language[t] <= 1 for t in targets), f"common targets out of [0, 1]: {[language[t] for t in targets]}"
    for label, summary in language["summaries"].items():  # every run reaches the common targets, by construction
        for key in ("samples_to_target", "seconds_to_target", "samples_to_matched_kl_win_rate"):
            assert summary[key] is not None and summary[key] >= 0, f"{label}: {key}={summary[key]}"
        assert summary["win_rate_at_equal_kl"] >= language["matched_kl_win_rate"] - 1e-9, label
    for level_of, row in language["within_kl_budget"].items():  # an algorithm reaches its own level
        assert row["cost"][level_of]["seeds_reaching"] == len(language["seeds"]), f"{level_of} misses its own level"
    for base, numbers in language["across_seeds"].items():
        for key, value in numbers.items():
            assert len(value["per_seed"]) == len(language["seeds"]), f"{base}: {key} lacks seeds"
            assert abs(value["mean"] - np.mean(value["per_seed"])) < 1e-9, f"{base}: {key} mean"


if __name__ == "__main__":
    common.main(NAME, run)
