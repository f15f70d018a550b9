"""Best-of-N theory on the toy language's real reference: exact KL and win rate against their bounds.

BOND (Sessa et al. 2024, arXiv 2407.14622, §3) bounds the best-of-N distribution's divergence
from the reference and its win rate against it,

    KL(π_BoN ‖ π_ref) <= log N − (N−1)/N,        P(r(Y_BoN) > r(Y_ref)) + ½ P(=) <= N/(N+1),

with equality in the continuous limit (no atoms). Here π_ref is the pretrained reference of
configs/j_bond.py (the quick one in quick mode), enumerated exactly over the 37,449 responses of
each eval prompt; π_BoN is exact (bond.bon.bon_log_probs, ties broken uniformly at random).

The discrete reference has atoms (single responses of a few percent of the mass), so both
quantities fall short of their bounds. Reward ties (float32 collisions of the toy reward) merge
atoms into larger tie classes; the "ties broken" numbers rank every response strictly (by reward,
then by its index in the enumeration) to measure how much of the gap the ties account for.

    python -m experiments.bon_theory [--quick] [--out DIR]
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.typing import ArrayLike

from bond import bon, exact, stages
from bond.tasks import Prompts, get_task, layout
from experiments import common

NAME = "bon_theory"
CONFIG = "j_bond.py"
NS = tuple(range(1, 65))


class ReferenceTables(NamedTuple):
    """The reference over the whole response space of the eval prompts: [B, M] each."""

    ref_logprobs: jax.Array  # exact log π_ref(y | x)
    rewards: jax.Array  # r(x, y)


def reference_tables(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> ReferenceTables:
    """Exact log π_ref(y|x) and r(x, y) for every response y of the config's eval prompts.

    π_ref is `stages.pretrained_reference(config, task)` (built once, cached); the prompts are the
    evaluator's (`task.prompts("eval", config.eval.num_prompts, config.seed)`).
    """
    task = get_task(config.task)
    model, ref_params = stages.pretrained_reference(config, task, log)
    prompts = task.prompts("eval", config.eval.num_prompts, config.seed)
    space = exact.enumerate_responses(task.vocab_size, task.max_response_length, task.eos_id)
    ref_logprobs = exact.response_logprobs(model, ref_params, prompts.tokens, prompts.mask, space)
    b, m = prompts.tokens.shape[0], space.size
    rows = layout(Prompts(*(np.repeat(x, m, axis=0) for x in prompts)), np.tile(np.asarray(space.tokens), (b, 1)))
    return ReferenceTables(ref_logprobs=ref_logprobs, rewards=task.reward(None, rows).reshape(b, m))


def strict_ranks(rewards: ArrayLike) -> jax.Array:
    """Each response's rank (0 = lowest) by reward, ties broken by its index: a tie-free reward
    with the same order as `rewards` wherever they differ. [..., M] → [..., M] float32."""
    rewards = np.asarray(rewards)
    order = np.argsort(rewards, axis=-1, kind="stable")  # stable: equal rewards keep index order
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(rewards.shape[-1])[None], axis=-1)
    return jnp.asarray(ranks, jnp.float32)


@jax.jit
def bon_kl_and_win_rate(ref_logprobs: ArrayLike, rewards: ArrayLike, ns: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Exact KL(π_BoN‖π_ref) and win rate of π_BoN against π_ref, [len(ns), B] each.

    π_BoN from BOND Thm 1 (`bon.bon_log_probs`); win rate P(r(Y) > r(Y')) + ½ P(r(Y) = r(Y')),
    Y ~ π_BoN, Y' ~ π_ref (`bon.win_rate`).
    """
    ref_probs = jnp.exp(ref_logprobs)

    def one(n: jax.Array) -> tuple[jax.Array, jax.Array]:
        log_bon = bon.bon_log_probs(ref_probs, rewards, n)
        return (bon.kl_divergence_from_logs(log_bon, ref_logprobs),
                bon.win_rate(jnp.exp(log_bon), ref_probs, rewards))

    return jax.lax.map(one, jnp.asarray(ns, jnp.float32))


def tied_mask(rewards: ArrayLike) -> np.ndarray:
    """[..., M] bool: the responses whose reward equals another response's (of the same prompt)."""
    rewards = np.asarray(rewards)
    order = np.argsort(rewards, axis=-1)
    sorted_rewards = np.take_along_axis(rewards, order, axis=-1)
    same = sorted_rewards[..., 1:] == sorted_rewards[..., :-1]
    tied_sorted = np.zeros(rewards.shape, bool)
    tied_sorted[..., 1:] |= same
    tied_sorted[..., :-1] |= same
    tied = np.zeros(rewards.shape, bool)
    np.put_along_axis(tied, order, tied_sorted, axis=-1)
    return tied


def tie_statistics(ref_probs: ArrayLike, rewards: ArrayLike) -> dict[str, np.ndarray]:
    """Per prompt: how many responses share their reward with another, the reference mass of those
    responses, the largest atom max_y π_ref(y) and the mass of the highest-reward response."""
    ref_probs, rewards = np.asarray(ref_probs), np.asarray(rewards)
    tied = tied_mask(rewards)
    return {
        "tied_responses": tied.sum(-1),
        "tied_mass": np.where(tied, ref_probs, 0.0).sum(-1),
        "largest_atom": ref_probs.max(-1),
        "best_response_mass": np.take_along_axis(ref_probs, rewards.argmax(-1)[..., None], axis=-1)[..., 0],
    }


@jax.jit
def tie_break_effect(
    ref_logprobs: ArrayLike, rewards: ArrayLike, ranks: ArrayLike, tied: ArrayLike, ns: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """How much the tie rule can matter, [len(ns), B] each: the total variation between π_BoN with
    ties broken uniformly (`rewards`) and with ties broken by index (`ranks`), and the mass π_BoN
    puts on the `tied` responses (the only ones the rule moves)."""
    ref_probs = jnp.exp(ref_logprobs)

    def one(n: jax.Array) -> tuple[jax.Array, jax.Array]:
        uniform = bon.bon_probs(ref_probs, rewards, n)
        by_index = bon.bon_probs(ref_probs, ranks, n)
        return 0.5 * jnp.sum(jnp.abs(uniform - by_index), -1), jnp.sum(jnp.where(tied, uniform, 0.0), -1)

    return jax.lax.map(one, jnp.asarray(ns, jnp.float32))


def run(out: Path, quick: bool) -> dict:
    config = common.config(CONFIG, quick)
    tables = reference_tables(config)
    ref_probs = jnp.exp(tables.ref_logprobs)
    ns = np.asarray(NS, np.float32)
    kl, win = (np.asarray(x) for x in bon_kl_and_win_rate(tables.ref_logprobs, tables.rewards, ns))
    ranks = strict_ranks(tables.rewards)
    kl_untied, win_untied = (np.asarray(x) for x in bon_kl_and_win_rate(tables.ref_logprobs, ranks, ns))
    kl_bound = np.asarray(bon.kl_upper_bound(ns))
    win_bound = ns / (ns + 1.0)
    ties = tie_statistics(ref_probs, tables.rewards)
    tv, tied_bon_mass = (np.asarray(x) for x in tie_break_effect(
        tables.ref_logprobs, tables.rewards, ranks, tied_mask(tables.rewards), ns))

    record = {
        "config": CONFIG + (":quick" if quick else ""),
        "num_prompts": int(kl.shape[1]),
        "num_responses": int(tables.rewards.shape[1]),
        "ref_mass_per_prompt": np.asarray(ref_probs.sum(-1)),
        "ns": ns.astype(int),
        "kl_bound": kl_bound,
        "win_rate_bound": win_bound,
        "kl_mean": kl.mean(1),
        "win_rate_mean": win.mean(1),
        "kl_gap_mean": kl_bound - kl.mean(1),
        "win_rate_gap_mean": win_bound - win.mean(1),
        "kl_mean_ties_broken": kl_untied.mean(1),
        "win_rate_mean_ties_broken": win_untied.mean(1),
        "tie_rule_tv_mean": tv.mean(1),  # ½‖π_BoN(uniform ties) − π_BoN(ties by index)‖₁
        "bon_mass_on_tied_mean": tied_bon_mass.mean(1),
        "kl_per_prompt": kl.T,  # [B, len(ns)]
        "win_rate_per_prompt": win.T,
        **{k: v for k, v in ties.items()},
    }
    plot(record, out)
    return record


def plot(record: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    ns = np.asarray(record["ns"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, key, bound, label in (
        (axes[0, 0], "kl", "kl_bound", "KL(π_BoN‖π_ref) [nats]"),
        (axes[0, 1], "win_rate", "win_rate_bound", "win rate of π_BoN vs π_ref"),
    ):
        for row in np.asarray(record[f"{key}_per_prompt"]):
            ax.plot(ns, row, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(ns, record[f"{key}_mean"], color="tab:blue", lw=2, label="exact, mean over prompts (thin: per prompt)")
        ax.plot(ns, record[bound], "k--", lw=1.5,
                label="log N − (N−1)/N" if key == "kl" else "N/(N+1)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(ns, record["kl_gap_mean"], label="log N − (N−1)/N − KL")
    ax.plot(ns, record["win_rate_gap_mean"], label="N/(N+1) − win rate")
    ax.plot(ns, record["tie_rule_tv_mean"], ":", label="TV(π_BoN ties uniform, π_BoN ties by index)")
    ax.plot(ns, record["bon_mass_on_tied_mean"], "--", label="π_BoN mass on tied responses")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("mean over prompts")
    ax.set_title("gaps to the bounds, and what reward ties can move")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    gaps = np.asarray(record["kl_bound"])[None] - np.asarray(record["kl_per_prompt"])
    for row in gaps[:, 1:]:
        ax.plot(ns[1:], np.maximum(row, 1e-7), color="tab:blue", alpha=0.5, lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("log N − (N−1)/N − KL(π_BoN‖π_ref)")
    ax.set_title("KL gap per prompt (atoms of π_ref)")
    fig.suptitle("Best-of-N on the toy language's pretrained reference (exact enumeration)")
    common.save_figure(fig, out, NAME)


def check(record: dict) -> None:
    ns = np.asarray(record["ns"], float)
    for key in ("kl_per_prompt", "win_rate_per_prompt", "kl_bound", "win_rate_bound", "kl_mean_ties_broken",
                "win_rate_mean_ties_broken", "largest_atom", "best_response_mass", "tie_rule_tv_mean",
                "bon_mass_on_tied_mean"):
        values = np.asarray(record[key], float)
        assert values.size and np.all(np.isfinite(values)), f"{key} missing or not finite"
    kl, win = np.asarray(record["kl_per_prompt"]), np.asarray(record["win_rate_per_prompt"])
    assert kl.shape == win.shape == (record["num_prompts"], len(ns)), f"per-prompt tables have shape {kl.shape}"
    assert np.allclose(record["ref_mass_per_prompt"], 1.0, atol=1e-4), "π_ref does not sum to 1 over the space"
    # float32 tables over 37,449 responses: allow 1e-4 of rounding on either side.
    assert np.all(kl >= -1e-4), "KL(π_BoN‖π_ref) < 0"
    assert np.all(kl <= np.asarray(record["kl_bound"])[None] + 1e-4), "KL(π_BoN‖π_ref) exceeds log N − (N−1)/N"
    assert np.all(win <= np.asarray(record["win_rate_bound"])[None] + 1e-4), "win rate exceeds N/(N+1)"
    first = int(np.argmax(ns == 1)) if np.any(ns == 1) else None
    if first is not None:
        assert np.allclose(kl[:, first], 0.0, atol=1e-4), "Best-of-1 is not π_ref"
        assert np.allclose(win[:, first], 0.5, atol=1e-4), "Best-of-1's win rate is not ½"
    assert np.all(np.diff(kl, axis=1) >= -1e-4), "KL(π_BoN‖π_ref) not increasing in N"
    assert np.all(np.diff(win, axis=1) >= -1e-4), "win rate not increasing in N"


if __name__ == "__main__":
    common.main(NAME, run)
