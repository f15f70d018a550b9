"""BOND with the Jeffreys divergence on the toy language (BOND §4, arXiv 2407.14622).

    python -m bond.main --config=configs/bond.py --workdir=runs/bond
    python -m bond.main --config=configs/bond.py:quick --workdir=/tmp/bond_quick

(1−β)·KL(π_BoN‖π) + β·KL(π‖π_BoN) with N = 8 and β = 0.5: the backward term's log-quantile is
estimated from k = 16 reference samples per prompt, the forward term's best-of-N sample is the
best of the first N of them. Set --config.algo.beta=0 (forward only) or 1 (backward only).
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "bond"
    c.algo.n = 8.0
    c.algo.beta = 0.5
    c.algo.num_samples = 4
    c.algo.num_ref_samples = 16
    return apply_args(c, arg)
