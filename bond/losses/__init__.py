"""Every alignment loss as a pure function: arrays in, `(loss, metrics)` out.

Groups are [B, S] (B prompts, S samples per prompt) with optional weights [B, S]; see
bond/losses/common.py for the shared conventions. Each loss's docstring states its objective and
its paper.
"""

from bond.losses.distillation import bond_backward_kl, bond_forward_kl, j_bond, j_bond_reward, jeffreys_bond
from bond.losses.distribution_matching import dpg, gdc_pp
from bond.losses.policy_gradient import reinforce, vbon, vbon_reward
from bond.losses.preference import dpo, ipo, sppo_hard
from bond.losses.rejection_sft import best_of_n_sft, bonbon, bonbon_beta
from bond.losses.wind import wind

__all__ = [
    "best_of_n_sft",
    "bonbon",
    "bonbon_beta",
    "bond_backward_kl",
    "bond_forward_kl",
    "dpg",
    "dpo",
    "gdc_pp",
    "ipo",
    "j_bond",
    "j_bond_reward",
    "jeffreys_bond",
    "reinforce",
    "sppo_hard",
    "vbon",
    "vbon_reward",
    "wind",
]
