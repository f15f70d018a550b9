"""WIND as published on the toy language: regularized win-rate dominance (Yang et al. 2024, arXiv 2410.20727).

    python -m bond.main --config=configs/wind.py --workdir=runs/wind            # square (pairwise) loss
    python -m bond.main --config=configs/wind.py:sppo --workdir=runs/wind_sppo
    python -m bond.main --config=configs/wind.py:kl,quick --workdir=/tmp/wind_kl_quick

An iteration is config.anchor.period = 10 steps: π_t (a hard anchor) is held fixed, four samples per
prompt are drawn from it, and the policy fits one exact mirror-descent step from π_t (step size
η = 1, KL-to-reference β = 0.1; preferences from rewards, ties ½); then π_t ← π_θ. The one-step
self-play form (π_t = the current policy at every step) is `configs/wind_self_play.py`.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "wind"
    c.algo.num_samples = 4
    c.algo.wind_eta = 1.0
    c.algo.wind_beta = 0.1
    c.algo.wind_variant = "square"
    c.anchor.update(kind="hard", period=10)
    variants = {v: (lambda c, v=v: setattr(c.algo, "wind_variant", v)) for v in ("square", "sppo", "kl")}
    return apply_args(c, arg, variants=variants)
