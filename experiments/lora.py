"""J-BOND with LoRA against full fine-tuning, at the same budget, on the toy language (exact evaluation).

LoRA (Hu et al. 2021, arXiv 2106.09685) trains low-rank adapters on every attention and MLP
projection and keeps the base frozen, which in best-of-N distillation is exactly the reference
(bond/lora.py). Compared here, with configs/j_bond.py's budget (300 steps of 64 prompts):
full fine-tuning; rank-8 adapters (α = 16) at the same learning rate; and the same adapters at ten
times it (`lr_scale` = 10, a common LoRA setting: the adapters' updates are low-rank, so they move
the policy less per step). Reported: the exact reward, win rate against π_ref and KL(π‖π_ref) on
the eval prompts, mean ± standard error over seeds 0, 1 and 2 (quick: seed 0, full fine-tuning and
rank 8 only), and the number of trained parameters.

    python -m experiments.lora [--quick] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from bond.context import make_setup
from bond.models import init_params
from bond.step import trained_part
from experiments import common

NAME = "lora"
CONFIG = "j_bond.py"
RANK, ALPHA, LR_SCALE = 8, 16.0, 10.0
METRICS = {"reward": "eval/reward", "win_rate": "eval/win_rate_vs_ref", "kl_policy_ref": "eval/kl_policy_ref"}
VARIANTS = {  # label → config overrides
    "full": {},
    f"lora_r{RANK}": {"lora.rank": RANK, "lora.alpha": ALPHA},
    f"lora_r{RANK}_lr{LR_SCALE:g}x": {"lora.rank": RANK, "lora.alpha": ALPHA, "lr_scale": LR_SCALE},
}


def base_labels(quick: bool) -> list[str]:
    return list(VARIANTS)[:2] if quick else list(VARIANTS)


def eval_every(quick: bool) -> int:
    return common.QUICK_STEPS if quick else 25


def configs(quick: bool) -> dict:
    """label → config: each variant with each seed (the LoRA variants of a seed share one program)."""
    return {
        common.seed_label(label, seed): common.config(CONFIG, quick, **VARIANTS[label], seed=seed, num_devices=1,
                                                      **{"eval.every": eval_every(quick)}, **common.quick_steps(quick))
        for seed in common.seeds(quick) for label in base_labels(quick)
    }


def trained_parameters(config) -> int:
    """Scalars the run trains: every weight, or the adapters alone."""
    setup, _ = make_setup(config, lambda *_: None, abstract=True)
    shapes = jax.eval_shape(lambda k: init_params(setup.model, k), jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(trained_part(setup, shapes))))


def run(out: Path, quick: bool) -> dict:
    cs = configs(quick)
    histories = common.train_runs(cs, Path(out) / "runs" / NAME)
    runs = {}
    for label, history in histories.items():
        steps, _ = common.series(history, METRICS["reward"])
        runs[label] = {"steps": steps.tolist(),
                       **{name: common.series(history, key)[1].tolist() for name, key in METRICS.items()}}
        runs[label]["final"] = {name: common.final(history, key) for name, key in METRICS.items()}
    seeds = common.seeds(quick)
    record = {
        "config": CONFIG + (":quick" if quick else ""),
        "steps": int(next(iter(cs.values())).steps),
        "eval_every": eval_every(quick),
        "seeds": list(seeds),
        "trained_parameters": {label: trained_parameters(cs[label]) for label in base_labels(quick)},
        "runs": runs,
        "across_seeds": common.across_seeds({label: r["final"] for label, r in runs.items()}, base_labels(quick), seeds),
    }
    plot(record, out)
    return record


def plot(record: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label in record["across_seeds"]:
        seed_runs = [record["runs"][common.seed_label(label, s)] for s in record["seeds"]]
        mean = {key: np.mean([r[key] for r in seed_runs], axis=0) for key in ("steps", *METRICS)}
        for ax, (x, y) in zip(axes, (("steps", "reward"), ("steps", "kl_policy_ref"), ("kl_policy_ref", "reward"))):
            ax.plot(mean[x], mean[y], marker="o", ms=3, label=f"{label} ({record['trained_parameters'][label]:,} trained)")
            ax.set(xlabel=x, ylabel=y)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"J-BOND: LoRA against full fine-tuning on the toy language (exact; mean over seeds {record['seeds']})")
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    """Any budget: complete finite curves; every run starts at π_ref (KL 0, the same reward: LoRA
    starts exactly at its base), and the adapters are a fraction of the weights."""
    quick = record["mode"] == "quick"
    common.check_run_curves(record["runs"], set(configs(quick)), record["steps"] // record["eval_every"] + 1,
                            keys=("steps", *METRICS))
    first = next(iter(record["runs"].values()))
    for label, r in record["runs"].items():
        assert abs(r["reward"][0] - first["reward"][0]) < 1e-5, f"{label}: does not start at π_ref's reward"
    counts = record["trained_parameters"]
    assert all(counts[label] < counts["full"] / 2 for label in counts if label != "full"), counts
    for base, numbers in record["across_seeds"].items():
        for key, value in numbers.items():
            assert len(value["per_seed"]) == len(record["seeds"]), f"{base}: {key} lacks seeds"


if __name__ == "__main__":
    common.main(NAME, run)
