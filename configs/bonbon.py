"""BoNBoN (Gui et al. 2024, arXiv 2406.00832): α·SFT(best of n) + (1−α)·IPO(best vs worst of n).

    python -m bond.main --config=configs/bonbon.py --workdir=runs/bonbon
    python -m bond.main --config=configs/bonbon.py:quick --workdir=/tmp/bonbon_quick

n = 8 reference samples per prompt, α = 0.5, IPO's β from 1/(2β) = (n−1)·H_{n−1}.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "bonbon"
    c.algo.n = 8.0
    c.algo.bonbon_alpha = 0.5
    return apply_args(c, arg)
