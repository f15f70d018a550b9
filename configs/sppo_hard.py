"""Online sppo_hard (TRL's offline form of SPPO, Wu et al. 2024, arXiv 2405.00675) on the toy language.

    python -m bond.main --config=configs/sppo_hard.py --workdir=runs/sppo_hard
    python -m bond.main --config=configs/sppo_hard.py:quick --workdir=/tmp/sppo_hard_quick

Not SPPO as published (that is configs/sppo.py): the log-ratios are to the fixed π_ref, not to the
iterate π_t, and the labels are hard (the winner's win probability 1, the loser's 0).

Each step samples four responses per prompt from the current policy; the best and the worst by
reward (ties broken at random) form the chosen/rejected pair; β = 0.1.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "sppo_hard"
    c.algo.num_samples = 4
    c.algo.pref_beta = 0.1
    return apply_args(c, arg)
