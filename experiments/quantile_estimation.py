"""Monte-Carlo quantile estimation (BOND §4.2): the bias of the smoothed log p̂ and where training ends.

BOND's backward KL (Sessa et al. 2024, arXiv 2407.14622, §4.2) rewards a policy sample y with
(N−1)·log p_le(y), p_le(y) = P_{y'~π_ref}[r(y') <= r(y)], estimated from k reference samples
(the paper: k = 16 in training, 32 at evaluation). This codebase uses the add-one smoothed
estimate (bond.bon.smoothed_log_quantile, as in vBoN)

    log p̂_k(y) = log((C + 1)/(k + 1)),   C = #{i : r(y_i) <= r(y)} ~ Binomial(k, p_le(y)),

so its bias against the exact log p_le(y) is exact to compute:

    bias_k(y) = Σ_c Binom(c; k, p_le(y)) · log((c + 1)/(k + 1)) − log p_le(y)   (> 0 for rare y).

(a) bias_k averaged under π_ref and under π_BoN, with p_le from the enumerated reference of the
eval prompts, checked against many draws of `smoothed_log_quantile` (mean ± standard error); the
unsmoothed `empirical_quantile` is 0 (log p̂ = −inf) with probability (1 − p_le)^k.
(b) Backward-KL BOND (configs/bond.py, β = 1, N = 4) with algo.num_ref_samples = k ∈ {4, 16, 64}:
the final exact KL(π‖π_BoN), reward and KL(π‖π_ref). N = 4 because a run draws max(k, N) reference
samples and ranks against all of them (bond/algorithms.py `_bond_plan`), so with N = 8 the k = 4
run would use 8. With the k samples redrawn at every step, the expected backward objective is
minimised by the tilted reference π_k ∝ π_ref · exp((N−1)·E[log p̂_k(y)]) (k = ∞: π_ref · p_le^{N−1});
its exact KL to π_BoN, reward and KL to π_ref are where an unconstrained policy would end, the
training runs' yardstick (the runs cache their reference samples per train prompt, the default).

    python -m experiments.quantile_estimation [--quick] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jax.typing import ArrayLike
from scipy import stats

from bond import bon
from experiments import bon_theory, common

NAME = "quantile_estimation"
CONFIG = "bond.py"
N = 4
KS_FULL = (4, 16, 64)
KS_QUICK = (4,)  # each k is its own program: one in the quick budget


def expected_smoothed_log_quantile(p_le: ArrayLike, k: int) -> np.ndarray:
    """E[log((C + 1)/(k + 1))], C ~ Binomial(k, p_le): the mean of `bon.smoothed_log_quantile` for a
    response whose exact quantile is p_le, over independent draws of its k reference samples."""
    p_le = np.asarray(p_le, np.float64)
    if k < 1:
        raise ValueError(f"k must be a positive number of reference samples, got {k}.")
    if np.any((p_le < 0) | (p_le > 1)):
        raise ValueError("p_le must be probabilities in [0, 1]; clip float rounding before calling.")
    counts = np.arange(k + 1)
    log_values = np.log((counts + 1.0) / (k + 1.0))
    flat = p_le.reshape(-1)
    means = np.concatenate([
        stats.binom.pmf(counts[None, :], k, chunk[:, None]) @ log_values
        for chunk in np.array_split(flat, max(1, flat.size // 100_000))
    ])
    return means.reshape(p_le.shape)


def weighted_mean(values: ArrayLike, weights: ArrayLike) -> np.ndarray:
    """Σ_y w(y)·v(y) over the last axis (weights sum to 1 per row), in float64."""
    return np.sum(np.asarray(weights, np.float64) * np.asarray(values, np.float64), axis=-1)


def monte_carlo_bias(
    seed: int, ref_probs: np.ndarray, rewards: ArrayLike, log_p_le: np.ndarray, k: int, draws: int
) -> tuple[float, float, float]:
    """Mean of smoothed_log_quantile(r(y), r(y_1..y_k)) − log p_le(y) over y, y_1..y_k ~ π_ref i.i.d.,
    `draws` per prompt: (mean, its standard error, fraction of draws where empirical_quantile is 0)."""
    rng = np.random.default_rng(seed)
    rewards = np.asarray(rewards)
    b, m = ref_probs.shape
    # One categorical draw per (y, y_1..y_k) from each prompt's π_ref (inverse-CDF sampling).
    picks = np.stack([rng.choice(m, size=(draws, k + 1), p=ref_probs[i] / ref_probs[i].sum()) for i in range(b)])
    rows = np.arange(b)[:, None, None]
    r_y, r_refs = rewards[rows, picks[..., :1]], rewards[rows, picks[..., 1:]]
    estimate = np.asarray(bon.smoothed_log_quantile(r_y, r_refs), np.float64)[..., 0]
    error = estimate - log_p_le[rows[..., 0], picks[..., 0]]
    zero = np.asarray(bon.empirical_quantile(r_y, r_refs))[..., 0] == 0
    return float(error.mean()), float(error.std(ddof=1) / np.sqrt(error.size)), float(np.mean(zero))


def tilted_reference(ref_logprobs: ArrayLike, log_reward: ArrayLike, n: float) -> np.ndarray:
    """log π ∝ log π_ref + (n−1)·log_reward, normalised over the last axis (float64): the minimiser of
    E_π[log π − log π_ref − (n−1)·log_reward], i.e. of BOND's backward objective with that reward."""
    logits = np.asarray(ref_logprobs, np.float64) + (n - 1.0) * np.asarray(log_reward, np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def kl_from_logs(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p‖q) over the last axis in float64."""
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def analysis(tables: bon_theory.ReferenceTables, ks: tuple[int, ...], draws: int) -> dict:
    """Part (a) and the tilted-reference optima of part (b), on the eval prompts' exact tables."""
    ref_logprobs = np.asarray(tables.ref_logprobs, np.float64)
    ref_logprobs -= np.logaddexp.reduce(ref_logprobs, axis=-1, keepdims=True)  # float32 tables: renormalise
    ref_probs, rewards = np.exp(ref_logprobs), np.asarray(tables.rewards)
    p_le = np.clip(np.asarray(bon.reward_quantiles(ref_probs, rewards).p_le, np.float64), 1e-30, 1.0)
    log_p_le = np.log(p_le)
    log_bon = np.asarray(bon.bon_log_probs(ref_probs, rewards, float(N)), np.float64)
    log_bon -= np.logaddexp.reduce(log_bon, axis=-1, keepdims=True)
    bon_probs = np.exp(log_bon)

    def target_metrics(log_target: np.ndarray) -> dict:
        return {
            "kl_policy_bon": float(kl_from_logs(log_target, log_bon).mean()),
            "kl_policy_ref": float(kl_from_logs(log_target, ref_logprobs).mean()),
            "reward": float(weighted_mean(rewards, np.exp(log_target)).mean()),
        }

    per_k, targets = {}, {"inf": target_metrics(tilted_reference(ref_logprobs, log_p_le, N))}
    for i, k in enumerate(ks):
        mean_log = expected_smoothed_log_quantile(p_le, k)
        bias = mean_log - log_p_le
        zero = (1.0 - p_le) ** k
        mc_mean, mc_se, mc_zero = monte_carlo_bias(i, ref_probs, rewards, log_p_le, k, draws)
        per_k[str(k)] = {
            "bias_under_ref": float(weighted_mean(bias, ref_probs).mean()),
            "bias_under_bon": float(weighted_mean(bias, bon_probs).mean()),
            "abs_bias_under_ref": float(weighted_mean(np.abs(bias), ref_probs).mean()),
            "bias_under_ref_per_prompt": weighted_mean(bias, ref_probs),
            "zero_estimate_prob_under_ref": float(weighted_mean(zero, ref_probs).mean()),
            "monte_carlo_bias_under_ref": mc_mean,
            "monte_carlo_standard_error": mc_se,
            "monte_carlo_zero_fraction": mc_zero,
            "monte_carlo_draws": draws * ref_logprobs.shape[0],
        }
        targets[str(k)] = target_metrics(tilted_reference(ref_logprobs, mean_log, N))
    p_grid = np.logspace(-4, 0, 81)
    return {
        "bias": per_k,
        "bias_curve": {"p_le": p_grid, **{str(k): expected_smoothed_log_quantile(p_grid, k) - np.log(p_grid)
                                         for k in ks}},
        "tilted_optimum": targets,
        "best_of_n": {"reward": float(weighted_mean(rewards, bon_probs).mean()),
                      "kl_bon_ref": float(kl_from_logs(log_bon, ref_logprobs).mean())},
        "reference_reward": float(weighted_mean(rewards, ref_probs).mean()),
    }


def eval_every(quick: bool) -> int:
    return common.QUICK_STEPS if quick else 50  # quick: its ends only


def configs(quick: bool) -> dict:
    """label → config: backward-KL BOND (β = 1) towards Best-of-N with k reference samples."""
    return {
        f"k{k}": common.config(CONFIG, quick, **{"algo.n": float(N), "algo.beta": 1.0, "algo.num_ref_samples": k,
                                                 "eval.bon_ns": (N,), "eval.every": eval_every(quick),
                                                 **common.quick_steps(quick)})
        for k in (KS_QUICK if quick else KS_FULL)
    }


def run(out: Path, quick: bool) -> dict:
    cs = configs(quick)
    ks = tuple(int(c.algo.num_ref_samples) for c in cs.values())
    tables = bon_theory.reference_tables(next(iter(cs.values())))
    record = {"config": CONFIG + (":quick" if quick else ""), "n": N, "ks": ks,
              **analysis(tables, ks, draws=500 if quick else 4000)}
    histories = common.train_runs(cs, Path(out) / "runs" / NAME)
    keys = {"kl_policy_bon": f"eval/kl_policy_bon{N}", "kl_bon_policy": f"eval/kl_bon{N}_policy",
            "reward": "eval/reward", "kl_policy_ref": "eval/kl_policy_ref", "log_quantile": "eval/log_quantile"}
    record["runs"] = {}
    for label, history in histories.items():
        steps, _ = common.series(history, "eval/reward")
        run_record = {"k": int(cs[label].algo.num_ref_samples), "steps": steps,
                      **{name: common.series(history, key)[1] for name, key in keys.items()}}
        run_record["final"] = {name: float(run_record[name][-1]) for name in keys}
        record["runs"][label] = run_record
    record.update(steps=int(next(iter(cs.values())).steps), eval_every=eval_every(quick),
                  seeds=sorted({int(c.seed) for c in cs.values()}))
    plot(record, out)
    return record


def plot(record: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    colors = {str(k): f"C{i}" for i, k in enumerate(KS_FULL)}
    curve = record["bias_curve"]
    for k in record["ks"]:
        axes[0].plot(curve["p_le"], curve[str(k)], color=colors[str(k)], label=f"k = {k}")
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set(xscale="log", xlabel="exact p_le(y)", ylabel="E[log p̂_k] − log p_le",
                title="bias of the smoothed log-quantile (exact)")
    axes[0].legend(fontsize=8)

    ax = axes[1]
    ks = [str(k) for k in record["ks"]]
    x = np.arange(len(ks))
    ax.bar(x - 0.2, [record["bias"][k]["bias_under_ref"] for k in ks], 0.4, label="y ~ π_ref (exact)")
    ax.errorbar(x - 0.2, [record["bias"][k]["monte_carlo_bias_under_ref"] for k in ks],
                yerr=[2 * record["bias"][k]["monte_carlo_standard_error"] for k in ks], fmt="k.",
                label="y ~ π_ref, Monte-Carlo ± 2 s.e.")
    ax.bar(x + 0.2, [record["bias"][k]["bias_under_bon"] for k in ks], 0.4, label=f"y ~ π_Bo{record['n']} (exact)")
    ax.set_xticks(x, [f"k = {k}" for k in ks])
    ax.set(ylabel="mean bias [nats]", title="mean bias of log p̂ (eval prompts)")
    ax.legend(fontsize=8)

    for label, r in record["runs"].items():
        c = colors[str(r["k"])]
        axes[2].plot(r["steps"], r["kl_policy_bon"], color=c, marker="o", ms=3, label=f"k = {r['k']}")
        axes[3].plot(r["kl_policy_ref"], r["reward"], color=c, marker="o", ms=3, label=f"training, k = {r['k']}")
        t = record["tilted_optimum"][str(r["k"])]
        axes[3].scatter([t["kl_policy_ref"]], [t["reward"]], marker="D", color=c, edgecolor="k", zorder=5)
    t = record["tilted_optimum"]["inf"]
    axes[3].scatter([t["kl_policy_ref"]], [t["reward"]], marker="D", color="w", edgecolor="k", zorder=5,
                    label="◆ optimum of the expected objective (white: exact p_le)")
    b = record["best_of_n"]
    axes[3].scatter([b["kl_bon_ref"]], [b["reward"]], marker="*", s=180, color="k", zorder=5,
                    label=f"exact Best-of-{record['n']}")
    axes[2].set(xlabel="training step", ylabel=f"KL(π‖π_Bo{record['n']}) [nats, exact]",
                title=f"backward-KL BOND (β = 1, N = {record['n']})")
    axes[2].legend(fontsize=8)
    axes[3].set(xlabel="KL(·‖π_ref) [nats]", ylabel="reward", title="where training goes")
    axes[3].legend(fontsize=7)
    fig.suptitle("Monte-Carlo quantile estimation with k reference samples (toy language, exact π_ref)")
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    ks = [str(k) for k in record["ks"]]
    assert set(record["bias"]) == set(ks), f"bias for {sorted(record['bias'])}, expected {ks}"
    for k in ks:
        b = record["bias"][k]
        for name, value in b.items():
            assert np.all(np.isfinite(value)), f"k = {k}: {name} not finite"
        assert 0.0 <= b["zero_estimate_prob_under_ref"] <= 1.0, f"k = {k}: P(p̂ = 0) outside [0, 1]"
        # The smoothed estimate is at most log(1) and at least log(1/(k+1)); its bias is bounded by the
        # gap between those and log p_le, so only a gross error can break this.
        assert b["abs_bias_under_ref"] >= abs(b["bias_under_ref"]) - 1e-9, f"k = {k}: |mean| > mean |.|"
    curve = record["bias_curve"]
    for k in ks:
        values = np.asarray(curve[k])
        assert np.all(np.isfinite(values)), f"bias curve k = {k} not finite"
        # At p_le = 1 every count is k: log p̂ = 0 = log p_le, no bias.
        assert abs(values[-1]) < 1e-9, f"bias curve k = {k} is {values[-1]} at p_le = 1, not 0"
    for name, t in record["tilted_optimum"].items():
        assert t["kl_policy_ref"] >= -1e-9 and t["kl_policy_bon"] >= -1e-9, f"optimum k = {name}: negative KL"
    expected_points = record["steps"] // record["eval_every"] + 1
    assert {str(r["k"]) for r in record["runs"].values()} == set(ks), "a training run is missing"
    common.check_run_curves(record["runs"], None, expected_points,
                            keys=("kl_policy_bon", "kl_bon_policy", "reward", "kl_policy_ref", "log_quantile"))


if __name__ == "__main__":
    common.main(NAME, run)
