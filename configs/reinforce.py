"""REINFORCE with a KL penalty to the reference and the RLOO baseline (Ahmadian et al. 2024, arXiv 2402.14740).

    python -m bond.main --config=configs/reinforce.py --workdir=runs/reinforce
    python -m bond.main --config=configs/reinforce.py:quick --workdir=/tmp/reinforce_quick

Return r − β_RL·(log π − log π_ref) with β_RL = 0.05, four samples per prompt; the BOND paper
compares J-BOND with β_RL ∈ {0.001, 0.01, 0.1, 1}.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "reinforce"
    c.algo.num_samples = 4
    c.algo.kl_coef = 0.05
    return apply_args(c, arg)
