"""Language models: a decoder-only transformer (GPT-2 and the Llama/Gemma family; KV cache, logical axis
names), the one reward interface and reward models (reward.py), pairwise preferences (preference.py),
and HF-format checkpoints."""

from bond.models.pretrained import (
    load_pretrained,
    load_reward_model,
    reward_scores,
    save_pretrained,
)
from bond.models.preference import PairJudge, preference_matrix, preferences_from_rewards
from bond.models.reward import (
    Responses,
    RewardFn,
    RewardModel,
    bradley_terry_loss,
    init_reward_params,
    response_rows,
    reward_model_fn,
    reward_model_scores,
    reward_param_logical_axes,
)
from bond.models.transformer import (
    KVCache,
    LayerCache,
    Transformer,
    TransformerConfig,
    as_transformer,
    config_from_gpt2,
    count_params,
    init_cache,
    init_params,
    logits,
    param_logical_axes,
    positions_from_mask,
    sequence_logprobs,
)

__all__ = [
    "KVCache",
    "LayerCache",
    "PairJudge",
    "Responses",
    "RewardFn",
    "RewardModel",
    "Transformer",
    "TransformerConfig",
    "as_transformer",
    "bradley_terry_loss",
    "config_from_gpt2",
    "count_params",
    "init_cache",
    "init_params",
    "init_reward_params",
    "load_pretrained",
    "load_reward_model",
    "logits",
    "param_logical_axes",
    "positions_from_mask",
    "preference_matrix",
    "preferences_from_rewards",
    "response_rows",
    "reward_model_fn",
    "reward_model_scores",
    "reward_param_logical_axes",
    "reward_scores",
    "save_pretrained",
    "sequence_logprobs",
]
