"""WIND's losses as one-step self-play on the toy language (not the published method).

    python -m bond.main --config=configs/wind_self_play.py --workdir=runs/wind_self_play
    python -m bond.main --config=configs/wind_self_play.py:kl,quick --workdir=/tmp/wind_self_play_kl

configs/wind.py (variants and knobs alike) with π_t = the current policy at every step
(stop_gradient(π_θ)), four samples per prompt from it, no anchor. The expected square-loss gradient
is then parallel to the policy gradient of E_π[W_π] − β·KL(π‖π_ref) for every η, so η has no effect
under Adam (ALGORITHMS.md §4); WIND as published holds π_t fixed for an iteration.
"""

from pathlib import Path

from bond.config_base import base_config, load_config


def get_config(arg: str | None = None):
    c = load_config(f"{Path(__file__).with_name('wind.py')}:{arg or ''}")
    c.algorithm = "wind_self_play"
    c.anchor = base_config().anchor  # not read: the algorithm has no anchor
    return c
