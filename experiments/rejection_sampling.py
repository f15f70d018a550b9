"""Rejection sampling: RSO's statistical rejection sampling against its target, and RAFT / BoNBoN on
the reward/KL plane of BOND and exact Best-of-N.

    python -m experiments.rejection_sampling [--quick] [--out DIR]

(a) RSO (Liu et al. 2024, arXiv 2309.06657, Algorithm 1) turns k candidates of π_ref into draws
approximately from π_β(y) ∝ π_ref(y)·exp(r(y)/β), accepting each with probability
exp((r − r_max)/β), r_max the best reward among the candidates. On the toy language every response
of every eval prompt is enumerated, so all of the following are exact:

    target        π_β = π_ref·exp(r/β)/Z_β
    A(β)          = E_ref[exp((r − r*)/β)] = Z_β·exp(−r*/β): the acceptance rate of exact
                    rejection sampling with the tight envelope (r* the best reward of the prompt)
    A_k(β)        = E[exp((R_1 − max_i R_i)/β)]: the acceptance rate of RSO's first pass over
                    k candidates (the empirical r_max makes it higher than A(β))
    q_k,β         the distribution of RSO's accepted sample (num_accept = 1), see `rso_single_draw_probs`

and `bond.bon.statistical_rejection_sampling` is run by Monte-Carlo on candidates drawn from the
exact π_ref, to check A_k and E_q[r] with standard errors. TV(q_k,β, π_β) is the accepted samples'
exact distance to the target.

(b) RAFT (best-of-n SFT on the policy's own samples, arXiv 2304.06767), BoNBoN (arXiv 2406.00832)
and BOND (arXiv 2407.14622) trained on the toy language, with exact evaluation, on the same
reward / KL(π‖π_ref) plot as exact Best-of-N of π_ref and the exact targets π_β of RSO.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.typing import ArrayLike

from bond import bon
from bond.evaluation import exact_reference
from experiments import common

NAME = "rejection_sampling"

BETAS = (0.03, 0.1, 0.3, 1.0, 3.0)  # RSO's β (the toy reward's reference std is about 0.5)
NUM_CANDIDATES = (8, 64)  # k, RSO's candidates per prompt
BON_NS = (1, 2, 4, 8, 16, 32, 64, 128)
TRAINED = {  # label → (config spec, overrides); N = n = 8 everywhere
    "RAFT (n=8)": ("raft.py", {}),
    "BoNBoN (n=8)": ("bonbon.py", {}),
    "BOND (N=8, β=0.5)": ("bond.py", {}),
}
SEED = 0
FULL_BUDGET = {"steps": 200, "batch_size": 32, "eval.every": 25, "checkpoint.every": 50}
QUICK_BUDGET = {"steps": 10, "eval.every": 5, "checkpoint.every": 10}


# ---------------------------------------------------------------------------------------------
# Exact quantities on an enumerated support (numpy float64; the last axis is the support).


def _sorted_support(ref_probs: ArrayLike, rewards: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, p, r): the support sorted by reward (stable, so ties get a fixed strict order)."""
    p = np.asarray(ref_probs, np.float64)
    r = np.asarray(rewards, np.float64)
    if p.shape != r.shape or p.ndim != 2:
        raise ValueError(f"ref_probs {p.shape} and rewards {r.shape} must both be [B, M] (prompts, support).")
    order = np.argsort(r, axis=-1, kind="stable")
    return order, np.take_along_axis(p, order, -1), np.take_along_axis(r, order, -1)


def _unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, -1)
    return out


def _cdfs(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F_le (inclusive) and F_lt (exclusive) cumulative masses along the sorted support."""
    f_le = np.minimum(np.cumsum(p, axis=-1), 1.0)
    f_lt = np.concatenate([np.zeros_like(p[..., :1]), f_le[..., :-1]], axis=-1)
    return f_le, f_lt


def _exclusive_logcumsumexp(x: np.ndarray, reverse: bool = False) -> np.ndarray:
    """log Σ_{j<i} exp(x_j) (or Σ_{j>i} with reverse=True) along the last axis; −inf for an empty sum."""
    if reverse:
        return _exclusive_logcumsumexp(x[..., ::-1])[..., ::-1]
    inclusive = np.logaddexp.accumulate(x, axis=-1)
    return np.concatenate([np.full_like(x[..., :1], -np.inf), inclusive[..., :-1]], axis=-1)


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(x)


def target_log_probs(ref_probs: ArrayLike, rewards: ArrayLike, beta: float) -> np.ndarray:
    """log π_β = log π_ref + r/β − log Z_β: the KL-regularised optimum RSO samples from (RSO eq. 4)."""
    logits = _log(np.asarray(ref_probs, np.float64)) + np.asarray(rewards, np.float64) / beta
    top = np.max(logits, axis=-1, keepdims=True)
    return logits - top - np.log(np.sum(np.exp(logits - top), axis=-1, keepdims=True))


def tight_envelope_acceptance(ref_probs: ArrayLike, rewards: ArrayLike, beta: float) -> np.ndarray:
    """A(β) = Σ_y π_ref(y)·exp((r(y) − r*)/β) per prompt: exact rejection sampling's acceptance rate
    for the target π_β with proposal π_ref and envelope M = exp(r*/β)/Z_β (r* = max_y r(y))."""
    p, r = np.asarray(ref_probs, np.float64), np.asarray(rewards, np.float64)
    return np.sum(p * np.exp((r - np.max(r, axis=-1, keepdims=True)) / beta), axis=-1)


def rso_first_pass_acceptance(ref_probs: ArrayLike, rewards: ArrayLike, beta: float, k: int) -> np.ndarray:
    """A_k(β) = E[exp((R_1 − M)/β)], M the best of k i.i.d. π_ref candidates: the expected fraction of
    candidates RSO's first pass accepts. Conditioning on candidate 1 = y and on the best of the other
    k − 1 (M' ≼ y with probability F_le(y)^{k−1}, else = m ≻ y with F_le(m)^{k−1} − F_lt(m)^{k−1}):

        A_k = Σ_y π_ref(y)·[ F_le(y)^{k−1} + e^{r(y)/β} Σ_{m ≻ y} e^{−r(m)/β}·(F_le(m)^{k−1} − F_lt(m)^{k−1}) ].
    """
    _, p, r = _sorted_support(ref_probs, rewards)
    f_le, f_lt = _cdfs(p)
    log_max_at = _log(np.maximum(f_le ** (k - 1) - f_lt ** (k - 1), 0.0))
    log_above = _exclusive_logcumsumexp(-r / beta + log_max_at, reverse=True)
    return np.sum(p * (f_le ** (k - 1) + np.exp(r / beta + log_above)), axis=-1)


def rso_single_draw_probs(ref_probs: ArrayLike, rewards: ArrayLike, beta: float, k: int) -> np.ndarray:
    """q_k,β(y): the exact distribution of the sample RSO's Algorithm 1 accepts (num_accept = 1).

    k candidates i.i.d. from π_ref are visited in order, each accepted with probability
    exp((r − r_max)/β), r_max the best candidate reward; the best always passes. Sort the support by
    reward (ties in a fixed strict order ≺). With m the best candidate (the largest in ≺),
    f(m) = Σ_{z≺m} π_ref(z)·(1 − e^{(r(z)−r(m))/β}) the chance that a candidate below m is drawn and
    fails, and i the position of the accepted candidate (all earlier ones fail):

        P(accept y, best = m ≻ y) = π_ref(y)·e^{(r(y)−r(m))/β} · Σ_{i=1..k} f(m)^{i−1}·(F_le(m)^{k−i} − F_lt(m)^{k−i}),
        P(accept y, best = y)     = π_ref(y) · Σ_{i=1..k} f(y)^{i−1}·F_le(y)^{k−i},

    and q(y) is their sum over m. β → 0 gives best-of-k, β → ∞ gives π_ref; k → ∞ gives π_β.
    """
    order, p, r = _sorted_support(ref_probs, rewards)
    f_le, f_lt = _cdfs(p)
    log_below = _exclusive_logcumsumexp(_log(p) + r / beta)
    fail = np.clip(f_lt - np.exp(log_below - r / beta), 0.0, 1.0)
    best_is_above, best_is_self = np.zeros_like(p), np.zeros_like(p)
    for i in range(1, k + 1):
        fail_before = fail ** (i - 1)
        best_is_above += fail_before * (f_le ** (k - i) - f_lt ** (k - i))
        best_is_self += fail_before * f_le ** (k - i)
    log_above = _exclusive_logcumsumexp(-r / beta + _log(np.maximum(best_is_above, 0.0)), reverse=True)
    q = p * best_is_self + np.exp(_log(p) + r / beta + log_above)
    return _unsort(q, order)


def total_variation(p: ArrayLike, q: ArrayLike) -> np.ndarray:
    """TV(p, q) = ½ Σ |p − q| over the last axis."""
    return 0.5 * np.sum(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)), axis=-1)


def kl_to_reference(probs: ArrayLike, ref_probs: ArrayLike) -> np.ndarray:
    """KL(p‖π_ref) over the last axis (0·log 0 = 0)."""
    p, ref = np.asarray(probs, np.float64), np.asarray(ref_probs, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(p > 0, p * (np.log(p) - np.log(ref)), 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------
# Monte-Carlo: the library's RSO on candidates drawn from the exact π_ref.


def draw_candidates(ref_probs: ArrayLike, num_draws: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Support indices [B, num_draws, k] drawn i.i.d. from each prompt's π_ref (inverse CDF)."""
    p = np.asarray(ref_probs, np.float64)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random((p.shape[0], num_draws * k)) * cdf[:, -1:]
    idx = np.stack([np.searchsorted(c, row, side="right") for c, row in zip(cdf, u)])
    return np.minimum(idx, p.shape[-1] - 1).reshape(p.shape[0], num_draws, k)


_rso_one = jax.jit(bon.statistical_rejection_sampling, static_argnames=("num_accept",))


def rso_monte_carlo(
    ref_probs: ArrayLike, rewards: ArrayLike, beta: float, k: int, num_draws: int, seed: int
) -> dict[str, float]:
    """RSO Algorithm 1 (num_accept = 1) run `num_draws` times per prompt by
    `bond.bon.statistical_rejection_sampling`: the accepted sample's mean reward and the first
    pass's acceptance rate, each with its standard error.

    The first candidate is accepted in its round exactly when U_1 < exp((R_1 − r_max)/β), so the
    fraction of draws whose accepted index is 0 estimates A_k(β) without bias (candidates are
    exchangeable). Standard errors: the pooled sample standard deviation over all B·num_draws
    independent draws / √(B·num_draws) (conservative for the prompt-average, draws being equal per prompt).
    """
    r = np.asarray(rewards, np.float64)
    idx = draw_candidates(ref_probs, num_draws, k, np.random.default_rng([seed, k]))
    cand_r = np.take_along_axis(r, idx.reshape(r.shape[0], -1), -1).reshape(idx.shape)
    mask = np.asarray(_rso_one(jnp.asarray(cand_r, jnp.float32), jax.random.PRNGKey(seed), num_accept=1, beta=beta))
    accepted_r = np.sum(np.where(mask, cand_r, 0.0), axis=-1).ravel()
    first = mask[..., 0].astype(np.float64).ravel()
    n = accepted_r.size
    return {
        "accepted_reward": float(accepted_r.mean()),
        "accepted_reward_se": float(accepted_r.std(ddof=1) / np.sqrt(n)),
        "acceptance": float(first.mean()),
        "acceptance_se": float(first.std(ddof=1) / np.sqrt(n)),
        "num_draws": n,
    }


# ---------------------------------------------------------------------------------------------
# The experiment.


def rso_table(ref_probs: np.ndarray, rewards: np.ndarray, num_draws: int) -> list[dict]:
    """One row per (β, k): exact target, acceptance and accepted-sample quantities, and the Monte-Carlo check."""
    rows = []
    for beta in BETAS:
        target = np.exp(target_log_probs(ref_probs, rewards, beta))
        base = {
            "beta": beta,
            "target_reward": float(np.mean(np.sum(target * rewards, -1))),
            "target_kl_ref": float(np.mean(kl_to_reference(target, ref_probs))),
            "tight_acceptance": float(np.mean(tight_envelope_acceptance(ref_probs, rewards, beta))),
        }
        for k in NUM_CANDIDATES:
            q = rso_single_draw_probs(ref_probs, rewards, beta, k)
            rows.append({
                **base,
                "k": k,
                "rso_acceptance": float(np.mean(rso_first_pass_acceptance(ref_probs, rewards, beta, k))),
                "rso_mass": float(np.max(np.abs(q.sum(-1) - 1.0))),  # max |Σ q − 1| over prompts
                "rso_reward": float(np.mean(np.sum(q * rewards, -1))),
                "rso_kl_ref": float(np.mean(kl_to_reference(q, ref_probs))),
                "tv_rso_target": float(np.mean(total_variation(q, target))),
                "tv_ref_target": float(np.mean(total_variation(ref_probs, target))),
                "monte_carlo": rso_monte_carlo(ref_probs, rewards, beta, k, num_draws, SEED),
            })
    return rows


def bon_points(ref_probs: np.ndarray, rewards: np.ndarray) -> list[dict]:
    """Exact Best-of-N of π_ref (ties at random, BOND Thm 1): reward, KL(π_BoN‖π_ref) and its bound."""
    points = []
    for n in BON_NS:
        probs = np.asarray(bon.bon_probs(ref_probs, rewards, float(n)), np.float64)
        points.append({
            "n": n,
            "reward": float(np.mean(np.sum(probs * rewards, -1))),
            "kl_ref": float(np.mean(kl_to_reference(probs, ref_probs))),
            "kl_bound": float(bon.kl_upper_bound(float(n))),
        })
    return points


def trained_runs(out: Path, quick: bool) -> dict[str, list[dict]]:
    """RAFT, BoNBoN and BOND on the toy language (quick: RAFT only, 10 steps)."""
    configs = {}
    for label, (spec, overrides) in TRAINED.items():
        if quick and not label.startswith("RAFT"):
            continue
        budget = QUICK_BUDGET if quick else FULL_BUDGET
        configs[label] = common.config(spec, quick, seed=SEED, **budget, **overrides)
    folders = {label: label.split(" ")[0].lower() for label in configs}
    histories = common.train_runs({folders[l]: c for l, c in configs.items()}, out / "runs" / NAME)
    return {label: histories[folders[label]] for label in configs}


def curve(history: list[dict]) -> dict[str, list[float]]:
    steps, reward = common.series(history, "eval/reward")
    _, kl = common.series(history, "eval/kl_policy_ref")
    _, win = common.series(history, "eval/win_rate_vs_ref")
    return {"steps": steps.tolist(), "reward": reward.tolist(), "kl_ref": kl.tolist(), "win_rate": win.tolist()}


def plot(out: Path, rso: list[dict], bon_pts: list[dict], curves: dict[str, dict]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    betas = np.array(BETAS)
    ax = axes[0]
    tight = [row["tight_acceptance"] for row in rso if row["k"] == NUM_CANDIDATES[0]]
    ax.plot(betas, tight, "k-", lw=2, label="exact RS, true r* (theory)")
    for k, color in zip(NUM_CANDIDATES, ("C0", "C1")):
        rows = [row for row in rso if row["k"] == k]
        ax.plot(betas, [row["rso_acceptance"] for row in rows], "-", color=color, label=f"RSO first pass, k={k} (exact)")
        ax.errorbar(betas, [row["monte_carlo"]["acceptance"] for row in rows],
                    yerr=[2 * row["monte_carlo"]["acceptance_se"] for row in rows], fmt="o", color=color, ms=4,
                    capsize=3, label=f"RSO k={k}, Monte-Carlo ±2 se")
    ax.set(xscale="log", yscale="log", xlabel="β", ylabel="acceptance rate", title="(a) acceptance against β")
    ax.legend(fontsize=7)

    ax = axes[1]
    for k, color in zip(NUM_CANDIDATES, ("C0", "C1")):
        rows = [row for row in rso if row["k"] == k]
        ax.plot(betas, [row["tv_rso_target"] for row in rows], "o-", color=color, label=f"TV(RSO k={k}, π_β)")
    ax.plot(betas, [row["tv_ref_target"] for row in rso if row["k"] == NUM_CANDIDATES[0]], "k--",
            label="TV(π_ref, π_β)")
    ax.set(xscale="log", xlabel="β", ylabel="total variation (exact, mean over prompts)",
           title="(a) accepted samples' distance to π_β")
    ax.legend(fontsize=7)

    ax = axes[2]
    ax.plot([p["kl_ref"] for p in bon_pts], [p["reward"] for p in bon_pts], "k-s", ms=4, label="exact Best-of-N of π_ref")
    for p in bon_pts:
        ax.annotate(f"{p['n']}", (p["kl_ref"], p["reward"]), fontsize=7, xytext=(3, -8), textcoords="offset points")
    first = [row for row in rso if row["k"] == NUM_CANDIDATES[0]]
    ax.plot([row["target_kl_ref"] for row in first], [row["target_reward"] for row in first], "g-^", ms=4,
            label="π_β = π_ref·e^{r/β}/Z (RSO target)")
    for k, marker in zip(NUM_CANDIDATES, ("v", "D")):
        rows = [row for row in rso if row["k"] == k]
        ax.plot([row["rso_kl_ref"] for row in rows], [row["rso_reward"] for row in rows], ":", marker=marker, ms=4,
                color="g", alpha=0.6, label=f"RSO accepted sample, k={k} (exact)")
    for (label, c), color in zip(curves.items(), ("C3", "C4", "C0")):
        ax.plot(c["kl_ref"], c["reward"], "o-", color=color, ms=3, label=f"{label} (training)")
    ax.set(xlabel="KL(π‖π_ref) (exact)", ylabel="E_π[r] (exact)", title="(b) reward against KL, toy language")
    largest_kl = max([p["kl_ref"] for p in bon_pts] + [kl for c in curves.values() for kl in c["kl_ref"]])
    ax.set_xlim(-0.2, max(6.0, 1.05 * largest_kl))
    ax.legend(fontsize=7)
    common.save_figure(fig, out, NAME)


def reward_std(probs: ArrayLike, rewards: ArrayLike) -> np.ndarray:
    """The standard deviation of r under `probs`, per prompt (the scale β is compared with)."""
    p, r = np.asarray(probs, np.float64), np.asarray(rewards, np.float64)
    mean = np.sum(p * r, axis=-1, keepdims=True)
    return np.sqrt(np.sum(p * (r - mean) ** 2, axis=-1))


def run(out: Path, quick: bool) -> dict:
    """(a) the RSO table, (b) exact Best-of-N and the trained runs; writes the figure, returns the numbers."""
    ref_probs, rewards = exact_reference(common.config("bond.py", quick, seed=SEED))
    rso = rso_table(ref_probs, rewards, num_draws=100 if quick else 4000)
    bon_pts = bon_points(ref_probs, rewards)
    curves = {label: curve(h) for label, h in trained_runs(out, quick).items()}
    plot(out, rso, bon_pts, curves)
    return {
        "num_prompts": int(ref_probs.shape[0]),
        "support_size": int(ref_probs.shape[1]),
        "reference_reward": float(np.mean(np.sum(ref_probs * rewards, -1))),
        "reference_reward_std": float(np.mean(reward_std(ref_probs, rewards))),
        "seed": SEED,
        "training_budget": QUICK_BUDGET if quick else FULL_BUDGET,
        "rso": rso,
        "bon": bon_pts,
        "trained": curves,
    }


def check(record: dict) -> None:
    """Invariants of any budget: exact masses sum to one, Monte-Carlo agrees with the exact values
    within 5 standard errors, A(β) <= A_k(β) <= 1, BoN KLs under their bound, finite curves."""
    for row in record["rso"]:
        where = f"β={row['beta']}, k={row['k']}"
        assert row["rso_mass"] < 1e-6, f"RSO's exact accepted distribution does not sum to 1 ({where}): {row['rso_mass']}"
        assert 0 < row["tight_acceptance"] <= row["rso_acceptance"] + 1e-9 <= 1 + 1e-9, f"acceptance order broken ({where})"
        assert 0 <= row["tv_rso_target"] <= 1 and 0 <= row["tv_ref_target"] <= 1, f"TV outside [0, 1] ({where})"
        mc = row["monte_carlo"]
        for exact_key, mc_key in (("rso_acceptance", "acceptance"), ("rso_reward", "accepted_reward")):
            se = max(mc[f"{mc_key}_se"], 1e-3)
            assert abs(mc[mc_key] - row[exact_key]) < 5 * se, (
                f"Monte-Carlo {mc_key} {mc[mc_key]:.4f} is not within 5 se ({se:.4f}) of exact {row[exact_key]:.4f} ({where})")
    for p in record["bon"]:
        assert -1e-6 <= p["kl_ref"] <= p["kl_bound"] + 1e-4, f"KL(BoN{p['n']}‖ref) = {p['kl_ref']} exceeds its bound"
    rewards = [p["reward"] for p in record["bon"]]
    assert all(b >= a - 1e-6 for a, b in zip(rewards, rewards[1:])), f"BoN reward not increasing in N: {rewards}"
    expected = {"RAFT (n=8)"} | ({"BoNBoN (n=8)", "BOND (N=8, β=0.5)"} if record["mode"] == "full" else set())
    assert set(record["trained"]) == expected, f"trained runs {sorted(record['trained'])}, expected {sorted(expected)}"
    for label, c in record["trained"].items():
        assert len(c["reward"]) == len(c["kl_ref"]) == len(c["steps"]) >= 2, f"{label}: too few evaluations"
        assert np.all(np.isfinite(c["reward"])) and np.all(np.isfinite(c["kl_ref"])), f"{label}: non-finite metrics"
        assert min(c["kl_ref"]) > -1e-4, f"{label}: exact KL(π‖π_ref) negative: {min(c['kl_ref'])}"


if __name__ == "__main__":
    common.main(NAME, run)
