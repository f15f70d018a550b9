"""WIND on the toy language: regularized win-rate dominance (Yang et al. 2024, arXiv 2410.20727).

    python -m bond.main --config=configs/wind.py --workdir=runs/wind            # square (pairwise) loss
    python -m bond.main --config=configs/wind.py:sppo --workdir=runs/wind_sppo
    python -m bond.main --config=configs/wind.py:kl,quick --workdir=/tmp/wind_kl_quick

Four samples per prompt from the current policy, preferences from rewards (ties ½), step size
η = 1 and KL-to-reference β = 0.1.
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "wind"
    c.algo.num_samples = 4
    c.algo.wind_eta = 1.0
    c.algo.wind_beta = 0.1
    c.algo.wind_variant = "square"
    variants = {v: (lambda c, v=v: setattr(c.algo, "wind_variant", v)) for v in ("square", "sppo", "kl")}
    return apply_args(c, arg, variants=variants)
