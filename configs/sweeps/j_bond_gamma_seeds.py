"""J-BOND's anchor-KL weight γ ∈ {0, 0.5, 1, 2} × 2 seeds (BOND §6, arXiv 2407.14622).

    python -m bond.sweep --config=configs/sweeps/j_bond_gamma_seeds.py --workdir=runs/j_bond_gamma
    python -m bond.sweep --config=configs/sweeps/j_bond_gamma_seeds.py:quick --workdir=/tmp/j_bond_gamma

γ weighs the extra KL(π‖π_anchor) regularizer of J-BOND's loss. γ and the seed are traced, so the
eight points train as one population (mode='population' insists on it); the sweep
benchmarks/sweep.py times.
"""

from bond.sweep import product, sweep_config, with_base_args


def get_config(arg: str | None = None):
    return sweep_config(
        base=with_base_args("configs/j_bond.py", arg),
        axes=[product({"algo.gamma": [0.0, 0.5, 1.0, 2.0]})],
        seeds=[0, 1],
        metric="eval/reward",
        mode="population",
    )
