"""Device meshes and shardings: logical axis names -> mesh axes, as data.

The mesh has three axes (as in t5x / big_vision / MaxText):

  data    pure data parallelism: the batch is split, parameters are replicated;
  fsdp    the batch is split AND parameters are split along their 'embed' dimension
          (ZeRO-3 style: XLA all-gathers a layer's weights when it needs them);
  tensor  Megatron-style model parallelism over 'mlp', 'heads' and 'vocab'.

Parameters carry LOGICAL axis names (`bond.models.param_logical_axes`); `RULES` maps each name to
mesh axes. Changing the parallelism layout means changing the mesh shape or the rules, never the
model. Mesh axes are `AxisType.Auto` (GSPMD propagation): jax >= 0.9 makes Explicit axes by
default, under which a matmul over a sharded contracting dimension needs an explicit
`out_sharding`.

One device is the mesh (1, 1, 1): every function here works unchanged on it. With several
processes (`jax.distributed.initialize`), `make_mesh` spans the devices of all processes and
`host_local_to_global` assembles each process's slice of the batch into one global array.

References:
  jax.jit with in/out shardings (formerly pjit):
    https://docs.jax.dev/en/latest/notebooks/Distributed_arrays_and_automatic_parallelization.html
  t5x partitioning rules: https://github.com/google-research/t5x/blob/main/t5x/partitioning.py
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("position", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


# ---------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Mesh shape with its one -1 entry (if any) replaced by the remaining devices.

    Raises:
      ValueError naming `mesh_shape` and the device count if the shape does not fit.
    """
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh_shape must have {len(MESH_AXES)} entries for the axes {MESH_AXES}, got {shape}."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"mesh_shape={shape}: entries must be positive, with at most one -1 (the remaining devices)."
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape={shape} does not fit {num_devices} devices: {num_devices} is not divisible "
                f"by the fixed axes' product {known}. Set mesh_shape so that its product is {num_devices}."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh_shape={shape} needs {math.prod(shape)} devices but {num_devices} are available. "
            f"Set mesh_shape so that its product is {num_devices}, or use -1 for one axis."
        )
    return shape


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes.

    Args:
      mesh_shape: three sizes; one of them may be -1 for "the remaining devices".
      devices: the devices to use (default: all devices of all processes, in the order
        `jax.make_mesh` picks for the topology).

    Raises:
      ValueError if the shape does not fit the devices (names `mesh_shape` and the count).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------------
# Logical -> mesh


def _mesh_axes_of(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise ValueError(
        f"logical axis {name!r} has no entry in the sharding rules {tuple(r[0] for r in rules)}; "
        f"add ({name!r}, <mesh axes or None>) to the rules."
    )


def logical_to_mesh_spec(
    logical_spec: PartitionSpec,
    mesh: Mesh,
    rules: Rules = RULES,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Mesh PartitionSpec of an array annotated with logical axis names.

    Each logical name becomes the mesh axes the rules give it, minus:
      * mesh axes of size 1 (they split nothing; dropping them keeps specs readable),
      * mesh axes already used by an earlier dimension (a mesh axis can split one dimension only),
      * with `shape` given, mesh axes whose size does not divide the dimension (that dimension is
        then split over fewer axes, or replicated). E.g. a vocabulary of 9 stays replicated on a
        tensor axis of 2. Correct for any size; to shard such a dimension, pad it.
    """
    used: set[str] = set()
    out = []
    for dim, name in enumerate(tuple(logical_spec)):
        names = name if isinstance(name, tuple) else (name,)
        axes = [a for n in names for a in _mesh_axes_of(n, rules)]
        kept: list[str] = []
        for axis in axes:
            if axis in used or mesh.shape[axis] == 1:
                continue
            split = math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]
            if shape is not None and shape[dim] % split:
                continue
            kept.append(axis)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_shardings(params: Any, logical_axes: Any, mesh: Mesh, rules: Rules = RULES) -> Any:
    """NamedShardings for a parameter pytree from its logical PartitionSpecs.

    Args:
      params: the parameters, or their shapes (`jax.eval_shape(init_params, ...)`).
      logical_axes: same structure, PartitionSpec leaves of logical names
        (`bond.models.param_logical_axes(config)`).
      mesh: the device mesh.
      rules: logical -> mesh axes.
    """
    return jax.tree.map(
        lambda spec, p: NamedSharding(mesh, logical_to_mesh_spec(spec, mesh, rules, np.shape(p))),
        logical_axes,
        params,
        is_leaf=_is_spec,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array copied whole onto every device (scalars, keys, small tables)."""
    return NamedSharding(mesh, PartitionSpec())


def shardings_like_params(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree that embeds param-shaped subtrees (an optax state).

    Optax states mirror the parameters (Adam's mu and nu are pytrees of the params' structure):
    every subtree with the params' structure gets the params' shardings; every other leaf (step
    counts, scalars, anything else) is replicated.

    Args:
      tree: the pytree, or its shapes (`jax.eval_shape(optimizer.init, params)`).
      params: the parameters or their shapes (to recognise the mirrored subtrees).
      shardings: the params' NamedShardings (`param_shardings`).
      mesh: the device mesh.
    """
    params_def = jax.tree.structure(params)
    param_leaves_shapes = [np.shape(p) for p in jax.tree.leaves(params)]

    def mirrors_params(node: Any) -> bool:
        if jax.tree.structure(node) != params_def:
            return False
        return [np.shape(x) for x in jax.tree.leaves(node)] == param_leaves_shapes

    return jax.tree.map(
        lambda node: shardings if mirrors_params(node) else replicated(mesh),
        tree,
        is_leaf=mirrors_params,
    )


# ---------------------------------------------------------------------------------------------
# Batches


def batch_axes(rules: Rules = RULES) -> tuple[str, ...]:
    """The mesh axes that split the batch (the rule for the logical axis 'batch')."""
    return _mesh_axes_of("batch", rules)


def num_batch_shards(mesh: Mesh, rules: Rules = RULES) -> int:
    """How many pieces the batch is split into: the product of the batch axes' sizes."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    """Split the leading (batch) axis over the batch mesh axes; replicate the other axes."""
    axes = tuple(a for a in batch_axes(rules) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_batch_divides(batch_size: int, mesh: Mesh, field: str = "batch_size", rules: Rules = RULES) -> None:
    """Raises a ValueError naming `field` if `batch_size` does not split evenly over the mesh.

    Call it on config values before the first step (e.g. field='prompts_per_step').
    """
    shards = num_batch_shards(mesh, rules)
    if batch_size % shards:
        sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(rules))
        raise ValueError(
            f"{field}={batch_size} does not divide over the {shards} batch shards of the mesh ({sizes}); "
            f"set {field} to a multiple of {shards} or change mesh_shape."
        )


def local_batch_rows(sharding: NamedSharding, global_batch_size: int) -> slice:
    """The rows of the global batch that this process must load (all of them with one process).

    They are the rows the batch sharding puts on this process's devices; `make_mesh` keeps
    them contiguous.
    """
    indices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    rows = [index[0].indices(global_batch_size)[:2] for index in indices]
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    covered = set().union(*(range(a, b) for a, b in rows))
    if covered != set(range(start, stop)):
        raise ValueError(
            f"this process's devices hold non-contiguous rows of the batch ({sorted(rows)}); build the mesh "
            "with make_mesh so that each process's devices are adjacent along the batch axes."
        )
    return slice(start, stop)


def host_local_to_global(local_batch: Any, sharding: NamedSharding) -> Any:
    """Global arrays from each process's rows of the batch (a pytree, leading axis = batch).

    Each process passes the rows `local_batch_rows(sharding, global_batch_size)` and gets back
    arrays of the global batch split over all devices of all processes. With one process this is
    `jax.device_put(batch, sharding)`.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def device_put_global(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` of a pytree that every process holds in full (e.g. params from one seed).

    Each process copies only the pieces its own devices hold, so it also works when the
    shardings span several processes. Always copies (the result never aliases `tree`).
    """

    def put(x: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def broadcast_shardings(shardings: Any, tree: Any) -> Any:
    """`shardings`, a prefix of `tree` (one sharding per subtree, as jax.jit's in_shardings take
    them), expanded to one sharding per leaf of `tree`."""
    return jax.tree.map(lambda s, subtree: jax.tree.map(lambda _: s, subtree), shardings, tree,
                        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def place(tree: Any, shardings: Any) -> Any:
    """`tree` on `shardings` (a matching pytree, a prefix of it, or one sharding), from values every process holds in full.

    With one process this is `jax.device_put`; with several, `device_put_global` (a host copy,
    each process filling its own devices), since `jax.device_put` cannot reach other processes'
    devices.
    """
    shardings = broadcast_shardings(shardings, tree)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return device_put_global(tree, shardings)


def process_local(tree: Any) -> Any:
    """`tree` in full on this process: unchanged with one process; with several, each array
    gathered from all processes (`process_allgather`, tiled) into host numpy arrays, so that
    process-local code (e.g. an evaluation outside jit) can use it. Every process must call it."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), tree)


def sync_processes(name: str) -> None:
    """A barrier across all processes (a no-op with one); `name` identifies it in errors."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Activations and decoding weights, inside a traced program


def _context_mesh_axes(axes: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    """The mesh set in context (`jax.set_mesh`) and those of `axes` that split something on it;
    (None, ()) when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, ()
    return mesh, tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def constrain_batch(tree: Any, rules: Rules = RULES) -> Any:
    """`tree`'s arrays split along their leading (batch) axis over the mesh's batch axes, their
    other axes left to XLA; `tree` unchanged without a mesh in context or where the leading axis
    does not divide over the batch shards.

    Why: FSDP splits the weights on their contracting 'embed' dimension, and nothing else tells
    XLA where activations live: it may keep the whole batch on every device and all-reduce
    partial products (measured for Gemma-2B on 8 chips: 94 GiB per chip instead of 28). The model
    calls this at every block boundary and the sampler on its rows. It acts only while a mesh is
    set in context, which the single-run step is traced under (`jit_sharded(activation_mesh=...)`);
    a population's vmapped step is not (its members, not its prompts, are split), so there it is
    the identity. The mesh is part of JAX's trace cache key, so programs traced with and without
    it never share a trace.
    """
    mesh, axes = _context_mesh_axes(batch_axes(rules))
    if not axes:
        return tree
    shards = math.prod(mesh.shape[a] for a in axes)
    lead = axes[0] if len(axes) == 1 else axes

    def constrain(x: jax.Array) -> jax.Array:
        if np.ndim(x) == 0 or np.shape(x)[0] % shards:
            return x
        spec = PartitionSpec(lead, *([PartitionSpec.UNCONSTRAINED] * (np.ndim(x) - 1)))
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(constrain, tree)


def split_micro_batches(tree: Any, count: int) -> Any:
    """Leaves [B, ...] → [count, B/count, ...], micro-batch m holding rows m, m + count, m + 2·count, ...

    Strided rather than contiguous: the batch axis is split over devices in contiguous blocks, so
    every micro-batch keeps B/(count·D) rows on each of the D devices instead of living on a few."""
    def split(x):
        rows = x.shape[0]
        if rows % count:
            raise ValueError(f"config.memory.micro_batches={count} does not divide the step's {rows} prompts; "
                             f"set it to a divisor of {rows}.")
        return jnp.swapaxes(x.reshape((rows // count, count) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def join_micro_batches(tree: Any) -> Any:
    """The inverse of `split_micro_batches`: leaves [count, B/count, ...] → [B, ...] in the original row order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def map_micro_batches(fn: Callable[[Any], Any], tree: Any, count: int) -> Any:
    """fn over `count` strided micro-batches of `tree`'s rows in turn (lax.map), joined back in
    row order: fn(tree) for row-wise fn, holding one micro-batch's intermediates at a time."""
    if count == 1:
        return fn(tree)
    return join_micro_batches(jax.lax.map(fn, split_micro_batches(tree, count)))


DECODE_WEIGHTS = ("auto", "fsdp", "gathered")


def gather_for_decoding(params: Any, logical_axes: Any, layout: str, rules: Rules = RULES) -> Any:
    """`params` collected whole over the batch axes (their 'embed' dimension unsplit; the tensor
    split kept) when `layout` says so and a mesh is set in context; else unchanged.

    layout: 'fsdp' leaves the weights as trained, so a decode loop gathers every FSDP-split weight
      at every token; 'gathered' gathers them once, before the loop; 'auto' is 'gathered' when the
      context mesh's fsdp axis is > 1 (config.memory.decode_weights).
    """
    if layout not in DECODE_WEIGHTS:
        raise ValueError(f"decode weight layout {layout!r} is not one of {DECODE_WEIGHTS}.")
    mesh, fsdp = _context_mesh_axes(_mesh_axes_of("embed", rules))
    if mesh is None or layout == "fsdp" or (layout == "auto" and not fsdp):
        return params
    unsplit = tuple((name, None if name == "embed" else axes) for name, axes in rules)
    specs = jax.tree.map(lambda spec, p: logical_to_mesh_spec(spec, mesh, unsplit, np.shape(p)),
                         logical_axes, params, is_leaf=_is_spec)
    return jax.lax.with_sharding_constraint(params, specs)


# ---------------------------------------------------------------------------------------------
# Jit


def jit_sharded(
    fn: Callable[..., Any],
    *,
    in_shardings: Any,
    out_shardings: Any,
    donate_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    compiler_options: dict[str, Any] | None = None,
    activation_mesh: Mesh | None = None,
) -> Callable[..., Any]:
    """`jax.jit` of a step with its input and output shardings fixed (what pjit was).

    in_shardings / out_shardings are pytrees of NamedShardings matching the positional
    arguments / the outputs (a prefix tree, e.g. one sharding for a whole subtree, is fine).
    Donate the arguments the step replaces (params, optimizer state) so XLA reuses their buffers.
    `compiler_options` go to XLA (e.g. {"xla_backend_optimization_level": 0} compiles small
    test programs on CPU about 2.5x faster).
    `activation_mesh`: trace (call and lower) under `jax.set_mesh(activation_mesh)`, so that
    `constrain_batch` splits the activations over the batch axes and `gather_for_decoding` acts:
    a single run's step, whose prompts are split over the batch axes.
    """
    jitted = jax.jit(
        fn,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=donate_argnums,
        static_argnames=static_argnames,
        compiler_options=compiler_options,
    )
    return jitted if activation_mesh is None else _UnderMesh(jitted, activation_mesh)


class _UnderMesh:
    """A jitted function called and lowered with a mesh set in context (`jax.set_mesh` may not be
    entered inside a trace, so it wraps the calls); other attributes are the jitted function's."""

    def __init__(self, jitted: Any, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.jitted, name)
