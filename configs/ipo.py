"""Online IPO (Azar et al. 2023, arXiv 2310.12036) on the toy language.

    python -m bond.main --config=configs/ipo.py --workdir=runs/ipo
    python -m bond.main --config=configs/ipo.py:quick --workdir=/tmp/ipo_quick

Each step samples four responses per prompt from the current policy; the best and the worst by
reward (ties broken at random) form the chosen/rejected pair; β = 0.1.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "ipo"
    c.algo.num_samples = 4
    c.algo.pref_beta = 0.1
    return apply_args(c, arg)
