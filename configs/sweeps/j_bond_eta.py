"""J-BOND's EMA anchor rate η ∈ {0.01, 0.05, 0.1} × 3 seeds (BOND §6, arXiv 2407.14622).

    python -m bond.sweep --config=configs/sweeps/j_bond_eta.py --workdir=runs/j_bond_eta
    python -m bond.sweep --config=configs/sweeps/j_bond_eta.py:quick --workdir=/tmp/j_bond_eta

η moves the anchor towards the policy, θ_anchor ← (1 − η)·θ_anchor + η·θ: a small η keeps the
Best-of-2 target close to where training started, a large one chases the policy (the paper sweeps
η ∈ {0.01, 0.02, 0.05, 0.1}). η is traced, so the nine points train as one population.
"""

from bond.sweep import product, sweep_config, with_base_args


def get_config(arg: str | None = None):
    return sweep_config(
        base=with_base_args("configs/j_bond.py", arg),
        axes=[product({"anchor.eta": [0.01, 0.05, 0.1]})],
        seeds=[0, 1, 2],
        metric="eval/reward",
    )
