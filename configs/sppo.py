"""Online SPPO (Wu et al. 2024, arXiv 2405.00675; hard labels as TRL's sppo_hard) on the toy language.

    python -m bond.main --config=configs/sppo.py --workdir=runs/sppo
    python -m bond.main --config=configs/sppo.py:quick --workdir=/tmp/sppo_quick

Each step samples four responses per prompt from the current policy; the best and the worst by
reward (ties broken at random) form the chosen/rejected pair; β = 0.1.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "sppo"
    c.algo.num_samples = 4
    c.algo.pref_beta = 0.1
    return apply_args(c, arg)
