"""Iterative SPPO as published (Wu et al. 2024, arXiv 2405.00675, Alg. 1) on the toy language.

    python -m bond.main --config=configs/sppo.py --workdir=runs/sppo
    python -m bond.main --config=configs/sppo.py:quick --workdir=/tmp/sppo_quick

An iteration is config.anchor.period = 10 steps: π_t (a hard anchor) is held fixed, four samples per
prompt are drawn from it, each sample's win probability P̂(y ≻ π_t) is estimated from its
preferences against the prompt's other samples (from rewards, ties ½), and log π_θ(y) − log π_t(y)
regresses onto η·(P̂ − ½) with η = 10; then π_t ← π_θ. η is a starting point, not a tuned value.
The offline hard-label form with π_ref in place of π_t is configs/sppo_hard.py.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "sppo"
    c.algo.num_samples = 4
    c.algo.sppo_eta = 10.0
    c.anchor.update(kind="hard", period=10)
    return apply_args(c, arg)
