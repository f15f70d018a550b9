"""Experiment 9 — distribution matching with a baseline: DPG against GDC++ (Korbak et al. 2022,
"On Reinforcement Learning and Distribution Matching for Fine-Tuning Language Models with no
Catastrophic Forgetting", arXiv 2206.00761; DPG: Khalifa et al. 2021, arXiv 2012.11635).

Target: an energy-based model over the toy language's responses to one fixed prompt x (the first
eval prompt), p(y) = P(y)/Z with
  (i)  pointwise constraint: P(y) = π_ref(y|x)·1[t ∈ y], t the content token whose containment
       probability under π_ref is closest to POINTWISE_MASS;
  (ii) moment constraint: P(y) = π_ref(y|x)·exp(λ·φ(y)), φ the task reward r(x, y), λ solved
       exactly on the enumerated response space (Brent's method on the monotone E_{p_λ}[φ]) so
       that E_p[φ] = E_ref[φ] + MOMENT_SHIFT·std_ref(φ).
Both are exact tables over all 37,449 responses (bond.exact), so Z and KL(p‖π) are exact.

Training (a small loop of our own: the runner's 'gdcpp' algorithm targets π_ref·exp(r/τ) per prompt
and has no DPG, so it cannot express (i) nor compare the two estimators). One step, as in Korbak et
al.'s Algorithm 1 with an off-policy proposal q:
  1. draw n responses y ~ q (bond.sampling.sample on the proposal's parameters);
  2. look up log π_ref(y) and the constraint in the tables (bond.exact.response_index) → log P(y);
  3. add the batch to the running importance-sampling estimate Ẑ = mean P/q (running_log_z);
  4. loss `dpg` (weight p/q) or `gdc_pp` (weight p/q − π_θ/q) with log Ẑ; one Adam step on θ;
  5. q ← π_θ when the batch estimates give KL(p‖π_θ) < KL(p‖q) (should_update_proposal).
All runs (2 estimators × 2 targets × seeds) start from π_ref and share one vmapped program; the
estimator is a traced 0/1 flag. Every `eval_every` steps the exact KL(p‖π_θ) is computed.

Gradient variance: at fixed parameters (θ = q = π_ref, and θ, q of the first seed's GDC++ run halfway
through training), R batches of n samples of q with fixed seeds 0..R−1 give R gradient estimates of each
loss (with the exact log Z, so only the baseline differs); reported: the total variance
E‖g − ḡ‖² over all parameters, ‖ḡ‖², and the cosine between the two estimators' mean gradients.

    python -m experiments.distribution_matching [--quick] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import scipy.optimize
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from bond import exact, stages
from bond.losses import distribution_matching as dm
from bond.models import sequence_logprobs
from bond.sampling import sample
from bond.tasks import Prompts, get_task, layout
from experiments import common

NAME = "distribution_matching"

POINTWISE_MASS = 0.1  # pick the token t whose π_ref-probability of appearing is closest to this
MOMENT_SHIFT = 1.0  # E_p[φ] = E_ref[φ] + MOMENT_SHIFT · std_ref(φ)
ESTIMATORS = ("dpg", "gdc_pp")
LEARNING_RATE = 1e-3


class Target(NamedTuple):
    """An energy-based target over the enumerated responses: log P [M] (−inf off the support), exact log Z."""

    name: str
    log_unnormalized: np.ndarray
    log_z: float
    description: dict[str, Any]

    @property
    def log_probs(self) -> np.ndarray:
        return self.log_unnormalized - self.log_z


class World(NamedTuple):
    """Everything fixed: the model, π_ref's parameters, the prompt and the exact tables."""

    model: Any
    ref_params: Any
    prompt: jax.Array  # [1, P]
    prompt_mask: jax.Array  # [1, P]
    space: exact.ResponseSpace
    ref_log_probs: np.ndarray  # [M]
    rewards: np.ndarray  # [M]
    max_len: int
    eos_id: int


def make_world(quick: bool) -> World:
    """π_ref of configs/gdcpp.py (the quick one in quick mode), the first eval prompt, exact tables."""
    config = common.config("gdcpp.py", quick)
    task = get_task(config.task)
    model, ref_params = stages.pretrained_reference(config, task, log=lambda _: None)
    prompts = task.prompts("eval", 1, config.seed)
    prompt, mask = jnp.asarray(prompts.tokens), jnp.asarray(prompts.mask)
    space = exact.enumerate_responses(task.vocab_size, task.max_response_length, task.eos_id)
    ref_log_probs = np.asarray(exact.response_logprobs(model, ref_params, prompt, mask, space)[0], np.float64)
    rows = layout(Prompts(*(np.repeat(x, space.size, axis=0) for x in prompts)), np.asarray(space.tokens))
    rewards = np.asarray(task.reward(None, rows), np.float64)
    return World(model, ref_params, prompt, mask, space, ref_log_probs, rewards, task.max_response_length, task.eos_id)


def containment(space: exact.ResponseSpace, token: int) -> np.ndarray:
    """[M] bool: does the response contain `token` among its counted, non-EOS tokens."""
    tokens, counted = np.asarray(space.tokens), np.asarray(space.response_mask) > 0
    return np.any((tokens == token) & counted, axis=-1)


def pointwise_target(world: World, mass: float = POINTWISE_MASS) -> Target:
    """p ∝ π_ref·1[t ∈ y] for the content token t with π_ref(t ∈ y) closest to `mass`."""
    ref = np.exp(world.ref_log_probs)
    tokens = [int(t) for t in world.space.non_eos_tokens]
    masses = {t: float(ref[containment(world.space, t)].sum()) for t in tokens}
    token = min(tokens, key=lambda t: abs(masses[t] - mass))
    log_p = np.where(containment(world.space, token), world.ref_log_probs, -np.inf)
    log_z = float(np.log(masses[token]))
    return Target("pointwise", log_p, log_z, {"token": token, "ref_mass": masses[token], "masses": masses})


def solve_lambda(ref_log_probs: ArrayLike, phi: ArrayLike, target_mean: float) -> float:
    """λ with E_{p_λ}[φ] = target_mean for p_λ ∝ π_ref·exp(λφ), exactly on the table (Brent's method).

    E_{p_λ}[φ] increases with λ (its derivative is Var_{p_λ}[φ] >= 0), so the root is unique when
    target_mean lies strictly between min φ and max φ.
    """
    ref_log_probs, phi = np.asarray(ref_log_probs, np.float64), np.asarray(phi, np.float64)
    if not phi.min() < target_mean < phi.max():
        raise ValueError(f"target_mean={target_mean} must lie strictly between min φ={phi.min()} and max φ={phi.max()}.")

    def mean_gap(lam: float) -> float:
        logits = ref_log_probs + lam * phi
        weights = np.exp(logits - logits.max())
        return float(np.sum(weights * phi) / np.sum(weights)) - target_mean

    hi = 1.0
    while mean_gap(hi) < 0:
        hi *= 2
    lo = -1.0
    while mean_gap(lo) > 0:
        lo *= 2
    return float(scipy.optimize.brentq(mean_gap, lo, hi, xtol=1e-12))


def moment_target(world: World, shift: float = MOMENT_SHIFT) -> Target:
    """p ∝ π_ref·exp(λ·r) with λ solved so that E_p[r] = E_ref[r] + shift·std_ref(r)."""
    ref = np.exp(world.ref_log_probs)
    mean = float(np.sum(ref * world.rewards))
    std = float(np.sqrt(np.sum(ref * (world.rewards - mean) ** 2)))
    goal = mean + shift * std
    lam = solve_lambda(world.ref_log_probs, world.rewards, goal)
    log_p = world.ref_log_probs + lam * world.rewards
    log_z = float(np.logaddexp.reduce(log_p))
    achieved = float(np.sum(np.exp(log_p - log_z) * world.rewards))
    return Target("moment", log_p, log_z, {"lambda": lam, "ref_mean": mean, "ref_std": std, "target_mean": goal,
                                           "achieved_mean": achieved})


def exact_forward_kl(target: Target, log_probs: ArrayLike) -> float:
    """KL(p‖π) = Σ_y p(y)(log p(y) − log π(y)) over the enumerated space (terms with p = 0 are 0)."""
    log_p, log_pi = target.log_probs, np.asarray(log_probs, np.float64)
    support = np.isfinite(log_p)
    return float(np.sum(np.exp(log_p[support]) * (log_p[support] - log_pi[support])))


# ---------------------------------------------------------------------------------------------
# The training loop


class RunState(NamedTuple):
    """One run's state: policy and proposal parameters, Adam state, the running Ẑ, proposal moves."""

    params: Any
    proposal: Any
    opt_state: Any
    log_z: dm.LogZState
    proposal_updates: jax.Array


def batch_terms(world: World, params, proposal, log_target_table: jax.Array, key: jax.Array, num_samples: int):
    """Samples of q and their [1, n] log π_θ (differentiable in params), log q and log P."""
    out = sample(world.model, proposal, world.prompt, world.prompt_mask, key, num_samples=num_samples,
                 max_new_tokens=world.max_len, eos_id=world.eos_id)
    prompt_len = world.prompt.shape[1]
    index = exact.response_index(world.space, out.tokens[0, :, prompt_len:])
    proposal_logp = out.logprobs.sum(-1)  # exact at temperature 1
    log_target = log_target_table[index][None]

    def policy_logp(p):
        return sequence_logprobs(p, out.tokens[0], out.response_mask[0], model=world.model,
                                 attention_mask=out.attention_mask[0])[1][None]

    return policy_logp, proposal_logp, log_target


def estimator_loss(use_baseline: ArrayLike, logp, proposal_logp, log_target, log_z):
    """`gdc_pp` where use_baseline is 1, `dpg` where it is 0 (a traced flag: one program for both)."""
    loss_dpg, _ = dm.dpg(logp, proposal_logp, log_target, log_z=log_z)
    loss_gdc, _ = dm.gdc_pp(logp, proposal_logp, log_target, log_z=log_z)
    return jnp.where(use_baseline > 0, loss_gdc, loss_dpg)


def make_step(world: World, optimizer: optax.GradientTransformation, num_samples: int):
    """One training step of one run (vmapped over runs by the caller)."""

    def step(state: RunState, use_baseline, log_target_table, key):
        policy_logp, proposal_logp, log_target = batch_terms(
            world, state.params, state.proposal, log_target_table, key, num_samples)
        log_z_state = dm.running_log_z(state.log_z, proposal_logp, log_target)
        log_z = dm.log_z_estimate(log_z_state)
        loss_fn = lambda p: estimator_loss(use_baseline, policy_logp(p), proposal_logp, log_target, log_z)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        logp = jax.lax.stop_gradient(policy_logp(state.params))
        move = dm.should_update_proposal(
            dm.forward_kl_estimate(logp, proposal_logp, log_target, log_z=log_z),
            dm.forward_kl_estimate(proposal_logp, proposal_logp, log_target, log_z=log_z),
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # q ← π_θ (the parameters the batch's KL estimate compared) when π_θ is the closer of the two
        proposal = jax.tree.map(lambda q, p: jnp.where(move, p, q), state.proposal, state.params)
        return RunState(params, proposal, opt_state, log_z_state, state.proposal_updates + move), loss

    return step


def train(world: World, targets: list[Target], seeds: tuple[int, ...], *, steps: int, num_samples: int,
          eval_every: int) -> dict[str, Any]:
    """Trains every (estimator, target, seed) run from π_ref in one vmapped program; exact KL(p‖π) curves."""
    runs = [(e, t, s) for e in ESTIMATORS for t in range(len(targets)) for s in seeds]
    optimizer = optax.adam(LEARNING_RATE)
    tables = jnp.asarray(np.stack([targets[t].log_unnormalized for _, t, _ in runs]), jnp.float32)
    flags = jnp.asarray([ESTIMATORS.index(e) for e, _, _ in runs], jnp.float32)
    keys = jnp.stack([jax.random.PRNGKey(s) for _, _, s in runs])
    broadcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (len(runs), *jnp.shape(x))), tree)
    state = broadcast(RunState(world.ref_params, world.ref_params, optimizer.init(world.ref_params),
                               dm.init_log_z_state(), jnp.zeros((), jnp.int32)))
    step = jax.jit(jax.vmap(make_step(world, optimizer, num_samples)))

    def evaluate(params_batch) -> list[float]:
        out = []
        for i, (_, t, _) in enumerate(runs):
            params = jax.tree.map(lambda x: x[i], params_batch)
            log_pi = exact.response_logprobs(world.model, params, world.prompt, world.prompt_mask, world.space)[0]
            out.append(exact_forward_kl(targets[t], log_pi))
        return out

    eval_steps, kls, losses, halfway = [0], [evaluate(state.params)], [], None
    for t in range(steps):
        state, loss = step(state, flags, tables, jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t))
        losses.append(np.asarray(loss).tolist())
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            eval_steps.append(t + 1)
            kls.append(evaluate(state.params))
        if t + 1 == steps // 2:
            halfway = jax.tree.map(lambda x: x, (state.params, state.proposal))
    kl_curves = np.asarray(kls).T  # [runs, evals]
    records = []
    for i, (e, t, s) in enumerate(runs):
        records.append({
            "estimator": e, "target": targets[t].name, "seed": s, "kl": kl_curves[i].tolist(),
            "proposal_updates": int(state.proposal_updates[i]),
            "log_z_estimate": float(dm.log_z_estimate(jax.tree.map(lambda x: x[i], state.log_z))),
            "log_z_exact": targets[t].log_z,
        })
    return {"eval_steps": eval_steps, "runs": records, "halfway": halfway, "run_keys": runs}


# ---------------------------------------------------------------------------------------------
# Gradient variance at fixed parameters


def make_gradient_estimates(world: World, num_samples: int):
    """fn(params, proposal, log_target_table, log_z, keys) → {estimator: [R, D] flattened gradients of its
    loss on the R fixed-seed batches of q}, log Z given (the exact one: only the baseline differs). One program."""

    def grads(params, proposal, table, log_z, key, use_baseline):
        policy_logp, proposal_logp, log_target = batch_terms(world, params, proposal, table, key, num_samples)
        loss = lambda p: estimator_loss(use_baseline, policy_logp(p), proposal_logp, log_target, log_z)
        return ravel_pytree(jax.grad(loss)(params))[0]

    per_key = jax.jit(jax.vmap(grads, in_axes=(None, None, None, None, 0, None)))

    def estimates(params, proposal, target: Target, keys: jax.Array) -> dict[str, np.ndarray]:
        table, log_z = jnp.asarray(target.log_unnormalized, jnp.float32), jnp.float32(target.log_z)
        return {e: np.asarray(per_key(params, proposal, table, log_z, keys, jnp.float32(i)), np.float64)
                for i, e in enumerate(ESTIMATORS)}

    return estimates


def variance_summary(estimates: dict[str, np.ndarray]) -> dict[str, float]:
    """Total variance E‖g − ḡ‖² and ‖ḡ‖² of each estimator; cosine of the two mean gradients."""
    out: dict[str, float] = {}
    means = {}
    for e, g in estimates.items():
        means[e] = g.mean(0)
        out[f"{e}_total_variance"] = float(np.sum(g.var(0, ddof=1)))
        out[f"{e}_mean_norm_sq"] = float(np.sum(means[e] ** 2))
    a, b = means["dpg"], means["gdc_pp"]
    out["mean_gradient_cosine"] = float(a @ b / np.sqrt((a @ a) * (b @ b)))
    out["variance_ratio_gdc_pp_over_dpg"] = out["gdc_pp_total_variance"] / out["dpg_total_variance"]
    return out


# ---------------------------------------------------------------------------------------------
# The experiment


def budget(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(seeds=(0,), steps=12, num_samples=32, eval_every=4, variance_batches=8)
    return dict(seeds=(0, 1), steps=300, num_samples=128, eval_every=25, variance_batches=32)


def steps_to_fraction(steps: ArrayLike, kl: ArrayLike, fraction: float) -> float | None:
    """First evaluated step at which KL(p‖π) <= fraction · KL(p‖π_ref), None if never."""
    steps, kl = np.asarray(steps), np.asarray(kl)
    hit = np.flatnonzero(kl <= fraction * kl[0])
    return float(steps[hit[0]]) if hit.size else None


def run(out: Path, quick: bool) -> dict:
    b = budget(quick)
    world = make_world(quick)
    targets = [pointwise_target(world), moment_target(world)]
    trained = train(world, targets, b["seeds"], steps=b["steps"], num_samples=b["num_samples"],
                    eval_every=b["eval_every"])
    variance_keys = jnp.stack([jax.random.PRNGKey(s) for s in range(b["variance_batches"])])
    gradient_estimates = make_gradient_estimates(world, b["num_samples"])
    variance = {}
    for target in targets:
        mid = next(i for i, (e, t, s) in enumerate(trained["run_keys"])
                   if e == "gdc_pp" and targets[t].name == target.name and s == b["seeds"][0])
        mid_params, mid_proposal = (jax.tree.map(lambda x: x[mid], tree) for tree in trained["halfway"])
        variance[target.name] = {
            "at_reference": variance_summary(gradient_estimates(
                world.ref_params, world.ref_params, target, variance_keys)),
            "halfway_gdc_pp": variance_summary(gradient_estimates(mid_params, mid_proposal, target, variance_keys)),
        }
    for r in trained["runs"]:
        r["steps_to_half_kl"] = steps_to_fraction(trained["eval_steps"], r["kl"], 0.5)
    record = {
        "prompt": np.asarray(world.prompt[0]).tolist(),
        "targets": {t.name: {"log_z": t.log_z, **t.description} for t in targets},
        "learning_rate": LEARNING_RATE, **{k: v for k, v in b.items()},
        "eval_steps": trained["eval_steps"],
        "runs": trained["runs"],
        "gradient_variance": variance,
    }
    plot(out, record)
    return record


def plot(out: Path, record: dict) -> None:
    names = list(record["targets"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(6 * (len(names) + 1), 4.6))
    colors = {"dpg": "tab:orange", "gdc_pp": "tab:blue"}
    for ax, name in zip(axes, names):
        for r in record["runs"]:
            if r["target"] == name:
                ax.plot(record["eval_steps"], r["kl"], color=colors[r["estimator"]], marker=".",
                        ls="-" if r["seed"] == record["seeds"][0] else "--",
                        label=f"{r['estimator']} seed {r['seed']}")
        info = record["targets"][name]
        detail = (f"t={info['token']}, π_ref(t∈y)={info['ref_mass']:.3f}" if name == "pointwise"
                  else f"λ={info['lambda']:.3f}, E_p[r]={info['achieved_mean']:.3f}")
        ax.set(title=f"exact KL(p‖π_θ), {name} target ({detail})", xlabel="step", ylabel="nats", yscale="log")
        ax.legend(fontsize=8)
    ax = axes[-1]
    labels, dpg_var, gdc_var = [], [], []
    for name in names:
        for where, summary in record["gradient_variance"][name].items():
            labels.append(f"{name}\n{where}")
            dpg_var.append(summary["dpg_total_variance"])
            gdc_var.append(summary["gdc_pp_total_variance"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, dpg_var, 0.4, label="DPG", color=colors["dpg"])
    ax.bar(x + 0.2, gdc_var, 0.4, label="GDC++", color=colors["gdc_pp"])
    ax.set(xticks=x, yscale="log", title=f"gradient total variance E‖g − ḡ‖² ({record['variance_batches']} batches "
                                          f"of {record['num_samples']})")
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend()
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    """Invariants of any budget: KL >= 0 and finite, curves of the expected length, targets solved."""
    n_evals = len(record["eval_steps"])
    assert record["eval_steps"][0] == 0 and record["eval_steps"][-1] == record["steps"], record["eval_steps"]
    assert len(record["runs"]) == len(ESTIMATORS) * len(record["targets"]) * len(record["seeds"]), "missing runs"
    for r in record["runs"]:
        assert len(r["kl"]) == n_evals, f"{r['estimator']}/{r['target']}: {len(r['kl'])} points, expected {n_evals}"
        assert all(np.isfinite(k) and k >= -1e-4 for k in r["kl"]), f"{r['estimator']}/{r['target']}: bad KL {r['kl']}"
        assert np.isfinite(r["log_z_estimate"]), f"{r['estimator']}/{r['target']}: log Ẑ not finite"
    starts = {r["target"]: r["kl"][0] for r in record["runs"]}
    for r in record["runs"]:  # every run starts at π_ref: the same exact KL(p‖π_ref)
        assert abs(r["kl"][0] - starts[r["target"]]) < 1e-5, "runs of one target must start at the same KL"
    pointwise = record["targets"]["pointwise"]
    assert abs(pointwise["log_z"] - np.log(pointwise["ref_mass"])) < 1e-9, "pointwise log Z must be log π_ref(t ∈ y)"
    assert abs(starts["pointwise"] + pointwise["log_z"]) < 1e-3, "KL(p‖π_ref) of a pointwise target is −log Z"
    moment = record["targets"]["moment"]
    assert abs(moment["achieved_mean"] - moment["target_mean"]) < 1e-6, "λ does not meet the moment constraint"
    for name, where in record["gradient_variance"].items():
        for point, summary in where.items():
            for key, value in summary.items():
                assert np.isfinite(value), f"{name}/{point}: {key} = {value}"
            assert summary["dpg_total_variance"] >= 0 and summary["gdc_pp_total_variance"] >= 0


if __name__ == "__main__":
    common.main(NAME, run)
