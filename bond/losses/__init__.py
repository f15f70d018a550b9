"""Every alignment loss as a pure function: arrays in, `(loss, metrics)` out.

Groups are [B, S] (B prompts, S samples per prompt) with optional weights [B, S]; see
bond/losses/common.py for the shared conventions.
"""

from bond.losses.distillation import bond_backward_kl, bond_forward_kl, j_bond, j_bond_reward, jeffreys_bond
from bond.losses.wind import wind

__all__ = [
    "bond_backward_kl",
    "bond_forward_kl",
    "j_bond",
    "j_bond_reward",
    "jeffreys_bond",
    "wind",
]
