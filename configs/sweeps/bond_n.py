"""BOND (Jeffreys, β = 0.5) distilling Best-of-N for N ∈ {2, 4, 8, 16} (BOND §4, arXiv 2407.14622).

    python -m bond.sweep --config=configs/sweeps/bond_n.py --workdir=runs/bond_n
    python -m bond.sweep --config=configs/sweeps/bond_n.py:quick --workdir=/tmp/bond_n --jobs=2

N is a static part of the step (the best-of-N sample is the best of the first N reference samples,
and N ≤ k = 16 fixes nothing else), so every point is its own program: the sweep runs the points
as separate processes (`--jobs` at a time). The target π_BoN moves further from π_ref as N grows:
KL(π_BoN‖π_ref) ≤ log N − (N−1)/N.
"""

from bond.sweep import product, sweep_config, with_base_args


def get_config(arg: str | None = None):
    return sweep_config(
        base=with_base_args("configs/bond.py", arg),
        axes=[product({"algo.n": [2.0, 4.0, 8.0, 16.0]})],
        seeds=[0],
        metric="eval/reward",
    )
