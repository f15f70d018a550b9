"""J-BOND on the toy language: Jeffreys divergence to Best-of-2 of an EMA anchor (BOND §6, arXiv 2407.14622).

    python -m bond.main --config=configs/j_bond.py --workdir=runs/j_bond
    python -m bond.main --config=configs/j_bond.py:quick --workdir=/tmp/j_bond_quick

One policy sample and two anchor samples per prompt; β = 0.5, EMA η = 0.05, γ = 0 by default
(the paper sweeps η ∈ {0.01, 0.02, 0.05, 0.1} and γ ∈ {0, 0.5, 1, 2}). This is the default run.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "j_bond"
    c.algo.num_samples = 1
    c.algo.beta = 0.5
    c.algo.gamma = 0.0
    c.anchor.kind = "ema"
    c.anchor.eta = 0.05
    return apply_args(c, arg)
