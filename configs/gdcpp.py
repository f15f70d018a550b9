"""GDC++: distribution matching with a baseline (Korbak et al. 2022, arXiv 2206.00761).

    python -m bond.main --config=configs/gdcpp.py --workdir=runs/gdcpp
    python -m bond.main --config=configs/gdcpp.py:quick --workdir=/tmp/gdcpp_quick

Target p(y|x) ∝ π_ref(y|x)·exp(r(x, y)/τ) with τ = 1 (the KL-control optimum), proposal q = π,
Ẑ a running mean of P/q over the samples of every earlier step (carried in the train state).
"""

from bond.config_base import apply_args, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "gdcpp"
    c.algo.num_samples = 4
    c.algo.target_temperature = 1.0
    return apply_args(c, arg)
