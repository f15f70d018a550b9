"""Decoder-only transformer language models (GPT-2 and the Llama/Gemma family) with an explicit KV cache.

One code path covers both families. The default TransformerConfig is GPT-2 (Radford et al. 2019,
"Language Models are Unsupervised Multitask Learners"): learned token and absolute position
embeddings, `num_layers` pre-LayerNorm blocks

    h = x + Attention(LN_1(x)),    out = h + MLP(LN_2(h)),    MLP(z) = W_2 gelu_tanh(W_1 z + b_1) + b_2,

a final LayerNorm, and logits = LN_f(h) E^T with the token embedding E (tied) or a separate
projection. The config's switches give the Llama/Gemma family (Touvron et al. 2023, "LLaMA";
Gemma Team 2024, "Gemma"):

  * norm='rms_norm': RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019), with
    norm_unit_offset=True the scale is (1 + w) (Gemma);
  * position_embedding='rope': rotary position embeddings (Su et al. 2021, "RoFormer") in the
    "rotate_half" layout of HF transformers (channel i pairs with channel i + head_dim / 2), so HF
    checkpoints load without permuting q/k weights; no learned positions;
  * num_kv_heads < num_heads: grouped-query attention (Ainslie et al. 2023, "GQA"): query head h
    reads key/value head h // (num_heads / num_kv_heads);
  * gated_mlp=True: MLP(z) = W_2 (act(W_g z) * (W_1 z)), SwiGLU with activation='silu' (Llama,
    Mistral, Qwen2) or GeGLU with 'gelu_tanh' (Gemma) (Shazeer 2020, "GLU Variants Improve Transformer");
  * explicit_head_dim: a head width other than d_model / num_heads (Gemma);
  * qkv_bias / out_bias / mlp_bias: which projections have biases (GPT-2 all, Qwen2 q/k/v only,
    Llama none);
  * scale_embeddings=True: token embeddings times sqrt(d_model), rounded to the compute dtype (Gemma).

Every parameter carries logical axis names ('vocab', 'embed', 'mlp', 'heads', 'kv', 'position') so
that sharding is a table of rules from these names to mesh axes (bond/sharding.py); key/value
projections of grouped-query attention use 'heads' too (a mesh axis that does not divide
num_kv_heads leaves them replicated).

Token layout (one convention for the codebase): id 0 is the single BOS/EOS/PAD token; prompts are
LEFT-padded; a token's position is `cumsum(mask) - 1` (clipped at 0), so padding never shifts a real
token's position, and padded keys are masked out of attention.

Decoding uses an explicit cache pytree (`KVCache`, one `LayerCache` per block) of fixed length S:
a call with T new tokens writes their keys/values at cache slots [cache_index, cache_index + T) and
lets the query in slot i attend to the keys in slots j <= i whose `key_mask` is 1. Without a cache,
slots are the sequence indices 0..T-1 and the same rule is plain causal attention. The cache holds
num_kv_heads heads per layer, and keys are stored after the rotary embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from bond.sharding import constrain_batch

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
NORMS = ("layer_norm", "rms_norm")
# Which activations of a block the backward pass keeps (TransformerConfig.remat); the rest it recomputes.
# Projections a LoRA adapter may target, by PEFT's names: attention query / key / value / output
# (modules query, key, value, out), MLP gate / up (fc_gate, fc_in) / down (fc_out).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = {
    "none": None,  # no rematerialization: every activation is kept
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # keep only the block's inputs
}
# How a block attends (TransformerConfig.attention): 'einsum' is the explicit einsum/softmax below;
# the others call jax.nn.dot_product_attention with implementation None (jax's choice: XLA today) or
# 'cudnn' (fused flash attention on NVIDIA GPUs, bfloat16/float16 only).
ATTENTIONS = {"einsum": None, "dot_product": None, "cudnn": "cudnn"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
POSITION_EMBEDDINGS = ("learned", "rope")

# Keeps a fully masked attention row finite (uniform weights) instead of NaN; such rows only occur
# for queries at padded positions, whose outputs are never read.
_MASKED_SCORE = -1e30


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      vocab_size: number of token ids (id 0 is BOS/EOS/PAD).
      num_layers: number of transformer blocks.
      d_model: width of the residual stream.
      num_heads: attention (query) heads; without `explicit_head_dim`, `d_model` must be divisible
        by it (head_dim = d_model / num_heads).
      d_ff: hidden width of the MLP.
      max_len: longest sequence the model accepts (the number of learned positions, or the
        checkpoint's max_position_embeddings with rotary positions).
      activation: MLP nonlinearity, one of ACTIVATIONS ('gelu_tanh' = GPT-2's "gelu_new").
      layer_norm_epsilon: epsilon of every normalisation layer (LayerNorm or RMSNorm).
      tie_embeddings: logits use the transposed token embedding (GPT-2) instead of a separate matrix.
      dtype: compute dtype of matmuls (softmax and log-softmax are always float32).
      param_dtype: storage dtype of the parameters.
      norm: 'layer_norm' (GPT-2) or 'rms_norm' (Llama/Gemma).
      norm_unit_offset: RMSNorm scales by (1 + w) with w initialised at 0 (Gemma).
      position_embedding: 'learned' absolute positions (GPT-2) or 'rope' rotary embeddings.
      rope_theta: base of the rotary frequencies theta^(-2i / head_dim).
      rope_scaling: () for plain rotary frequencies, or HF rope_parameters as sorted (key, value)
        pairs with 'rope_type' 'linear' (frequencies / factor) or 'llama3' (Llama 3.1's
        wavelength-dependent rescaling; keys factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings).
      num_kv_heads: key/value heads of grouped-query attention (None = num_heads); must divide num_heads.
      explicit_head_dim: width of one head (None = d_model / num_heads).
      gated_mlp: MLP(z) = W_2 (act(W_g z) * W_1 z) (SwiGLU / GeGLU) instead of W_2 act(W_1 z).
      qkv_bias: the query/key/value projections have biases.
      out_bias: the attention output projection has a bias.
      mlp_bias: the MLP projections have biases.
      scale_embeddings: multiply token embeddings by sqrt(d_model) in the compute dtype (Gemma).
      remat: rematerialize each block in the backward pass, one of REMAT_POLICIES ('none' keeps
        every activation; 'dots_saveable' keeps matmul outputs; 'nothing_saveable' keeps only the
        block inputs). The values and gradients are the same; only memory and compute change.
      attention: one of ATTENTIONS: 'einsum' (explicit scores and softmax), 'dot_product'
        (jax.nn.dot_product_attention) or 'cudnn' (its fused cuDNN kernel; NVIDIA GPUs, 16-bit
        dtypes). The same function; the dot-product forms differ from 'einsum' by float rounding.
      lora_rank, lora_alpha, lora_targets: low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685)
        on the projections named in lora_targets (LORA_TARGETS, PEFT's names): W x becomes
        W x + (α/r)·B A x with A [fan_in, r], B [r, fan_out]. `init_params` then also creates the
        adapters (B = 0, so the model starts as its base); a parameter tree without them (the base
        alone, `bond.lora.base_of`) computes the plain model. rank 0: no adapters.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    max_len: int
    activation: str = "gelu_tanh"
    layer_norm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    norm: str = "layer_norm"
    norm_unit_offset: bool = False
    position_embedding: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    num_kv_heads: int | None = None
    explicit_head_dim: int | None = None
    gated_mlp: bool = False
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    scale_embeddings: bool = False
    remat: str = "none"
    attention: str = "einsum"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}.")
        for name in ("num_kv_heads", "explicit_head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"TransformerConfig.{name} must be None or a positive int, got {value!r}.")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"TransformerConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})."
            )
        if self.norm not in NORMS:
            raise ValueError(f"TransformerConfig.norm must be one of {NORMS}, got {self.norm!r}.")
        if self.norm_unit_offset and self.norm != "rms_norm":
            raise ValueError("TransformerConfig.norm_unit_offset=True needs norm='rms_norm'.")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"TransformerConfig.position_embedding must be one of {POSITION_EMBEDDINGS}, "
                f"got {self.position_embedding!r}."
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}.")
        if not self.rope_theta > 0:
            raise ValueError(f"TransformerConfig.rope_theta must be > 0, got {self.rope_theta!r}.")
        if self.rope_scaling:
            scaling = dict(self.rope_scaling)
            needed = {"linear": {"factor"}, "llama3": set(LLAMA3_ROPE_KEYS)}.get(scaling.get("rope_type"))
            if needed is None:
                raise ValueError(
                    "TransformerConfig.rope_scaling must have rope_type 'linear' or 'llama3', got "
                    f"{scaling.get('rope_type')!r}."
                )
            if not needed <= set(scaling):
                raise ValueError(
                    f"TransformerConfig.rope_scaling of type {scaling['rope_type']!r} needs the keys {sorted(needed)}, "
                    f"got {sorted(scaling)}."
                )
        if self.explicit_head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be divisible by num_heads "
                f"({self.num_heads}); pick num_heads among the divisors of d_model."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TransformerConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}."
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"TransformerConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"TransformerConfig.remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}.")
        if self.attention not in ATTENTIONS:
            raise ValueError(
                f"TransformerConfig.attention must be one of {tuple(ATTENTIONS)}, got {self.attention!r}."
            )
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ValueError(f"TransformerConfig.lora_rank must be an int >= 0 (0 = no adapters), got {self.lora_rank!r}.")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"TransformerConfig.lora_targets: unknown {sorted(unknown)}; choose among {LORA_TARGETS}.")
        if "gate_proj" in self.lora_targets and not self.gated_mlp:
            raise ValueError("TransformerConfig.lora_targets names 'gate_proj', but this model's MLP is not gated.")

    @property
    def lora_scale(self) -> float:
        """α/r, the factor of the adapters' output (α = r when lora_alpha is 0)."""
        return (self.lora_alpha or self.lora_rank) / self.lora_rank if self.lora_rank else 0.0

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.explicit_head_dim or self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (num_heads without grouped-query attention)."""
        return self.num_kv_heads or self.num_heads


def config_from_gpt2(hf_config: dict, **overrides: Any) -> TransformerConfig:
    """TransformerConfig from a HF GPT-2 style dict (n_layer, n_embd, n_head, n_inner, ...).

    `n_inner=None` means 4 * n_embd, as in HF transformers' GPT2Config.
    """
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in activations:
        raise ValueError(
            f"activation_function {activation!r} has no equivalent here; use one of {sorted(activations)}."
        )
    n_embd = hf_config["n_embd"]
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        num_layers=hf_config["n_layer"],
        d_model=n_embd,
        num_heads=hf_config["n_head"],
        d_ff=hf_config.get("n_inner") or 4 * n_embd,
        max_len=hf_config["n_positions"],
        activation=activations[activation],
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf_config.get("tie_word_embeddings", True),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


class LayerCache(NamedTuple):
    """Keys and values of one attention layer, each [batch, num_kv_heads, cache_len, head_dim]."""

    keys: jax.Array
    values: jax.Array


KVCache = tuple[LayerCache, ...]


def init_cache(config: TransformerConfig, batch_size: int, length: int) -> KVCache:
    """An all-zero KV cache with `length` slots for `batch_size` sequences."""
    if length > config.max_len:
        raise ValueError(
            f"cache length {length} exceeds TransformerConfig.max_len={config.max_len}; "
            "shorten the prompt or the number of new tokens, or raise max_len."
        )
    shape = (batch_size, config.kv_heads, length, config.head_dim)
    return tuple(
        LayerCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))
        for _ in range(config.num_layers)
    )


def positions_from_mask(mask: ArrayLike) -> jax.Array:
    """Positions of a left-padded batch: cumsum(mask) - 1 along the last axis, clipped at 0."""
    mask = jnp.asarray(mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def rope_frequencies(config: TransformerConfig) -> jax.Array:
    """The head_dim / 2 rotary frequencies (float32) that `positions` multiply.

    Plain: f_i = theta^(-2i / head_dim) (Su et al. 2021). 'linear' scaling: f_i / factor. 'llama3'
    (Llama 3.1; HF transformers' `_compute_llama3_parameters`): with wavelength w_i = 2 pi / f_i and
    old context L, f_i / factor where w_i > L / low_freq_factor, f_i where w_i < L / high_freq_factor,
    and in between the interpolation (1 - s) f_i / factor + s f_i, s = (L / w_i - low) / (high - low).
    """
    exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
    freqs = 1.0 / (config.rope_theta**exponents)
    scaling = dict(config.rope_scaling)
    if scaling.get("rope_type") == "linear":
        return freqs / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        factor, low, high, context = (scaling[k] for k in LLAMA3_ROPE_KEYS)
        wavelength = 2 * math.pi / freqs
        scaled = jnp.where(wavelength > context / low, freqs / factor, freqs)
        smooth = (context / wavelength - low) / (high - low)
        interpolated = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        return jnp.where(medium, interpolated, scaled)
    return freqs


def rope_tables(config: TransformerConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, head_dim] of the rotary embedding at integer `positions` [B, T].

    Channel pair (i, i + head_dim / 2) rotates by the angle position * f_i (`rope_frequencies`),
    computed in float32 and rounded to the compute dtype, as HF transformers' LlamaRotaryEmbedding does.
    """
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(config)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(config.dtype), jnp.sin(angles).astype(config.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates heads x [B, H, T, head_dim] by the tables [B, T, head_dim]: x cos + rotate_half(x) sin,
    rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2]) (HF transformers' layout)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _normal(stddev: float, names: tuple[str, ...]):
    """N(0, stddev^2) initializer with logical axis names.

    Draws a flat vector and reshapes it: XLA:CPU compiles a flat threefry draw several times
    faster than one shaped like a multi-axis kernel, and initialisation is compiled once per run.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return (stddev * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)

    return nn.with_logical_partitioning(init, names)


def _zeros(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w, or * (1 + w) with `config.norm_unit_offset`.

    Zhang & Sennrich 2019, "Root Mean Square Layer Normalization". Normalised in float32; the
    scale multiplies in float32 with the unit offset (Gemma) and in the compute dtype without it
    (Llama), as in HF transformers.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.zeros_init() if c.norm_unit_offset else nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, ("embed",)), (c.d_model,), c.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.layer_norm_epsilon)
        if c.norm_unit_offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(c.dtype)
        return normed.astype(c.dtype) * scale.astype(c.dtype)


def _norm(config: TransformerConfig, name: str) -> nn.Module:
    if config.norm == "rms_norm":
        return RMSNorm(config, name=name)
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)),
        name=name,
    )


# GPT-2 initialisation: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 L).
_INIT_STD = 0.02


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., n] @ kernel [n, m] as one 2-D matmul (XLA:CPU runs these fastest)."""
    out = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return out.reshape(x.shape[:-1] + kernel.shape[-1:])


class LoraAdapter(nn.Module):
    """The low-rank term (α/r)·(x A) B of an adapted projection: x [..., fan_in] → [..., fan_out],
    A [fan_in, r] ~ N(0, 1/fan_in), B [r, fan_out] = 0 at initialisation (LoRA, Hu et al. 2021).

    Returns None when the parameters being applied have no adapter here (the base model alone), so
    one model config serves the policy (base + adapters) and the reference (the base)."""

    config: TransformerConfig
    fan_in: int
    fan_out: int
    in_axis: str | None
    out_axis: str | None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | None:
        c = self.config
        if not self.is_initializing() and not self.has_variable("params", "a"):
            return None
        a = self.param("a", _normal(self.fan_in**-0.5, (self.in_axis, None)), (self.fan_in, c.lora_rank), c.param_dtype)
        b = self.param("b", _zeros((None, self.out_axis)), (c.lora_rank, self.fan_out), c.param_dtype)
        x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=c.dtype)
        return _matmul(_matmul(x, a), b) * jnp.asarray(c.lora_scale, c.dtype)


def _lora(config: TransformerConfig, target: str, fan_in: int, fan_out: int, in_axis: str | None,
          out_axis: str | None, name: str) -> LoraAdapter | None:
    """The adapter of `target` (a LORA_TARGETS name), or None when the config does not adapt it."""
    if not config.lora_rank or target not in config.lora_targets:
        return None
    return LoraAdapter(config, fan_in, fan_out, in_axis, out_axis, name=name)


def _plus_lora(out: jax.Array, adapter: LoraAdapter | None, x: jax.Array) -> jax.Array:
    delta = None if adapter is None else adapter(x)
    return out if delta is None else out + delta


class HeadProjection(nn.Module):
    """x [B, T, D] -> [B, H, T, head_dim]: a per-head linear map, kernel [D, H, head_dim] (+ bias).

    H is `num_heads` (config.num_heads for queries, config.kv_heads for keys and values).
    Head-major output keeps the KV cache [B, H, S, head_dim] contiguous per head, so decoding
    attends with batched matmuls and never transposes the cache.
    """

    config: TransformerConfig
    num_heads: int
    lora_target: str = ""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        shape = (c.d_model, self.num_heads, c.head_dim)
        kernel = self.param("kernel", _normal(_INIT_STD, ("embed", "heads", "kv")), shape, c.param_dtype)
        bias = self.param("bias", _zeros(("heads", "kv")), shape[1:], c.param_dtype) if c.qkv_bias else None
        adapter = _lora(c, self.lora_target, c.d_model, self.num_heads * c.head_dim, "embed", None, "lora")
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=c.dtype)
        out = _plus_lora(_matmul(x, kernel.reshape(c.d_model, -1)), adapter, x)
        if bias is not None:
            out = out + bias.reshape(-1)
        return out.reshape(x.shape[:2] + shape[1:]).transpose(0, 2, 1, 3)


class HeadMerge(nn.Module):
    """[B, H, T, head_dim] -> [B, T, D]: the attention output projection, kernel [H, head_dim, D] (+ bias)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        shape = (c.num_heads, c.head_dim, c.d_model)
        init_std = _INIT_STD / math.sqrt(2 * c.num_layers)
        kernel = self.param("kernel", _normal(init_std, ("heads", "kv", "embed")), shape, c.param_dtype)
        bias = self.param("bias", _zeros(("embed",)), shape[2:], c.param_dtype) if c.out_bias else None
        adapter = _lora(c, "o_proj", c.num_heads * c.head_dim, c.d_model, None, "embed", "lora")
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=c.dtype)
        batch, _, length, _ = x.shape
        merged = x.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        out = _plus_lora(_matmul(merged, kernel.reshape(-1, c.d_model)), adapter, merged)
        return out if bias is None else out + bias


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention over an optional KV cache."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        allowed: jax.Array,
        layer_cache: LayerCache | None,
        cache_index: jax.Array | int,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D]; allowed [B, T, S] bool (query t may attend key slot s); rope: (cos, sin) or None."""
        c = self.config
        query = HeadProjection(c, c.num_heads, "q_proj", name="query")(x)
        key = HeadProjection(c, c.kv_heads, "k_proj", name="key")(x)
        value = HeadProjection(c, c.kv_heads, "v_proj", name="value")(x)
        if rope is None:
            query = query * c.head_dim**-0.5
        else:
            query = apply_rope(query, *rope) * jnp.asarray(c.head_dim**-0.5, c.dtype)
            key = apply_rope(key, *rope)
        if layer_cache is not None:
            start = (0, 0, cache_index, 0)
            key = jax.lax.dynamic_update_slice(layer_cache.keys, key.astype(layer_cache.keys.dtype), start)
            value = jax.lax.dynamic_update_slice(layer_cache.values, value.astype(layer_cache.values.dtype), start)
            layer_cache = LayerCache(key, value)
        if c.attention != "einsum":
            mixed = _dot_product_attention(query, key, value, allowed, ATTENTIONS[c.attention])
            return HeadMerge(c, name="out")(mixed), layer_cache
        groups = c.num_heads // c.kv_heads
        if groups == 1:
            scores = jnp.einsum("bhtk,bhsk->bhts", query, key).astype(jnp.float32)
            scores = jnp.where(allowed[:, None, :, :], scores, _MASKED_SCORE)
            weights = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
            mixed = jnp.einsum("bhts,bhsk->bhtk", weights, value)
        else:
            # Query head h = j * groups + g reads key/value head j (HF's repeat_kv order).
            batch, _, length, _ = query.shape
            grouped = query.reshape(batch, c.kv_heads, groups, length, c.head_dim)
            scores = jnp.einsum("bhgtk,bhsk->bhgts", grouped, key).astype(jnp.float32)
            scores = jnp.where(allowed[:, None, None, :, :], scores, _MASKED_SCORE)
            weights = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
            mixed = jnp.einsum("bhgts,bhsk->bhgtk", weights, value).reshape(query.shape)
        return HeadMerge(c, name="out")(mixed), layer_cache


def _dot_product_attention(query, key, value, allowed, implementation: str | None) -> jax.Array:
    """`Attention`'s mixing step through jax.nn.dot_product_attention: query [B, H, T, head_dim]
    (already scaled by head_dim^-1/2), key and value [B, K, S, head_dim] (K divides H, query head
    h reads key head h // (H / K)), allowed [B, T, S] bool -> [B, H, T, head_dim].

    jax's kernels take [B, T, heads, head_dim]; a fully masked row (a padded query) gets uniform
    weights over its keys, finite as in the einsum path.
    """
    to_jax = lambda x: x.transpose(0, 2, 1, 3)
    mixed = jax.nn.dot_product_attention(
        to_jax(query), to_jax(key), to_jax(value), mask=allowed[:, None], scale=1.0, implementation=implementation,
    )
    return to_jax(mixed)


class Mlp(nn.Module):
    """Position-wise MLP: W_out act(W_in x + b_in) + b_out, or gated W_out (act(W_gate x) * W_in x)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = functools.partial(nn.Dense, use_bias=c.mlp_bias, dtype=c.dtype, param_dtype=c.param_dtype)
        h = dense(
            c.d_ff,
            kernel_init=_normal(_INIT_STD, ("embed", "mlp")),
            bias_init=_zeros(("mlp",)),
            name="fc_in",
        )(x)
        h = _plus_lora(h, _lora(c, "up_proj", c.d_model, c.d_ff, "embed", "mlp", "fc_in_lora"), x)
        if c.gated_mlp:
            gate = dense(
                c.d_ff,
                kernel_init=_normal(_INIT_STD, ("embed", "mlp")),
                bias_init=_zeros(("mlp",)),
                name="fc_gate",
            )(x)
            gate = _plus_lora(gate, _lora(c, "gate_proj", c.d_model, c.d_ff, "embed", "mlp", "fc_gate_lora"), x)
            h = ACTIVATIONS[c.activation](gate) * h
        else:
            h = ACTIVATIONS[c.activation](h)
        out = dense(
            c.d_model,
            kernel_init=_normal(_INIT_STD / math.sqrt(2 * c.num_layers), ("mlp", "embed")),
            bias_init=_zeros(("embed",)),
            name="fc_out",
        )(h)
        return _plus_lora(out, _lora(c, "down_proj", c.d_ff, c.d_model, "mlp", "embed", "fc_out_lora"), h)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(Norm(x)), then + MLP(Norm(.))."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, allowed, layer_cache, cache_index, rope=None):
        h, layer_cache = Attention(self.config, name="attn")(
            _norm(self.config, "ln_1")(x), allowed, layer_cache, cache_index, rope
        )
        x = x + h
        x = x + Mlp(self.config, name="mlp")(_norm(self.config, "ln_2")(x))
        return x, layer_cache


class Transformer(nn.Module):
    """Decoder-only transformer LM.

    `__call__(tokens, positions, key_mask, cache=None, cache_index=0) -> (logits, cache)`:
      tokens [B, T] int, positions [B, T] int, key_mask [B, S] (1 = a key slot that may be attended;
      S = T without a cache, S = cache length with one), logits [B, T, V] float32.
    `hidden_states(...)` is the same up to the final norm, returning [B, T, D].
    """

    config: TransformerConfig

    def setup(self):
        c = self.config
        self.wte = nn.Embed(
            c.vocab_size,
            c.d_model,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=_normal(_INIT_STD, ("vocab", "embed")),
        )
        if c.position_embedding == "learned":
            self.wpe = nn.Embed(
                c.max_len,
                c.d_model,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                embedding_init=_normal(_INIT_STD / 2, ("position", "embed")),  # 0.01, as in GPT-2's code
            )
        block = Block if c.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[c.remat])
        self.blocks = [block(c) for _ in range(c.num_layers)]  # named blocks_0, blocks_1, ... either way
        self.ln_f = _norm(c, "ln_f")
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(
                c.vocab_size,
                use_bias=False,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                kernel_init=_normal(_INIT_STD, ("embed", "vocab")),
            )

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        key_mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, T, D] and the updated cache."""
        c = self.config
        tokens, positions, key_mask = constrain_batch((tokens, positions, key_mask))
        num_queries, num_keys = tokens.shape[1], key_mask.shape[1]
        query_slots = cache_index + jnp.arange(num_queries)
        causal = jnp.arange(num_keys)[None, :] <= query_slots[:, None]
        allowed = causal[None, :, :] & (key_mask[:, None, :] > 0)
        x = self.wte(tokens)
        if c.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(c.d_model), c.dtype)
        rope = None
        if c.position_embedding == "learned":
            x = x + self.wpe(positions)
        else:
            rope = rope_tables(c, positions)
        x = constrain_batch(x)  # the residual stream split over the batch axes (under a mesh in context)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = constrain_batch(block(x, allowed, None if cache is None else cache[i], cache_index, rope))
            new_cache.append(layer_cache)
        return self.ln_f(x), (None if cache is None else tuple(new_cache))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        key_mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, KVCache | None]:
        hidden, cache = self.hidden_states(tokens, positions, key_mask, cache, cache_index)
        return self.project(hidden), cache

    def project(self, hidden: jax.Array) -> jax.Array:
        """Logits [..., V] (float32) from final-norm hidden states [..., D]."""
        out = self.wte.attend(hidden) if self.config.tie_embeddings else self.lm_head(hidden)
        return out.astype(jnp.float32)


def as_transformer(model: Transformer | TransformerConfig) -> Transformer:
    """The Transformer module for `model` (a Transformer or a TransformerConfig)."""
    if isinstance(model, Transformer):
        return model
    if isinstance(model, TransformerConfig):
        return Transformer(model)
    raise ValueError(f"model must be a Transformer or a TransformerConfig, got {type(model).__name__}.")


def _init_variables(config: TransformerConfig, key: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(key, tokens, tokens, jnp.ones((1, 1), jnp.int32))


@functools.partial(jax.jit, static_argnames="config")
def init_params(config: TransformerConfig, key: jax.Array) -> dict:
    """Randomly initialised parameters (GPT-2 init) as a plain nested dict of arrays."""
    return nn.unbox(_init_variables(config, key)["params"])


def param_logical_axes(config: TransformerConfig) -> dict:
    """Same tree as `init_params(config, key)`; leaves are PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(lambda key: _init_variables(config, key), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree (a tied embedding counts once)."""
    return sum(int(math.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _check_tokens(tokens: jax.Array, config: TransformerConfig, name: str = "tokens") -> None:
    if tokens.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}.")
    if tokens.shape[1] > config.max_len:
        raise ValueError(
            f"{name} has length {tokens.shape[1]} > TransformerConfig.max_len={config.max_len}; "
            "truncate the sequences or raise max_len."
        )


def _check_mask(mask: jax.Array, tokens: jax.Array, name: str) -> None:
    if mask.shape != tokens.shape:
        raise ValueError(f"{name} must have the shape of tokens {tokens.shape}, got {mask.shape}.")


def logits(
    model: Transformer | TransformerConfig,
    params,
    tokens: ArrayLike,
    attention_mask: ArrayLike | None = None,
) -> jax.Array:
    """Next-token logits [B, T, V] (float32) of a full forward pass.

    logits[b, t] parametrises p(token at t + 1 | tokens[b, :t + 1]). `attention_mask` [B, T]
    (1 = real token, default all ones) masks padded keys and sets positions = cumsum(mask) - 1.
    """
    config = as_transformer(model).config
    tokens = jnp.asarray(tokens)
    _check_tokens(tokens, config)
    mask = jnp.ones(tokens.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    _check_mask(mask, tokens, "attention_mask")
    return _logits_jit(config, params, tokens, mask)


@functools.partial(jax.jit, static_argnames="config")
def _logits_jit(config: TransformerConfig, params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    out, _ = Transformer(config).apply({"params": params}, tokens, positions_from_mask(mask), mask)
    return out


def sequence_logprobs(
    params,
    tokens: ArrayLike,
    response_mask: ArrayLike,
    *,
    model: Transformer | TransformerConfig,
    attention_mask: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    shared_prompt_len: int = 0,
    vocab_chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token and per-sequence log-likelihoods of `tokens` under the model at `temperature`.

    token_logprobs[..., t] = log softmax(logits[..., t - 1] / temperature)[tokens[..., t]]
    * response_mask[..., t] (0 at t = 0 and wherever the mask is 0); seq_logprob = sum_t.

    With `shared_prompt_len` = P > 0, tokens are [B, S, T]: S responses to each of B prompts whose
    first P columns (tokens and attention_mask) are the same for all S — the samples the sampler
    returns. The prompt is then run once per prompt and its keys/values are reused by the S
    responses, and logits are projected at response positions only: the same numbers (up to float
    rounding) as the full pass, with the prompt's forward and backward costing 1/S of it. Prompt
    columns are never scored then (their token_logprobs are 0 whatever response_mask says there).

    Args:
      params: the model's parameters.
      tokens: [..., T] int token ids (prompt followed by response); leading axes are flattened.
      response_mask: [..., T], 1 on the tokens whose log-probability counts.
      model: a Transformer or TransformerConfig.
      attention_mask: [..., T], 1 on real tokens (default: all ones).
      temperature: positive scalar dividing the logits.
      shared_prompt_len: P, the prompt length shared by the S responses of each prompt (static;
        0 = no sharing, every row runs in full).
      vocab_chunk: 0 projects onto the whole vocabulary at once ([rows, T, V] float32 logits); C > 0
        walks the vocabulary C entries at a time (`chunked_token_logprobs`), so that neither pass
        holds more than [rows, T, C] logits. Same numbers up to float rounding (static).

    Returns:
      (token_logprobs [..., T] float32, seq_logprob [...] float32).
    """
    config = as_transformer(model).config
    tokens = jnp.asarray(tokens)
    response_mask = jnp.asarray(response_mask)
    if tokens.ndim < 1 or response_mask.shape != tokens.shape:
        raise ValueError(
            f"response_mask must have the shape of tokens {tokens.shape}, got {response_mask.shape}."
        )
    mask = jnp.ones(tokens.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the shape of tokens {tokens.shape}, got {mask.shape}.")
    flat_tokens = tokens.reshape(-1, tokens.shape[-1])
    _check_tokens(flat_tokens, config)
    if not isinstance(vocab_chunk, (int, np.integer)) or isinstance(vocab_chunk, bool) or vocab_chunk < 0:
        raise ValueError(f"vocab_chunk must be an int >= 0 (0 = the whole vocabulary at once), got {vocab_chunk!r}.")
    vocab_chunk = int(vocab_chunk)
    if shared_prompt_len:
        _check_shared_prompt(tokens, mask, shared_prompt_len)
        token_logprobs = _shared_prompt_token_logprobs_jit(
            config, params, tokens, mask, response_mask, jnp.asarray(temperature, jnp.float32),
            prompt_len=shared_prompt_len, vocab_chunk=vocab_chunk,
        )
        return token_logprobs, token_logprobs.sum(axis=-1)
    token_logprobs = _token_logprobs_jit(
        config, params, flat_tokens, mask.reshape(flat_tokens.shape), response_mask.reshape(flat_tokens.shape),
        jnp.asarray(temperature, jnp.float32), vocab_chunk=vocab_chunk,
    ).reshape(tokens.shape)
    return token_logprobs, token_logprobs.sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "vocab_chunk"))
def _token_logprobs_jit(config, params, tokens, mask, response_mask, temperature, *, vocab_chunk=0) -> jax.Array:
    if vocab_chunk:
        hidden, _ = Transformer(config).apply(
            {"params": params}, tokens, positions_from_mask(mask), mask, method=Transformer.hidden_states,
        )
        next_logprobs = chunked_token_logprobs(config, params, hidden[:, :-1], tokens[:, 1:], temperature, vocab_chunk)
    else:
        scaled = _logits_jit(config, params, tokens, mask)[:, :-1] / temperature
        picked = jnp.take_along_axis(scaled, tokens[:, 1:, None], axis=-1)[..., 0]
        next_logprobs = picked - jax.nn.logsumexp(scaled, axis=-1)
    token_logprobs = jnp.pad(next_logprobs, ((0, 0), (1, 0)))
    return jnp.where(response_mask > 0, token_logprobs, 0.0)


def output_embedding(config: TransformerConfig, params) -> jax.Array:
    """The output projection as a [V, D] matrix in the compute dtype: `Transformer.project(h)` = h E^T."""
    if config.tie_embeddings:
        matrix = params["wte"]["embedding"]
    else:
        matrix = params["lm_head"]["kernel"].T
    return jnp.asarray(matrix).astype(config.dtype)


def chunked_token_logprobs(
    config: TransformerConfig, params, hidden: jax.Array, targets: jax.Array, temperature: jax.Array, chunk: int,
) -> jax.Array:
    """log softmax(project(hidden) / temperature)[targets], walking the vocabulary `chunk` ids at a time.

    hidden [..., D] final-norm hidden states, targets [...] int -> [...] float32. With z the logits
    over one chunk, an online logsumexp carries the running max m and sum s = sum exp(z - m) from
    chunk to chunk (m' = max(m, max z), s' = s exp(m - m') + sum exp(z - m')), and the target's
    logit is picked in the chunk that holds it; the answer is picked - (m + log s). Each chunk's
    body is rematerialized (jax.checkpoint), so the backward pass recomputes its [N, chunk] logits
    instead of storing them: memory O(N chunk) instead of O(N V) both ways. A vocabulary that
    `chunk` does not divide is padded with rows whose logits are -inf.

    Chunks are strided: with K chunks, chunk k holds the ids k, k + K, k + 2K, ... The output
    matrix is split over the mesh along its vocabulary (the 'vocab' rule), in contiguous blocks;
    strided chunks keep every chunk split the same way, so each device scans its own rows, where
    contiguous chunks would make the scan gather the whole matrix onto every device.
    """
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    h = hidden.reshape(-1, width).astype(config.dtype)
    targets = targets.reshape(-1)
    matrix = output_embedding(config, params)
    vocab = matrix.shape[0]
    num_chunks = -(-vocab // chunk)
    matrix = jnp.pad(matrix, ((0, num_chunks * chunk - vocab), (0, 0)))
    matrix = matrix.reshape(chunk, num_chunks, width).transpose(1, 0, 2)  # [k, j] is id j·K + k
    in_chunk = jnp.arange(chunk) * num_chunks

    @jax.checkpoint
    def body(carry, xs):
        running_max, running_sum, picked = carry
        rows, k = xs
        z = jnp.dot(h, rows.T).astype(jnp.float32) / temperature
        z = jnp.where(k + in_chunk < vocab, z, -jnp.inf)
        # The logsumexp's value does not depend on the shift, so its gradient need not flow through it.
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, z.max(axis=-1)))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(z - new_max[:, None]).sum(axis=-1)
        inside = targets % num_chunks == k
        here = jnp.take_along_axis(z, (targets // num_chunks)[:, None], axis=-1)[:, 0]
        return (new_max, running_sum, picked + jnp.where(inside, here, 0.0)), None

    rows = h.shape[0]
    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    (running_max, running_sum, picked), _ = jax.lax.scan(body, init, (matrix, jnp.arange(num_chunks)))
    return (picked - (running_max + jnp.log(running_sum))).reshape(lead)


def _check_shared_prompt(tokens: jax.Array, mask: jax.Array, prompt_len) -> None:
    if tokens.ndim != 3:
        raise ValueError(
            f"shared_prompt_len needs tokens of shape [prompts, samples, length], got shape {tokens.shape}."
        )
    if not isinstance(prompt_len, (int, np.integer)) or not 0 < prompt_len < tokens.shape[-1]:
        raise ValueError(
            f"shared_prompt_len must be an int in [1, {tokens.shape[-1] - 1}] (tokens hold a prompt and at least "
            f"one response token), got {prompt_len!r}."
        )
    for name, x in (("tokens", tokens), ("attention_mask", mask)):
        try:
            prompt = np.asarray(x[..., :prompt_len])
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            continue  # traced: the caller vouches for the sharing
        if (prompt != prompt[:, :1]).any():
            raise ValueError(
                f"shared_prompt_len={prompt_len}: the first {prompt_len} columns of {name} differ between the samples "
                "of a prompt; pass shared_prompt_len=0 for rows with different prompts."
            )


@functools.partial(jax.jit, static_argnames=("config", "prompt_len", "vocab_chunk"))
def _shared_prompt_token_logprobs_jit(config, params, tokens, mask, response_mask, temperature, *, prompt_len,
                                      vocab_chunk=0):
    """`_token_logprobs_jit` for [B, S, T] rows sharing their first `prompt_len` columns per prompt.

    Prefill the B prompts into a KV cache, repeat it S times, run the responses' inputs (columns
    P .. T-2) through it; response token t is scored by the logits at t - 1 (the prompt's last
    position for t = P).
    """
    batch, samples, length = tokens.shape
    module, variables = Transformer(config), {"params": params}
    positions = positions_from_mask(mask.reshape(-1, length)).reshape(tokens.shape)
    prompt_mask = mask[:, 0, :prompt_len]
    hidden, cache = module.apply(
        variables, tokens[:, 0, :prompt_len], positions[:, 0, :prompt_len], prompt_mask,
        init_cache(config, batch, prompt_len), 0, method=Transformer.hidden_states,
    )
    rows = lambda x: x.reshape((batch * samples,) + x.shape[2:])
    repeat = lambda x: jnp.repeat(x, samples, axis=0)
    # one slot per response input (columns P .. T-2) after the prompt's
    cache = jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, length - 1 - prompt_len), (0, 0))), cache)
    targets = rows(tokens[:, :, prompt_len:])
    response_args = (
        variables, rows(tokens[:, :, prompt_len:-1]), rows(positions[:, :, prompt_len:-1]),
        rows(mask[:, :, :-1]), jax.tree.map(repeat, cache), prompt_len,
    )
    if vocab_chunk:
        next_hidden = repeat(hidden[:, -1:])  # scores column P
        if length - 1 > prompt_len:
            response_hidden, _ = module.apply(*response_args, method=Transformer.hidden_states)
            next_hidden = jnp.concatenate([next_hidden, response_hidden], axis=1)
        response_logprobs = chunked_token_logprobs(config, params, next_hidden, targets, temperature, vocab_chunk)
    else:
        next_logits = repeat(module.apply(variables, hidden[:, -1:], method=Transformer.project))  # scores column P
        if length - 1 > prompt_len:
            response_logits, _ = module.apply(*response_args)
            next_logits = jnp.concatenate([next_logits, response_logits], axis=1)
        scaled = next_logits / temperature  # [B·S, T - P, V]: the logits scoring columns P .. T-1
        picked = jnp.take_along_axis(scaled, targets[..., None], axis=-1)[..., 0]
        response_logprobs = picked - jax.nn.logsumexp(scaled, axis=-1)
    response_logprobs = response_logprobs.reshape(batch, samples, -1)
    token_logprobs = jnp.pad(response_logprobs, ((0, 0), (0, 0), (prompt_len, 0)))
    return jnp.where(response_mask > 0, token_logprobs, 0.0)
