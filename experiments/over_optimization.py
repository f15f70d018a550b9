"""Reward over-optimization on the synthetic language: proxy and gold reward against KL(π‖π_ref).

    python -m experiments.over_optimization [--quick] [--out DIR]

The `synthetic` config variant: V = 128 tokens, responses of up to L = 24, a proxy reward model
fitted (Bradley–Terry) to gold-labelled preference pairs of reference samples, and a hidden gold
reward r* (bond/tasks/synthetic_language.py). Policies train on the proxy; evaluation samples
config.eval.num_samples responses per eval prompt and reports eval/proxy_reward, eval/reward (gold)
and a Monte-Carlo eval/kl_policy_ref.

Compared: BOND (Jeffreys, β = 0.5) at several N, whose target π_BoN is at most log N − (N−1)/N nats
from π_ref, against REINFORCE (RLOO baseline) at several KL coefficients β_RL. Reference curve:
Best-of-N of π_ref under the proxy, scored by the gold reward (Gao et al. 2023, "Scaling laws for
reward model overoptimization", arXiv 2210.10760), from a pool of reference samples with the unbiased
estimator `best_of_n_expectation`, at KL = log N − (N−1)/N. The claim tested (BOND arXiv 2407.14622):
N is a regulariser, so BOND's gold reward does not collapse while its proxy rises, unlike weakly
regularised REINFORCE.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.typing import ArrayLike
from scipy.special import gammaln

from bond import bon, stages
from bond.models import response_rows, reward_model_fn
from bond.sampling import sample
from bond.tasks import get_task, synthetic_language
from experiments import common

NAME = "over_optimization"

BOND_NS = (2, 8, 32)
REINFORCE_KL_COEFS = (0.001, 0.01, 0.1)
BON_NS = (1, 2, 4, 8, 16, 32, 64)

# The synthetic variant's reference and proxy reward model take minutes to train at its default
# budget (1500 and 1000 steps of 128); both modes train smaller ones (cached after the first build).
STAGES = {
    "full": {"reference.steps": 200, "reference.corpus_size": 8_000,
             "reward_model.steps": 100, "reward_model.num_pairs": 4_000},
    "quick": {"reference.steps": 30, "reference.batch_size": 32, "reference.corpus_size": 1_000,
              "reward_model.steps": 20, "reward_model.batch_size": 32, "reward_model.num_pairs": 500},
}
# Online budget. Reference samples are drawn fresh each step: the per-prompt cache would sample
# all 16,384 train prompts up front.
BUDGET = {
    "full": {"steps": 100, "batch_size": 16, "learning_rate": 1e-3, "eval.every": 20, "eval.num_prompts": 16,
             "eval.num_samples": 32, "checkpoint.every": 50, "cache_reference_samples": False},
    "quick": {"steps": 4, "batch_size": 8, "learning_rate": 1e-3, "eval.every": 2, "eval.num_prompts": 4,
              "eval.num_samples": 8, "checkpoint.every": 4, "cache_reference_samples": False},
}
# Reference samples per eval prompt for the Best-of-N curve (quick: the evaluation's own sampler shape).
BON_POOL = {"full": 256, "quick": 8}


def mode(quick: bool) -> str:
    return "quick" if quick else "full"


def base_labels(quick: bool) -> list[str]:
    """The compared configurations: BOND at each N, REINFORCE at each β_RL; quick: BOND N=2 only."""
    ns = BOND_NS[:1] if quick else BOND_NS
    coefs = () if quick else REINFORCE_KL_COEFS
    return [f"bond_n{n}" for n in ns] + [f"reinforce_kl{coef:g}" for coef in coefs]


def run_configs(quick: bool) -> dict[str, object]:
    """label → config: every base configuration with every seed of `common.seeds` (the seeds change
    the online runs' sampling and evaluation prompts; the reference and proxy stages keep their own
    seeds, so every run optimises the same proxy)."""
    m = mode(quick)
    configs = {}
    for seed in common.seeds(quick):
        shared = {**STAGES[m], **BUDGET[m], "seed": seed}
        for base in base_labels(quick):
            if base.startswith("bond_n"):
                overrides = {"algo.n": float(base[len("bond_n"):]), "algo.num_ref_samples": 8}
                configs[common.seed_label(base, seed)] = common.config("bond.py:synthetic", quick, **shared, **overrides)
            else:
                overrides = {"algo.kl_coef": float(base[len("reinforce_kl"):])}
                configs[common.seed_label(base, seed)] = common.config("reinforce.py:synthetic", quick, **shared, **overrides)
    return configs


def best_of_n_expectation(selection_scores: ArrayLike, values: ArrayLike, n: int) -> np.ndarray:
    """E[value of the best of n draws by selection score], n draws without replacement from a pool.

    The unbiased estimator of Best-of-n over a pool of m i.i.d. samples (Nakano et al. 2021;
    Gao et al. 2023): with the pool sorted by score ascending, the i-th (1-based) is the best of a
    uniformly random n-subset with probability C(i−1, n−1)/C(m, n). Pools [..., m] → [...].
    """
    scores, values = np.asarray(selection_scores, np.float64), np.asarray(values, np.float64)
    m = scores.shape[-1]
    if not 1 <= n <= m:
        raise ValueError(f"n={n} must be in [1, pool size {m}].")
    order = np.argsort(scores, axis=-1, kind="stable")
    i = np.arange(1, m + 1)
    log_weight = np.full(m, -np.inf)
    ok = i >= n
    log_choose = lambda a, b: gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)
    log_weight[ok] = log_choose(i[ok] - 1, n - 1) - log_choose(m, n)
    return np.sum(np.exp(log_weight) * np.take_along_axis(values, order, -1), axis=-1)


def reference_best_of_n(config, num_samples: int) -> dict[str, list[float]]:
    """Best-of-N of π_ref under the proxy on the eval prompts, scored by proxy and gold."""
    task = get_task(config.task)
    model, ref_params = stages.pretrained_reference(config, task)
    rm_model, rm_params = stages.proxy_reward_model(config, task, synthetic_language.preference_corpus)
    prompts = task.prompts("eval", config.eval.num_prompts, config.seed)
    out = sample(model, ref_params, jnp.asarray(prompts.tokens), jnp.asarray(prompts.mask),
                 jax.random.fold_in(jax.random.PRNGKey(config.seed), 7), num_samples=num_samples,
                 max_new_tokens=task.max_response_length, eos_id=task.eos_id)
    b, s = out.tokens.shape[:2]
    rows = response_rows(out)
    gold = np.asarray(task.reward(None, rows)).reshape(b, s)
    proxy = np.asarray(reward_model_fn(rm_model)(rm_params, rows)).reshape(b, s)
    ns = [n for n in BON_NS if n <= num_samples]
    return {
        "n": ns,
        "kl_ref": [float(bon.kl_upper_bound(float(n))) for n in ns],
        "proxy_reward": [float(np.mean(best_of_n_expectation(proxy, proxy, n))) for n in ns],
        "reward": [float(np.mean(best_of_n_expectation(proxy, gold, n))) for n in ns],
        "gold_best_of_n_by_gold": [float(np.mean(best_of_n_expectation(gold, gold, n))) for n in ns],
        "pool_size": num_samples,
        "proxy_gold_correlation": float(np.mean([np.corrcoef(p, g)[0, 1] for p, g in zip(proxy, gold)])),
    }


def curve(history: list[dict]) -> dict[str, list[float]]:
    steps, gold = common.series(history, "eval/reward")
    return {
        "steps": steps.tolist(),
        "reward": gold.tolist(),
        "proxy_reward": common.series(history, "eval/proxy_reward")[1].tolist(),
        "kl_ref": common.series(history, "eval/kl_policy_ref")[1].tolist(),
        "win_rate": common.series(history, "eval/win_rate_vs_ref")[1].tolist(),
    }


def label_of(name: str) -> str:
    if name.startswith("bond_n"):
        return f"BOND N={name[len('bond_n'):]}"
    return f"REINFORCE β_RL={name[len('reinforce_kl'):]}"


def seed_mean_curves(curves: dict[str, dict], bases: list[str], seeds: list[int]) -> dict[str, dict]:
    """base label → its curves averaged over the seeds (they evaluate at the same steps)."""
    return {base: {key: np.mean([curves[common.seed_label(base, s)][key] for s in seeds], axis=0).tolist()
                   for key in curves[common.seed_label(base, seeds[0])]} for base in bases}


def run_summary(c: dict[str, list[float]]) -> dict[str, float]:
    """One run's final KL, proxy and gold reward, and its peak gold reward with the KL where it peaked."""
    peak = int(np.argmax(c["reward"]))
    return {"final_kl": c["kl_ref"][-1], "final_proxy": c["proxy_reward"][-1], "final_gold": c["reward"][-1],
            "peak_gold": c["reward"][peak], "peak_gold_kl": c["kl_ref"][peak]}


def plot(out: Path, curves: dict[str, dict], ref_bon: dict) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {name: plt.cm.viridis(0.15 + 0.35 * i) for i, name in enumerate(n for n in curves if n.startswith("bond"))}
    colors.update({name: plt.cm.autumn(0.05 + 0.35 * i) for i, name in enumerate(n for n in curves if n.startswith("rein"))})
    for ax, key, title in ((axes[0], "proxy_reward", "proxy reward (trained on)"), (axes[1], "reward", "gold reward (hidden)")):
        ax.plot(ref_bon["kl_ref"], ref_bon[key], "k--s", ms=4, label="Best-of-N of π_ref by proxy")
        for name, c in curves.items():
            ax.plot(c["kl_ref"], c[key], "o-", ms=3, color=colors[name], label=label_of(name))
        # symlog: BOND stays within a few nats while weakly regularised REINFORCE goes to tens.
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set(xlabel="KL(π‖π_ref) (Monte-Carlo, symlog)", ylabel=key.replace("_", " "), title=f"{title} against KL")
        ax.legend(fontsize=7)
    ax = axes[2]
    for name, c in curves.items():
        ax.plot(c["proxy_reward"], c["reward"], "o-", ms=3, color=colors[name], label=label_of(name))
    ax.plot(ref_bon["proxy_reward"], ref_bon["reward"], "k--s", ms=4, label="Best-of-N of π_ref by proxy")
    ax.set(xlabel="proxy reward", ylabel="gold reward", title="gold against proxy during training")
    ax.legend(fontsize=7)
    common.save_figure(fig, out, NAME)


def run(out: Path, quick: bool) -> dict:
    """Trains every run, draws the Best-of-N-by-proxy curve; writes the figure, returns the numbers."""
    configs = run_configs(quick)
    histories = common.train_runs(configs, out / "runs" / NAME)
    curves = {name: curve(h) for name, h in histories.items()}
    seeds, bases = list(common.seeds(quick)), base_labels(quick)
    ref_bon = reference_best_of_n(configs[bases[0]], BON_POOL[mode(quick)])  # the first seed's eval prompts
    plot(out, seed_mean_curves(curves, bases, seeds), ref_bon)
    budget = BUDGET[mode(quick)]
    return {
        "seeds": seeds,
        "steps": budget["steps"],
        "batch_size": budget["batch_size"],
        "learning_rate": budget["learning_rate"],
        "eval_every": budget["eval.every"],
        "stages": STAGES[mode(quick)],
        "runs": curves,
        "reference_best_of_n": ref_bon,
        "summaries": {name: run_summary(c) for name, c in curves.items()},
        "across_seeds": common.across_seeds({name: run_summary(c) for name, c in curves.items()}, bases, seeds),
    }


def check(record: dict) -> None:
    """Any budget: every run has the expected evaluations, all finite, starting at KL ≈ 0 (the
    policy is π_ref, so the Monte-Carlo KL is exactly 0); the Best-of-N curve sits at
    log N − (N−1)/N and its proxy reward does not decrease in N (an exact property of the estimator)."""
    expected_points = record["steps"] // record["eval_every"] + 1
    assert record["runs"], "no runs"
    for name, c in record["runs"].items():
        for key in ("reward", "proxy_reward", "kl_ref", "steps"):
            assert len(c[key]) == expected_points, f"{name}: {len(c[key])} {key} points, expected {expected_points}"
            assert np.all(np.isfinite(c[key])), f"{name}: non-finite {key}"
        assert abs(c["kl_ref"][0]) < 1e-3, f"{name}: KL at step 0 is {c['kl_ref'][0]}, not 0"
    bon_curve = record["reference_best_of_n"]
    for n, kl in zip(bon_curve["n"], bon_curve["kl_ref"]):
        assert abs(kl - (np.log(n) - (n - 1) / n)) < 1e-5, f"BoN KL for N={n} is {kl}"
    proxy = bon_curve["proxy_reward"]
    assert all(b >= a - 1e-6 for a, b in zip(proxy, proxy[1:])), f"BoN proxy reward decreases in N: {proxy}"
    assert np.all(np.isfinite(bon_curve["reward"])), "non-finite gold reward on the BoN curve"
    for base, numbers in record["across_seeds"].items():
        for key, value in numbers.items():
            assert len(value["per_seed"]) == len(record["seeds"]), f"{base}: {key} lacks seeds"
            assert abs(value["mean"] - np.mean(value["per_seed"])) < 1e-9, f"{base}: {key} mean"


if __name__ == "__main__":
    common.main(NAME, run)
