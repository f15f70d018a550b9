"""Best-of-N in numbers: exact KL(π_BoN‖π_ref) and win rate on a random finite problem.

    python -m bond.demo [--support 10000] [--seed 0]

For N ∈ {1, 2, 4, 8, 16, 32} it prints the exact KL of the best-of-N distribution to the
reference beside its upper bound log N − (N−1)/N, and the exact win rate of best-of-N against
the reference beside its continuous limit N/(N+1) (BOND, arXiv 2407.14622, §3).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bond import bon

NS = (1, 2, 4, 8, 16, 32)


def bon_table(ref_probs: jax.Array, rewards: jax.Array, ns=NS) -> list[dict[str, float]]:
    """One row per N: exact KL(π_BoN‖π_ref), its bound, exact win rate and N/(N+1)."""
    rows = []
    for n in ns:
        probs = bon.bon_probs(ref_probs, rewards, n)
        rows.append(
            {
                "n": n,
                # max(·, 0): at N = 1 the exact value 0 comes out as float32 round-off of either sign.
                "kl": max(float(bon.kl_divergence(probs, ref_probs)), 0.0),
                "kl_bound": float(bon.kl_upper_bound(n)),
                "win_rate": float(bon.win_rate(probs, ref_probs, rewards)),
                "win_rate_limit": n / (n + 1),
            }
        )
    return rows


def main(argv=None) -> None:
    """Prints the best-of-N table for a random reference over `--support` responses."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--support", type=int, default=10_000, help="number of responses in the finite support")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.support < 1:
        parser.error(f"--support must be at least 1, got {args.support}")

    key_probs, key_rewards = jax.random.split(jax.random.PRNGKey(args.seed))
    ref_probs = jax.random.dirichlet(key_probs, jnp.ones(args.support))
    # Rounded rewards leave a few ties, the discrete case where the bound is not reached.
    rewards = jnp.round(jax.random.normal(key_rewards, (args.support,)) * 100) / 100
    print(f"Random reference over {args.support} responses (seed {args.seed}); exact best-of-N:")
    print(f"{'N':>4}  {'KL(π_BoN‖π_ref)':>16}  {'log N−(N−1)/N':>14}  {'win rate':>9}  {'N/(N+1)':>8}")
    for row in bon_table(ref_probs, rewards):
        print(
            f"{row['n']:>4}  {row['kl']:>16.4f}  {row['kl_bound']:>14.4f}  "
            f"{row['win_rate']:>9.4f}  {row['win_rate_limit']:>8.4f}"
        )


if __name__ == "__main__":
    main()
