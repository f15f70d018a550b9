"""Iterative BOND on the toy language: distill Best-of-n of a moving anchor (BOND §5, arXiv 2407.14622).

    python -m bond.main --config=configs/iterative_bond.py --workdir=runs/iterative_bond       # hard anchor
    python -m bond.main --config=configs/iterative_bond.py:ema --workdir=runs/iterative_bond_ema
    python -m bond.main --config=configs/iterative_bond.py:quick --workdir=/tmp/ibond_quick

n = 2 with the anchor copied from the policy every 50 steps (M anchor moves ≈ Best-of-2^M of
π_ref), or an EMA anchor (`ema`, η = 0.05).
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "iterative_bond"
    c.algo.n = 2.0
    c.algo.beta = 0.5
    c.algo.num_samples = 4
    c.algo.num_ref_samples = 16
    c.anchor.kind = "hard"
    c.anchor.period = 50
    return apply_args(c, arg, variants={"ema": lambda c: c.anchor.update(kind="ema", eta=0.05)})
