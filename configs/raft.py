"""RAFT / best-of-N SFT (Dong et al. 2023, arXiv 2304.06767): SFT on the best of N policy samples.

    python -m bond.main --config=configs/raft.py --workdir=runs/raft
    python -m bond.main --config=configs/raft.py:quick --workdir=/tmp/raft_quick
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "raft"
    c.algo.num_samples = 8
    return apply_args(c, arg)
