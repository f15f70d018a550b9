"""Online DPO (Rafailov et al. 2023, arXiv 2305.18290) on the toy language.

    python -m bond.main --config=configs/dpo.py --workdir=runs/dpo
    python -m bond.main --config=configs/dpo.py:quick --workdir=/tmp/dpo_quick

Each step samples four responses per prompt from the current policy; the best and the worst by
reward (ties broken at random) form the chosen/rejected pair; β = 0.1.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "dpo"
    c.algo.num_samples = 4
    c.algo.pref_beta = 0.1
    return apply_args(c, arg)
