"""The base experiment config: every field an online run reads, with its default.

Each file in configs/ starts from `base_config()` and sets its algorithm's fields; the
defaults here are the default run (J-BOND on the toy language). Fields a sweep varies as
traced values (β, γ, η, N, learning-rate scale, seed) never change compiled shapes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import ml_collections

from bond.algorithms import default_algo_config


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run with its default: J-BOND on the toy language (see the comments per field)."""
    c = ml_collections.ConfigDict()
    c.algorithm = "j_bond"
    c.task = "toy_language"
    c.seed = 0

    # Policy / reference architecture (a small GPT-2-shaped decoder).
    c.model = ml_collections.ConfigDict(
        dict(num_layers=2, d_model=64, num_heads=4, d_ff=256, dtype="float32")
    )

    # Reference (SFT) pretraining on the task's corpus; cached under cache_dir and reused.
    c.reference = ml_collections.ConfigDict(
        dict(steps=1500, batch_size=128, learning_rate=3e-3, corpus_size=60_000, seed=0)
    )
    # Proxy reward model (tasks with a hidden gold reward only): Bradley–Terry on gold-labelled pairs.
    c.reward_model = ml_collections.ConfigDict(
        dict(use_proxy=False, steps=1000, batch_size=128, learning_rate=1e-3, num_pairs=40_000, seed=0)
    )
    c.cache_dir = ""  # "" = $BOND_CACHE or ~/.cache/bond

    # Online alignment.
    c.steps = 300
    c.batch_size = 64  # prompts per step
    c.learning_rate = 3e-4
    c.lr_scale = 1.0  # multiplies learning_rate; traced, so sweeps over it share one program
    c.grad_clip = 1.0
    c.temperature = 1.0
    c.top_k = 0
    c.top_p = 1.0
    c.min_new_tokens = 0  # sampling masks EOS for the first min_new_tokens tokens (0 = off); log-probs stay the model's
    # Algorithms whose gradient estimate assumes samples of the policy itself (`needs_on_policy_samples`:
    # score-function and regression losses) reject temperature != 1, top_k, top_p < 1 and
    # min_new_tokens > 0, which make the estimate biased; True accepts the bias (benchmarks that fix lengths).
    c.allow_biased_samples = False
    # Draw the reference samples an algorithm needs once per train prompt, reuse them every epoch.
    c.cache_reference_samples = True

    # Algorithm hyperparameters: every knob declared in bond/algorithms.py (`KNOBS`, with its meaning
    # and allowed values) at its default; each algorithm reads and validates the ones it names.
    c.algo = default_algo_config()
    # Anchor: 'none', 'hard' (copy the policy every anchor_period steps) or 'ema' (θ_a ← (1−η)θ_a + ηθ).
    c.anchor = ml_collections.ConfigDict(dict(kind="ema", eta=0.05, period=50))

    c.eval = ml_collections.ConfigDict(
        dict(every=50, num_prompts=16, exact=True, num_samples=32, bon_ns=(2, 4, 8, 16))
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3))
    c.log_every = 10
    # task='pretrained': a pretrained HF checkpoint aligned on text prompts (bond/tasks/pretrained.py).
    # The policy and the reference load from policy_path (no SFT stage; config.model and
    # config.reference are not read); rewards come from reward_path, WIND's pairwise preferences
    # from preference_path (a pair scorer) or else from the rewards.
    c.pretrained = ml_collections.ConfigDict(
        dict(
            policy_path="",  # HF checkpoint folder: config.json + *.safetensors (+ tokenizer files)
            tokenizer_path="",  # folder or tokenizer.json / tokenizer.model; "" = policy_path
            reward_path="",  # HF sequence-classification checkpoint (same tokenizer as the policy)
            preference_path="",  # sequence-classification checkpoint scoring x ⊕ y ⊕ separator ⊕ y' (WIND)
            preference_separator="",  # text between the two responses the pair scorer reads
            eos_token="",  # overrides the tokenizer's EOS, e.g. "<end_of_turn>" / "<|eot_id|>"
            chat_template=False,  # wrap each prompt as a user message in the checkpoint's chat template
            system_prompt="",  # with chat_template: a system message before each prompt
            prompts=dict(
                source="",  # 'tfds:xsum' | 'jsonl:/path/{split}.jsonl' | 'parquet:/path.parquet'
                field="prompt",  # the text field of each record (xsum: 'document')
                train_split="train",
                eval_split="validation",
                template="{text}",  # format string around the text, e.g. "Summarize: {text}"
                limit=0,  # train prompts to read (0 = all)
                data_dir="",  # TFDS data_dir ("" = TFDS's default)
            ),
            max_prompt_length=64,  # P: prompts are left-padded / truncated (keeping the end) to this
            max_new_tokens=32,  # L: response tokens sampled per prompt
            # Parameter dtype of policy, reference and judges ("" = as stored). Optimizer state and
            # the update math are float32 whatever this is.
            param_dtype="",
        )
    )

    # Weights & Biases logging of the metrics (pip install -e ".[wandb]"): off while project is "".
    # entity "" = your default entity; mode "" = wandb's default (online, or $WANDB_MODE), or
    # "offline" (sync later with `wandb sync`) or "disabled".
    c.wandb = ml_collections.ConfigDict(dict(project="", entity="", mode=""))

    # Memory at scale (README "Scaling to real models"); the defaults are the plain path, exact on CPU.
    c.memory = ml_collections.ConfigDict(
        dict(
            # Rematerialize each transformer block in the backward pass: 'none' keeps every activation,
            # 'dots_saveable' keeps only matmul outputs, 'nothing_saveable' recomputes the whole block.
            remat="none",
            # Split each step's prompts into this many micro-batches for sampling, scoring, the log-prob
            # passes and the gradient (accumulated; the samples and the loss's batch statistics stay the
            # full batch's). Must divide batch_size.
            micro_batches=1,
            # Response log-probs over chunks of this many vocabulary entries, never materializing the
            # [B, T, V] float32 logits (0 = one pass over the whole vocabulary).
            logprob_vocab_chunk=0,
            # Where the sampler's weights live while decoding: 'fsdp' as trained (gathered at every
            # token; for Gemma-7B on a v5e-8 XLA gathered all layers at once: no less than 'gathered'), 'gathered'
            # collected once per sampling call over the batch axes (tensor split kept), 'auto' =
            # 'gathered' when the mesh has an fsdp axis > 1. Weights that must stay split while
            # decoding need tensor parallelism instead (mesh (1, 1, -1); configs/pretrained/j_bond_gemma.py's lora).
            decode_weights="auto",
            # How attention is computed: 'einsum' (explicit scores and softmax), 'dot_product'
            # (jax.nn.dot_product_attention) or 'cudnn' (its fused flash kernel; NVIDIA GPUs, bfloat16).
            attention="einsum",
        )
    )
    # LoRA (README "LoRA"): rank 0 trains every weight; rank r > 0 trains low-rank adapters on
    # `targets` ('all' = every attention and MLP projection the model has, or a comma-separated list
    # of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) and keeps the base frozen:
    # the reference is the base itself. alpha: the adapters' output is scaled by alpha/rank (0: alpha = rank).
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets="all"))
    c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 absorbs the remaining devices
    c.num_devices = 0  # devices the mesh spans (the first ones); 0 = all
    c.plots = True
    return c


def quick(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `quick` variant of any config: a tiny budget for smoke tests and CI."""
    c.steps = 40
    c.batch_size = 16
    c.reference.steps = 200
    c.reference.corpus_size = 8_000
    c.reward_model.steps = 100
    c.reward_model.num_pairs = 4_000
    c.eval.every = 20
    c.eval.num_prompts = 4
    c.checkpoint.every = 20
    c.log_every = 10
    c.plots = False
    return c


def synthetic(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `synthetic` variant: the larger synthetic language, trained on a learned proxy reward
    and evaluated (by sampling) under the hidden gold reward — where over-optimization shows."""
    c.task = "synthetic_language"
    c.reward_model.use_proxy = True
    c.eval.exact = False
    c.model.update(num_layers=2, d_model=128, num_heads=4, d_ff=512)
    return c


def pretrained_smoke_run(c: ml_collections.ConfigDict, prompts: list[str], **pretrained) -> ml_collections.ConfigDict:
    """The 'pretrained' task shrunk to a smoke run on a CPU: small checkpoints (`pretrained`: their
    paths and options), the inline `prompts`, short float32 sequences, 3 steps of 8 prompts with an
    evaluation and a checkpoint inside the run. The `tiny` variants of configs/pretrained use it."""
    c.pretrained.update(
        dict(eos_token="", max_prompt_length=32, max_new_tokens=8, param_dtype="float32", chat_template=True),
        **pretrained,
    )
    c.pretrained.prompts.update(source="inline:" + json.dumps(prompts), template="{text}")
    c.update(steps=3, batch_size=8, log_every=1, plots=False, mesh_shape=(-1, 1, 1))
    c.memory = base_config().memory  # the plain path: nothing to save at this size
    c.eval.update(every=2, num_prompts=4, num_samples=4)
    c.checkpoint.update(every=2, keep=2)
    return c


def at_model_scale(c: ml_collections.ConfigDict, preset: str, batch_size: int,
                   judges: tuple[str, ...]) -> ml_collections.ConfigDict:
    """A pretrained config at a released model's shapes, for `--dry_run` without any file: the policy
    and the `judges` (config.pretrained fields: 'reward_path', 'preference_path') take the shape preset
    `preset` (bond/models/presets/<preset>.json, the model's config.json). Training it needs the
    checkpoints: set those fields to their folders."""
    c.pretrained.policy_path = f"preset:{preset}"
    for field in judges:
        c.pretrained[field] = f"preset:{preset}"
    c.batch_size = batch_size
    return c


def lora(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """LoRA of rank 16 on every attention and MLP projection (alpha 32), the base frozen as the
    reference; combines with the other variants (`configs/pretrained/j_bond_gemma.py:gemma_7b,lora`)."""
    c.lora.update(rank=16, alpha=32.0, targets="all")
    return c


def apply_args(c: ml_collections.ConfigDict, arg: str | None, variants: dict | None = None) -> ml_collections.ConfigDict:
    """Applies a config file's argument: comma-separated variant names, `quick` among them.

    `configs/wind.py:kl,quick` → the 'kl' variant of configs/wind.py with the quick budget;
    every config also accepts `synthetic` (the larger task with a proxy reward model) and `lora`
    (`lora` above, unless the config's `variants` give their own, e.g. sized for its hardware).
    """
    variants = dict(variants or {})
    variants["quick"] = quick
    variants["synthetic"] = synthetic
    variants.setdefault("lora", lora)
    for name in [a for a in (arg or "").split(",") if a]:
        if name not in variants:
            raise ValueError(f"unknown config argument {name!r}; this config accepts {sorted(variants)}.")
        variants[name](c)
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of a file spec `path/to/config.py[:arg]`, as `--config=` would load it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"bond_config_{Path(path).stem}", path)
    if module_spec is None or not Path(path).exists():
        raise FileNotFoundError(f"no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    """Sets the dotted field `field` ("algo.beta") of `config` to `value`, as `--config.<field>=value` does.

    The one setter of sweeps' points and overrides and of experiments' configs, so that a misspelled
    field fails there, named, instead of adding a field that no run reads.

    Raises:
      ValueError naming the field: when `config` has no such field, or when `value`'s type does not
      fit the field's (ml_collections keeps a field's type; an int may become a float).
    """
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f"config.{field} is not a field of the config; check its spelling.")
    try:
        node[leaf] = value
    except TypeError as e:
        raise ValueError(f"config.{field}={value!r} has the wrong type ({e}).") from None
