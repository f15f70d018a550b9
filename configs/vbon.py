"""vBoN (Amini et al. 2024, arXiv 2407.06057): backward KL to best-of-N, reward log F(r), β = 1/(N−1).

    python -m bond.main --config=configs/vbon.py --workdir=runs/vbon
    python -m bond.main --config=configs/vbon.py:quick --workdir=/tmp/vbon_quick
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "vbon"
    c.algo.n = 8.0
    c.algo.num_samples = 4
    c.algo.num_ref_samples = 16
    return apply_args(c, arg)
