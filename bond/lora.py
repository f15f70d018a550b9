"""LoRA adapters as parameter trees: the base, the adapters, their union and their merge.

A LoRA model (`TransformerConfig.lora_rank` > 0, adapters on `lora_targets`) computes
W x + (α/r)·B A x at every adapted projection (Hu et al. 2021, "LoRA", arXiv 2106.09685). Its
parameter tree is the base's plus, per adapted projection, a subtree {'a': A [fan_in, r],
'b': B [r, fan_out]} under a key containing 'lora' (`query/lora`, `attn/out/lora`,
`mlp/fc_in_lora`, ...; bond/models/transformer.py's LoraAdapter). The model applied to the base
alone (no adapter subtrees) is the plain model, so in a LoRA run

    reference = base            (the frozen weights; no second copy)
    policy    = base ∪ adapters (trained; optimizer state for the adapters only)
    anchor    = base ∪ anchor adapters (EMA or hard copies of the policy's adapters)

and every program (sampler, log-prob passes, evaluation) reads the union, `with_adapters`.

The adapters are applied unmerged, x A B beside x W, rather than folded into W for each pass: in
bfloat16 a small update B A rounds away when added to W (the loss a float32 master copy avoids for
full fine-tuning), and the gradient stays adapter-sized. `merged` folds them into W once, for export.

The adapters are written by hand rather than with qwix's LoraProvider (Google's JAX quantization
library, whose LoRA tunix uses). Applied to this model (qwix 0.1.8), qwix added adapters to the MLP's
nn.Dense layers and to the tied token embedding, but not to the attention projections: those
multiply by a reshaped kernel (`_matmul(x, kernel.reshape(d_model, -1))`, one 2-D matmul, the
fastest form on XLA:CPU), which qwix does not trace back to a parameter. Its adapters also live in
the same 'params' subtrees as the base under generated names; here the tree split is explicit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bond.checkpoint import content_crc
from bond.models.transformer import LORA_TARGETS, TransformerConfig, init_params, param_logical_axes

INIT_KEY = 0  # the PRNG key the adapters' A matrices are drawn from (B starts at 0)


def targets_of(spec: str, gated_mlp: bool) -> tuple[str, ...]:
    """config.lora.targets as LORA_TARGETS names: 'all' = every projection of a model (gate_proj only
    with a gated MLP), else the comma-separated names; ValueError naming the field for others."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"config.lora.targets={spec!r} must be 'all' or comma-separated names among {LORA_TARGETS}.")
    if spec.strip() == "all":
        return tuple(t for t in LORA_TARGETS if t != "gate_proj" or gated_mlp)
    names = tuple(t.strip() for t in spec.split(",") if t.strip())
    unknown = sorted(set(names) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"config.lora.targets: unknown {unknown}; use 'all' or names among {LORA_TARGETS}.")
    if "gate_proj" in names and not gated_mlp:
        raise ValueError("config.lora.targets names gate_proj, but this model's MLP has no gate; drop it (or use 'all').")
    return names


def _is_adapter_key(key) -> bool:
    """Whether a parameter-tree key holds an adapter subtree ('lora' in attention modules, '<dense>_lora' in the MLP)."""
    return "lora" in str(key)


def _split(tree, keep_adapters: bool):
    """The nested dict `tree` with only the adapter (or only the non-adapter) leaves; empty dicts dropped."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if _is_adapter_key(key):
            if keep_adapters:
                out[key] = value
            continue
        if isinstance(value, dict):
            sub = _split(value, keep_adapters)
            if sub:
                out[key] = sub
        elif not keep_adapters:
            out[key] = value
    return out


def adapters_of(params) -> dict:
    """The adapter subtrees of a LoRA model's parameters (same nesting, base leaves removed)."""
    return _split(params, keep_adapters=True)


def base_of(params) -> dict:
    """The parameters without their adapters: the base model (the plain model when applied)."""
    return _split(params, keep_adapters=False)


def with_adapters(base, adapters) -> dict:
    """The union of a base tree and an adapter tree (`adapters_of`'s nesting): the LoRA model's parameters."""
    if adapters is None:
        return base
    if not isinstance(base, dict):
        raise ValueError("with_adapters: an adapter subtree sits where the base has a leaf; the adapters "
                         "belong to another model.")
    out = dict(base)
    for key, value in adapters.items():
        if _is_adapter_key(key):
            out[key] = value
        elif key not in base:
            raise ValueError(f"with_adapters: the base has no module {key!r} for these adapters; they belong "
                             "to another model.")
        else:
            out[key] = with_adapters(base[key], value)
    return out


def init_adapters(config: TransformerConfig, key: jax.Array) -> dict:
    """The adapters of a fresh LoRA model (A random, B = 0), without materializing the base: the
    base leaves of `init_params` are not outputs of the compiled program, so XLA never computes them."""
    if not config.lora_rank or not config.lora_targets:
        raise ValueError("init_adapters needs a model with lora_rank > 0 and lora_targets.")
    return jax.jit(lambda k: adapters_of(init_params(config, k)))(key)


def merged(config: TransformerConfig, params) -> dict:
    """The base with each adapter folded in, W ← W + (α/r)·A B (reshaped to W's shape), in W's dtype;
    the plain model's tree (for export: it computes what the adapted model computes)."""
    def fold(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: fold(v) for k, v in tree.items() if not _is_adapter_key(k)}
        for key, adapter in tree.items():
            if not _is_adapter_key(key):
                continue
            owner = out if key == "lora" else out[key.removesuffix("_lora")]  # query/lora or mlp/fc_in_lora
            kernel = owner["kernel"]
            delta = (adapter["a"].astype(jnp.float32) @ adapter["b"].astype(jnp.float32)) * config.lora_scale
            owner["kernel"] = (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)
        return out

    return fold(params)


def logical_axes(config: TransformerConfig, params) -> dict:
    """`param_logical_axes(config)` for `params` as they are: without the adapters' axes when
    `params` is a LoRA model's base alone (the reference)."""
    axes = param_logical_axes(config)
    return axes if not adapted(config) or adapters_of(params) else base_of(axes)


def base_id(base) -> str:
    """An identifier of a base's weights: the CRC of every array's path, shape, dtype and byte
    fingerprint (`bond.checkpoint.content_crc`). A LoRA run records it with each checkpoint, since
    adapters mean nothing on another base."""
    return f"{content_crc(base):08x}"


def checkpoint_meta(config: TransformerConfig, base) -> dict | None:
    """What a run's checkpoints record about the weights they need: in a LoRA run the base its
    adapters adapt, {'lora_base': `base_id`(base)}; None for full fine-tuning."""
    return {"lora_base": base_id(base)} if adapted(config) else None


def check_same_base(saved: dict | None, meta: dict | None, where: str) -> None:
    """Raises when a checkpoint's metadata `saved` names a LoRA base other than this run's
    (`checkpoint_meta`; nothing to check when that is None)."""
    if meta is None:
        return
    recorded, current = (saved or {}).get("lora_base"), meta["lora_base"]
    if recorded != current:
        raise ValueError(
            f"{where}: the checkpoint's adapters belong to base {recorded!r}, but this run's base (the reference "
            f"weights) is {current!r}. Point config.pretrained.policy_path at the base they were trained on, "
            "or start the run in a new workdir.")


def count(params) -> int:
    """Scalars in the adapters of `params`."""
    return sum(int(x.size) for x in jax.tree.leaves(adapters_of(params)))


def adapted(config: TransformerConfig) -> bool:
    """Whether `config` has adapters."""
    return bool(config.lora_rank and config.lora_targets)

