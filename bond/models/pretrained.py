"""HF-format checkpoints (config.json + safetensors) <-> our TransformerConfig and parameter pytrees.

Supported: GPT-2 (`GPT2LMHeadModel`) and the Llama family (`LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM`, `GemmaForCausalLM`) as language models, and their `...ForSequenceClassification`
heads (trunk + `score.weight` [num_labels = 1, d_model], read at the last real token) as reward
models. The layout is HF transformers' (https://huggingface.co/docs/transformers): a folder with
config.json and either model.safetensors or model.safetensors.index.json plus its shards.

Loading reads the safetensors files through memory maps, tensor by tensor, and builds each parameter
with `jax.make_array_from_callback` on its NamedSharding: every device receives only its slice, and
converting to the parameter dtype happens per slice, so a bfloat16 model is never materialised in
float32 on the host. The safetensors format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}} and the raw little-endian tensor bytes
(https://github.com/huggingface/safetensors); bfloat16 is numpy's `ml_dtypes.bfloat16`.

Weight layouts: torch `nn.Linear` stores [out, in]; our kernels are [in..., out...], so a Linear
weight W becomes W.T reshaped (e.g. q_proj [H * head_dim, D] -> query kernel [D, H, head_dim]).
GPT-2's `Conv1D` stores [in, out] already; its fused c_attn [D, 3 D] splits into query, key, value.
Rotary q/k weights need no permutation: our rotary embedding uses HF's rotate_half layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding
from jax.typing import ArrayLike

from bond.models.reward import init_reward_params, reward_model_scores, reward_param_logical_axes
from bond.models.transformer import (
    LLAMA3_ROPE_KEYS,
    Transformer,
    TransformerConfig,
    as_transformer,
    init_params,
    param_logical_axes,
)
from bond.sharding import param_shardings

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gemma")
CAUSAL_LM_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
}
SEQUENCE_CLASSIFICATION_ARCHITECTURES = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
}

# Shapes of released checkpoints, for compiling a run ahead of time without any file (`--dry_run`):
# a checkpoint path "preset:<name>" reads presets/<name>.json, the model's HF config.json.
PRESET_PREFIX = "preset:"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Buffers that some checkpoints store but that are not parameters (GPT-2's causal-mask buffers,
# old Llama checkpoints' rotary frequencies).
_IGNORED_TENSORS = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")

_ACTIVATIONS_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
_GPT2_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


# ---------------------------------------------------------------------------------------------
# safetensors files


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its tensor data starts."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file (unreadable JSON header: {error}).") from None
    header.pop("__metadata__", None)
    return header, 8 + length


class _Checkpoint:
    """The tensors of a checkpoint folder, by name, as read-only memory-mapped numpy arrays."""

    def __init__(self, folder: Path):
        index_path, single_path = folder / WEIGHTS_INDEX_FILE, folder / WEIGHTS_FILE
        if index_path.exists():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path} has no 'weight_map' object mapping tensor names to files.")
            files = sorted(set(weight_map.values()))
        elif single_path.exists():
            weight_map, files = None, [WEIGHTS_FILE]
        else:
            raise ValueError(
                f"{folder} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}; pass a folder with "
                "HF safetensors weights (PyTorch .bin checkpoints are not read)."
            )
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise ValueError(f"{WEIGHTS_INDEX_FILE} lists the file {name!r}, which is not in {folder}.")
            header, data_start = _read_header(path)
            for tensor, entry in header.items():
                self._entries[tensor] = (path, data_start, entry)
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if tensor not in self._entries or self._entries[tensor][0].name != name:
                    raise ValueError(f"{WEIGHTS_INDEX_FILE} puts tensor {tensor!r} in {name!r}, which lacks it.")
        self._maps: dict[Path, np.memmap] = {}

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only array backed by the file (nothing is read until it is indexed)."""
        path, data_start, entry = self._entries[name]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {path.name} has unsupported dtype {entry['dtype']!r}.")
        dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} in {path.name}: data_offsets do not match shape {shape}.")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[path][data_start + begin : data_start + end].view(dtype).reshape(shape)


def _write_safetensors(path: Path, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]):
    """Writes a safetensors file from (name, shape, dtype, make_array) rows, one tensor in memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype, make_array in tensors:
            array = np.ascontiguousarray(make_array(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: expected shape {tuple(shape)}, got {array.shape}.")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


# ---------------------------------------------------------------------------------------------
# config.json <-> TransformerConfig


def _read_hf_config(folder: Path) -> dict:
    if str(folder).startswith(PRESET_PREFIX):
        raise ValueError(f"{folder} names a shape preset (for --dry_run), not a checkpoint; point the path at a "
                         "checkpoint folder (config.json + safetensors) to load weights.")
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} does not exist.")
    if not path.exists():
        raise ValueError(f"{folder} has no {CONFIG_FILE}; a HF checkpoint folder needs config.json + safetensors.")
    hf = json.loads(path.read_text())
    _check_model_type(hf)
    return hf


def _check_model_type(hf: dict) -> None:
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{CONFIG_FILE}: model_type {hf.get('model_type')!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def _architecture(hf: dict, kinds: dict[str, str], other: dict[str, str], loader: str, other_loader: str) -> None:
    """Checks config.json's `architectures` against the model type's supported head."""
    architectures = hf.get("architectures") or [kinds[hf["model_type"]]]
    name = architectures[0]
    if name == kinds[hf["model_type"]]:
        return
    if name in other.values():
        raise ValueError(f"{CONFIG_FILE}: architecture {name!r} is loaded with {other_loader}, not {loader}.")
    raise ValueError(
        f"{CONFIG_FILE}: architecture {name!r} is not supported by {loader}; supported architectures: "
        f"{', '.join(kinds.values())}."
    )


def _require(hf: dict, *fields: str) -> None:
    for field in fields:
        if hf.get(field) is None:
            raise ValueError(
                f"{CONFIG_FILE} is missing field {field!r}, needed for model_type {hf.get('model_type')!r}."
            )


def _activation(name: str, field: str) -> str:
    """Our ACTIVATIONS name of HF activation `name` (read from config.json's `field`)."""
    if name not in _ACTIVATIONS_FROM_HF:
        raise ValueError(
            f"{CONFIG_FILE}: {field} {name!r} is not supported; use one of {sorted(_ACTIVATIONS_FROM_HF)}."
        )
    return _ACTIVATIONS_FROM_HF[name]


def _param_dtype(hf: dict, dtype: Any) -> Any:
    if dtype is None:
        stored = hf.get("dtype") or hf.get("torch_dtype")
        return jnp.bfloat16 if stored == "bfloat16" else jnp.float32
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _PARAM_DTYPES:
        raise ValueError(f"dtype must be None, 'float32' or 'bfloat16', got {dtype!r}.")
    return _PARAM_DTYPES[name]


def _rope(hf: dict) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(rope_theta, rope_scaling) of config.json: transformers 5's rope_parameters, or the older
    top-level rope_theta and rope_scaling."""
    parameters = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(parameters.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = parameters.pop("rope_type", None) or parameters.pop("type", None) or "default"
    if parameters.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{CONFIG_FILE}: partial_rotary_factor != 1 is not supported.")
    if rope_type == "default":
        return theta, ()
    keys = {"linear": ("factor",), "llama3": LLAMA3_ROPE_KEYS}.get(rope_type)
    if keys is None:
        raise ValueError(
            f"{CONFIG_FILE}: rope type {rope_type!r} (rope_parameters / rope_scaling) is not supported; "
            "supported: 'default', 'linear', 'llama3'."
        )
    missing = [k for k in keys if k not in parameters]
    if missing:
        raise ValueError(f"{CONFIG_FILE}: rope_parameters of type {rope_type!r} is missing field {missing[0]!r}.")
    return theta, tuple(sorted([("rope_type", rope_type)] + [(k, parameters[k]) for k in keys]))


def config_from_hf(hf: dict, dtype: Any = None) -> TransformerConfig:
    """TransformerConfig of a HF config.json dict (model_type in SUPPORTED_MODEL_TYPES).

    Parameters are stored and computed in `dtype` (None: the checkpoint's torch_dtype if bfloat16,
    else float32). Mistral's and Qwen2's sliding-window attention equals full attention on
    sequences no longer than the window, so max_len is capped at the window.
    """
    _check_model_type(hf)
    model_type = hf["model_type"]
    param_dtype = _param_dtype(hf, dtype)
    if model_type == "gpt2":
        _require(hf, "vocab_size", "n_layer", "n_embd", "n_head", "n_positions")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise ValueError(
                f"{CONFIG_FILE}: scale_attn_by_inverse_layer_idx / scale_attn_weights=false are not supported."
            )
        return TransformerConfig(
            vocab_size=hf["vocab_size"],
            num_layers=hf["n_layer"],
            d_model=hf["n_embd"],
            num_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
            max_len=hf["n_positions"],
            activation=_activation(hf.get("activation_function") or "gelu_new", "activation_function"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dtype=param_dtype,
            param_dtype=param_dtype,
        )
    _require(hf, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")
    d_model, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    gemma = model_type == "gemma"
    head_dim = hf.get("head_dim") or (256 if gemma else d_model // num_heads)
    num_kv_heads = hf.get("num_key_value_heads") or num_heads
    max_len = hf["max_position_embeddings"]
    windowed = model_type == "mistral" or (model_type == "qwen2" and hf.get("use_sliding_window"))
    if windowed and hf.get("sliding_window"):
        max_len = min(max_len, hf["sliding_window"])
    if gemma:
        # Gemma's released configs say hidden_act "gelu" but mean the tanh approximation (as transformers reads them).
        name = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        activation = _activation("gelu_pytorch_tanh" if name == "gelu" else name, "hidden_act")
    else:
        activation = _activation(hf.get("hidden_act") or "silu", "hidden_act")
    qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    rope_theta, rope_scaling = _rope(hf)
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        d_model=d_model,
        num_heads=num_heads,
        d_ff=hf["intermediate_size"],
        max_len=max_len,
        activation=activation,
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", gemma),
        dtype=param_dtype,
        param_dtype=param_dtype,
        norm="rms_norm",
        norm_unit_offset=gemma,
        position_embedding="rope",
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        num_kv_heads=None if num_kv_heads == num_heads else num_kv_heads,
        explicit_head_dim=None if head_dim * num_heads == d_model else head_dim,
        gated_mlp=True,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        scale_embeddings=gemma,
    )


def model_type_of(config: TransformerConfig) -> str:
    """The HF model_type that has exactly `config`'s architecture ('gpt2', 'llama', 'qwen2' or 'gemma').

    Raises:
      ValueError naming the fields that no supported HF architecture has.
    """
    c = config
    if c.position_embedding == "learned":
        if (c.norm == "layer_norm" and not c.gated_mlp and c.qkv_bias and c.out_bias and c.mlp_bias
                and c.kv_heads == c.num_heads and c.explicit_head_dim is None and not c.scale_embeddings):
            return "gpt2"
    elif c.norm == "rms_norm" and c.gated_mlp:
        if c.norm_unit_offset and c.scale_embeddings and c.qkv_bias == c.out_bias and not c.mlp_bias:
            return "gemma"
        if not c.norm_unit_offset and not c.scale_embeddings:
            if c.qkv_bias and not c.out_bias and not c.mlp_bias:
                return "qwen2"
            if c.qkv_bias == c.out_bias:
                return "llama"
    raise ValueError(
        "this TransformerConfig matches no supported HF architecture (GPT-2: learned positions, LayerNorm, "
        "biases everywhere; Llama/Qwen2/Gemma: rope, rms_norm, gated_mlp with their bias and scaling "
        f"switches): {config}."
    )


def config_to_hf(config: TransformerConfig) -> dict:
    """The HF config.json dict of `config` (for a causal LM); inverse of `config_from_hf`."""
    c = config
    model_type = model_type_of(c)
    dtype = jnp.dtype(c.param_dtype).name
    common = {"model_type": model_type, "architectures": [CAUSAL_LM_ARCHITECTURES[model_type]],
              "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "dtype": dtype,
              "torch_dtype": dtype}
    if model_type == "gpt2":
        return common | {
            "n_layer": c.num_layers, "n_embd": c.d_model, "n_head": c.num_heads, "n_inner": c.d_ff,
            "n_positions": c.max_len, "n_ctx": c.max_len,
            "activation_function": _GPT2_ACTIVATIONS_TO_HF[c.activation],
            "layer_norm_epsilon": c.layer_norm_epsilon,
        }
    hf = common | {
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_len, "rms_norm_eps": c.layer_norm_epsilon,
        "hidden_act": _ACTIVATIONS_TO_HF[c.activation], "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta} | dict(c.rope_scaling),
        "rope_scaling": dict(c.rope_scaling) or None,
    }
    if model_type == "llama":
        hf |= {"attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias}
    elif model_type == "gemma":
        hf |= {"attention_bias": c.qkv_bias}
    else:
        hf |= {"use_sliding_window": False}
    return hf


# ---------------------------------------------------------------------------------------------
# HF tensor names <-> our parameter paths


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the parameter leaves it holds.

    split: HF array -> our leaves (numpy views where the layout allows, so a device reads only its
    slice); join: our leaves -> the HF array (for saving).
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    paths: tuple[tuple[str, ...], ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    join: Callable[[Sequence[np.ndarray]], np.ndarray]


def _same(hf_name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> _Tensor:
    return _Tensor(hf_name, shape, (path,), lambda a: (a,), lambda leaves: leaves[0])


def _reshaped(hf_name: str, path: tuple[str, ...], hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> _Tensor:
    return _Tensor(hf_name, hf_shape, (path,), lambda a: (a.reshape(shape),), lambda leaves: leaves[0].reshape(hf_shape))


def _linear(hf_name: str, path: tuple[str, ...], hf_shape: tuple[int, int], shape: tuple[int, ...]) -> _Tensor:
    """torch nn.Linear weight [out, in] <-> our kernel [in..., out...] (transpose, then reshape)."""
    return _Tensor(
        hf_name, hf_shape, (path,),
        lambda a: (a.T.reshape(shape),),
        lambda leaves: leaves[0].reshape(hf_shape[::-1]).T,
    )


def _fused_qkv(hf_name: str, paths: tuple[tuple[str, ...], ...], d_model: int, head_shape: tuple[int, ...],
               weight: bool) -> _Tensor:
    """GPT-2's c_attn: weight [D, 3 D] / bias [3 D] <-> query, key, value kernels [D, H, hd] / biases [H, hd]."""
    if weight:
        hf_shape = (d_model, 3 * d_model)
        split = lambda a: tuple(a[:, i * d_model:(i + 1) * d_model].reshape((d_model,) + head_shape) for i in range(3))
        join = lambda leaves: np.concatenate([x.reshape(d_model, d_model) for x in leaves], axis=1)
    else:
        hf_shape = (3 * d_model,)
        split = lambda a: tuple(a[i * d_model:(i + 1) * d_model].reshape(head_shape) for i in range(3))
        join = lambda leaves: np.concatenate([x.reshape(d_model) for x in leaves])
    return _Tensor(hf_name, hf_shape, paths, split, join)


def _gpt2_tensors(c: TransformerConfig, prefix: str) -> list[_Tensor]:
    d, heads, hd = c.d_model, c.num_heads, c.head_dim
    out = [_same(prefix + "wte.weight", ("wte", "embedding"), (c.vocab_size, d)),
           _same(prefix + "wpe.weight", ("wpe", "embedding"), (c.max_len, d))]
    for i in range(c.num_layers):
        h, b = f"{prefix}h.{i}.", f"blocks_{i}"
        attn = [(b, "attn", name) for name in ("query", "key", "value")]
        out += [
            _same(h + "ln_1.weight", (b, "ln_1", "scale"), (d,)),
            _same(h + "ln_1.bias", (b, "ln_1", "bias"), (d,)),
            _fused_qkv(h + "attn.c_attn.weight", tuple(p + ("kernel",) for p in attn), d, (heads, hd), weight=True),
            _fused_qkv(h + "attn.c_attn.bias", tuple(p + ("bias",) for p in attn), d, (heads, hd), weight=False),
            _reshaped(h + "attn.c_proj.weight", (b, "attn", "out", "kernel"), (d, d), (heads, hd, d)),
            _same(h + "attn.c_proj.bias", (b, "attn", "out", "bias"), (d,)),
            _same(h + "ln_2.weight", (b, "ln_2", "scale"), (d,)),
            _same(h + "ln_2.bias", (b, "ln_2", "bias"), (d,)),
            _same(h + "mlp.c_fc.weight", (b, "mlp", "fc_in", "kernel"), (d, c.d_ff)),
            _same(h + "mlp.c_fc.bias", (b, "mlp", "fc_in", "bias"), (c.d_ff,)),
            _same(h + "mlp.c_proj.weight", (b, "mlp", "fc_out", "kernel"), (c.d_ff, d)),
            _same(h + "mlp.c_proj.bias", (b, "mlp", "fc_out", "bias"), (d,)),
        ]
    out += [_same(prefix + "ln_f.weight", ("ln_f", "scale"), (d,)), _same(prefix + "ln_f.bias", ("ln_f", "bias"), (d,))]
    return out


def _llama_tensors(c: TransformerConfig, prefix: str) -> list[_Tensor]:
    d, hd, heads, kv_heads = c.d_model, c.head_dim, c.num_heads, c.kv_heads
    out = [_same(prefix + "embed_tokens.weight", ("wte", "embedding"), (c.vocab_size, d))]
    for i in range(c.num_layers):
        h, b = f"{prefix}layers.{i}.", f"blocks_{i}"
        out += [_same(h + "input_layernorm.weight", (b, "ln_1", "scale"), (d,)),
                _same(h + "post_attention_layernorm.weight", (b, "ln_2", "scale"), (d,))]
        for proj, name, n in (("q_proj", "query", heads), ("k_proj", "key", kv_heads), ("v_proj", "value", kv_heads)):
            out.append(_linear(f"{h}self_attn.{proj}.weight", (b, "attn", name, "kernel"), (n * hd, d), (d, n, hd)))
            if c.qkv_bias:
                out.append(_reshaped(f"{h}self_attn.{proj}.bias", (b, "attn", name, "bias"), (n * hd,), (n, hd)))
        out.append(_linear(h + "self_attn.o_proj.weight", (b, "attn", "out", "kernel"), (d, heads * hd), (heads, hd, d)))
        if c.out_bias:
            out.append(_same(h + "self_attn.o_proj.bias", (b, "attn", "out", "bias"), (d,)))
        for proj, name, shape in (("gate_proj", "fc_gate", (c.d_ff, d)), ("up_proj", "fc_in", (c.d_ff, d)),
                                  ("down_proj", "fc_out", (d, c.d_ff))):
            out.append(_linear(f"{h}mlp.{proj}.weight", (b, "mlp", name, "kernel"), shape, shape[::-1]))
            if c.mlp_bias:
                out.append(_same(f"{h}mlp.{proj}.bias", (b, "mlp", name, "bias"), shape[:1]))
    out.append(_same(prefix + "norm.weight", ("ln_f", "scale"), (d,)))
    return out


def _trunk_tensors(config: TransformerConfig, model_type: str, prefix: str) -> list[_Tensor]:
    return (_gpt2_tensors if model_type == "gpt2" else _llama_tensors)(config, prefix)


def _trunk_prefix(model_type: str, checkpoint: _Checkpoint | None = None) -> str:
    """'transformer.' (GPT-2) or 'model.' before the trunk's tensor names, or '' for checkpoints saved
    without it (e.g. the original GPT-2 release); saving always uses the prefix."""
    prefix = "transformer." if model_type == "gpt2" else "model."
    embedding = "wte.weight" if model_type == "gpt2" else "embed_tokens.weight"
    if checkpoint is not None and prefix + embedding not in checkpoint.names and embedding in checkpoint.names:
        return ""
    return prefix


def _lm_head(config: TransformerConfig) -> _Tensor:
    return _linear("lm_head.weight", ("lm_head", "kernel"), (config.vocab_size, config.d_model),
                   (config.d_model, config.vocab_size))


def _causal_lm_tensors(config: TransformerConfig, model_type: str, checkpoint: _Checkpoint | None = None
                       ) -> list[_Tensor]:
    tensors = _trunk_tensors(config, model_type, _trunk_prefix(model_type, checkpoint))
    return tensors if config.tie_embeddings else tensors + [_lm_head(config)]


# ---------------------------------------------------------------------------------------------
# Loading


def _check_names(checkpoint: _Checkpoint, tensors: list[_Tensor], optional: set[str], folder: Path) -> None:
    expected = {t.hf_name for t in tensors}
    present = checkpoint.names
    missing = sorted(expected - present)
    if missing:
        raise ValueError(
            f"checkpoint {folder} is missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; config.json describes a model that needs it."
        )
    extra = sorted(n for n in present - expected - optional if not _IGNORED_TENSORS.search(n))
    if extra:
        raise ValueError(
            f"checkpoint {folder} has unexpected tensor {extra[0]!r}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; config.json and the weights do not describe the same model."
        )
    for t in tensors:
        got = checkpoint.shape(t.hf_name)
        if got != t.hf_shape:
            raise ValueError(
                f"tensor {t.hf_name!r} has shape {got} in the checkpoint, expected {t.hf_shape} from config.json."
            )


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _paths(tree: Any) -> set[tuple[str, ...]]:
    return {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _shardings(shapes: Any, logical_axes: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, shapes)
    return param_shardings(shapes, logical_axes, mesh)


def _place(view: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A jax.Array of `view` in `dtype` whose devices each read and convert only their own slice."""
    target = np.dtype(dtype)
    return jax.make_array_from_callback(view.shape, sharding, lambda index: np.asarray(view[index], dtype=target))


def _load_params(checkpoint: _Checkpoint, tensors: list[_Tensor], shapes: dict, shardings: dict,
                 dtype: Any) -> dict:
    """Parameters with the tree of `shapes`, read from `checkpoint` tensor by tensor onto `shardings`."""
    params: dict = {}
    for t in tensors:
        views = t.split(checkpoint.array(t.hf_name))
        for path, view in zip(t.paths, views):
            expected = _get(shapes, path).shape
            if view.shape != expected:  # a bug in the name map, not in the checkpoint
                raise RuntimeError(f"{t.hf_name} -> {'/'.join(path)}: shape {view.shape} != {expected}.")
            _set(params, path, _place(view, dtype, _get(shardings, path)))
    return params


def preset_names() -> list[str]:
    """The shape presets shipped in bond/models/presets (each a released model's config.json)."""
    return sorted(f.stem for f in PRESETS_DIR.glob("*.json"))


def read_shapes_config(path: str | Path) -> dict:
    """The HF config.json of a checkpoint folder or of a shape preset ("preset:gemma_2b"), no weights read."""
    path = str(path)
    if not path.startswith(PRESET_PREFIX):
        folder = Path(path)
        if not (folder / CONFIG_FILE).exists():
            raise ValueError(f"{folder} has no {CONFIG_FILE}; give a checkpoint folder or one of the presets "
                             f"{[PRESET_PREFIX + n for n in preset_names()]}.")
        hf = json.loads((folder / CONFIG_FILE).read_text())
        _check_model_type(hf)
        return hf
    name = path[len(PRESET_PREFIX):]
    if name not in preset_names():
        raise ValueError(f"{path!r} is not a shape preset; the presets are {[PRESET_PREFIX + n for n in preset_names()]}.")
    return json.loads((PRESETS_DIR / f"{name}.json").read_text())


def abstract_pretrained(path: str | Path, *, dtype: Any = None, mesh: Mesh | None = None,
                        reward_model: bool = False) -> tuple[TransformerConfig, dict]:
    """(TransformerConfig, params) of a checkpoint folder or shape preset with jax.ShapeDtypeStruct leaves
    carrying the shardings the loader would give them: `load_pretrained` (or, with `reward_model`,
    `load_reward_model`: the trunk under 'transformer' plus a one-score head) without reading a weight."""
    config = config_from_hf(read_shapes_config(path), dtype)
    init, axes = (init_reward_params, reward_param_logical_axes) if reward_model else (init_params, param_logical_axes)
    shapes = jax.eval_shape(init, config, jax.random.key(0))
    shardings = _shardings(shapes, axes(config), mesh)
    return config, jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def load_pretrained(path: str | Path, *, dtype: Any = None, mesh: Mesh | None = None) -> tuple[TransformerConfig, dict]:
    """A HF causal-LM checkpoint folder as (TransformerConfig, params).

    `bond.models.logits(model, params, tokens)` then gives the checkpoint's logits [B, T, V].

    Args:
      path: folder with config.json and model.safetensors (or model.safetensors.index.json + shards);
        model_type one of SUPPORTED_MODEL_TYPES.
      dtype: parameter (and compute) dtype, None (the checkpoint's torch_dtype if bfloat16, else
        float32), 'float32' or 'bfloat16'.
      mesh: place each parameter with its NamedSharding from `bond.sharding.param_shardings`
        (default: unsharded on the first local device).

    Raises:
      ValueError naming the field or tensor when config.json or the weights are malformed, missing,
      or do not match each other, or the architecture is not supported.
    """
    folder = Path(path)
    hf = _read_hf_config(folder)
    _architecture(hf, CAUSAL_LM_ARCHITECTURES, SEQUENCE_CLASSIFICATION_ARCHITECTURES, "load_pretrained",
                  "load_reward_model")
    config = config_from_hf(hf, dtype)
    model_type = hf["model_type"]
    checkpoint = _Checkpoint(folder)
    tensors = _causal_lm_tensors(config, model_type, checkpoint)
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    _check_names(checkpoint, tensors, optional, folder)
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    if _paths(shapes) != {p for t in tensors for p in t.paths}:
        raise RuntimeError(f"the {model_type} name map does not cover the parameters of {config}.")
    params = _load_params(checkpoint, tensors, shapes, _shardings(shapes, param_logical_axes(config), mesh),
                          config.param_dtype)
    return config, params


# ---------------------------------------------------------------------------------------------
# Saving


def _host_array(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(jax.device_get(leaf))


def save_pretrained(model: Transformer | TransformerConfig, params: dict, path: str | Path) -> None:
    """Writes `params` as a HF checkpoint folder (config.json + model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained` and `load_pretrained` read.

    Tensors are written in the parameters' dtype, one at a time; load -> save -> load is exact.
    With several processes every process must call it (sharded parameters are gathered) and
    process 0 writes.

    LoRA adapters in `params` (bond/lora.py) are folded into the weights they adapt first, so the
    folder holds the plain model that computes what the adapted one does.

    Raises:
      ValueError if the config has no HF equivalent (`model_type_of`) or params do not fit it.
    """
    from bond import lora  # bond.lora imports this package's transformer module

    config = as_transformer(model).config
    if lora.adapters_of(params):
        params = lora.merged(config, params)
    hf = config_to_hf(config)
    tensors = _causal_lm_tensors(config, hf["model_type"])
    expected = {p for t in tensors for p in t.paths}
    got = _paths(params)
    if got != expected:
        difference = sorted("/".join(p) for p in got ^ expected)
        raise ValueError(f"params do not match the config's parameter tree; differing leaves: {difference[:5]}.")
    rows = []
    for t in tensors:
        dtype = np.dtype(_get(params, t.paths[0]).dtype)
        make = lambda t=t: t.join([_host_array(_get(params, p)) for p in t.paths])
        rows.append((t.hf_name, t.hf_shape, dtype, make))
    if jax.process_index() != 0:
        for _, _, _, make in rows:
            make()  # the gathers are collective: every process takes part
        return
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    _write_safetensors(folder / WEIGHTS_FILE, rows)


# ---------------------------------------------------------------------------------------------
# Sequence-classification checkpoints as reward models


def load_reward_model(path: str | Path, *, dtype: Any = None, mesh: Mesh | None = None) -> tuple[TransformerConfig, dict]:
    """A HF `...ForSequenceClassification` checkpoint (num_labels = 1) as a reward model.

    Returns (config, params) for `reward_scores` / `bond.models.reward_model_scores`: params are
    {'transformer': trunk, 'head': {'kernel': score.weight.T [D, 1], 'bias': 0}} of
    `bond.models.RewardModel`, whose score is read at the last real token (HF reads the last
    token that is not pad_token_id: the same token in our layout).

    Args and raises as `load_pretrained`.
    """
    folder = Path(path)
    hf = _read_hf_config(folder)
    _architecture(hf, SEQUENCE_CLASSIFICATION_ARCHITECTURES, CAUSAL_LM_ARCHITECTURES, "load_reward_model",
                  "load_pretrained")
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    if num_labels != 1:
        raise ValueError(
            f"{CONFIG_FILE}: num_labels is {num_labels} (id2label); a reward model needs one label (a scalar score)."
        )
    config = config_from_hf(hf, dtype)
    model_type = hf["model_type"]
    checkpoint = _Checkpoint(folder)
    trunk = _trunk_tensors(config, model_type, _trunk_prefix(model_type, checkpoint))
    trunk = [dataclasses.replace(t, paths=tuple(("transformer",) + p for p in t.paths)) for t in trunk]
    score = _linear("score.weight", ("head", "kernel"), (1, config.d_model), (config.d_model, 1))
    tensors = trunk + [score]
    _check_names(checkpoint, tensors, {"score.bias"}, folder)
    shapes = jax.eval_shape(init_reward_params, config, jax.random.key(0))
    if _paths(shapes) != {p for t in tensors for p in t.paths} | {("head", "bias")}:
        raise RuntimeError(f"the {model_type} name map does not cover the reward-model parameters of {config}.")
    shardings = _shardings(shapes, reward_param_logical_axes(config), mesh)
    params = _load_params(checkpoint, tensors, shapes, shardings, config.param_dtype)
    bias = checkpoint.array("score.bias") if "score.bias" in checkpoint.names else np.zeros((1,), np.float32)
    params["head"]["bias"] = _place(bias.reshape(1), config.param_dtype, shardings["head"]["bias"])
    return config, params


def reward_scores(model: TransformerConfig, params: dict, tokens: ArrayLike, attention_mask: ArrayLike) -> jax.Array:
    """Scores [B] float32 of a reward model from `load_reward_model` on sequences `tokens` [B, T].

    Our layout: left-padded prompt, then the response; attention_mask is 1 on real tokens and the
    score is read at the last position whose mask is 1.
    """
    return reward_model_scores(params, tokens, attention_mask, model=model)
