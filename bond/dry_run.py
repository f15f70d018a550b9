"""Does a config fit? Compile its programs ahead of time, from shapes alone, for real hardware.

    python -m bond.main --config=configs/pretrained/j_bond_gemma.py:gemma_2b --dry_run --topology=v5e:2x4

builds the run with abstract parameters (`bond.context.build_context(config, abstract=True)`: shapes
from the checkpoints' config.json or the presets in bond/models/presets, no weight read), compiles
the train step and the sampler for the local devices or for a named TPU topology (XLA's TPU compiler
ships in the `libtpu` package: `pip install -e ".[tpu]"`; no TPU needs to be attached), and prints one
JSON line per program with what the compiler reports per chip:

    program            'train_step' or 'sampler' (the step's sample sets drawn in one call)
    argument_gib, output_gib, alias_gib, temp_gib
                       the compiled program's buffers per chip (`memory_analysis()`); the outputs
                       aliased to donated arguments (the train state) are counted once
    peak_gib           arguments + outputs − aliased + temporaries: what the chip must hold
    hbm_gib            the chip's memory (TPU: its HBM as XLA sees it; local: the device's limit)
    fits               peak_gib <= hbm_gib
    flops              XLA's count per chip (`cost_analysis()`), which counts every loop body once,
                       times memory.micro_batches M: with M > 1 every model pass (sampling, scoring,
                       log-prob passes, gradient) runs in a loop over the M micro-batches
    decode_flops       the decode loops' other iterations, estimated as 2·(matmul parameters) per
                       decoded token per row (the loop body is one token of the model)
    seconds_at_peak    (flops + decode_flops) / the chip's peak bf16 FLOP/s: a roofline lower bound
                       on the step's time, not a measurement
    decode_collective_bytes_per_token
                       bytes that collectives inside the decode loop move per chip per token
                       (weights gathered at every token show here)
    largest_buffers    the largest arrays of the optimized program and the operation that made each

The exit status is non-zero when a program does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from bond.hlo import GIB, decode_loop_collective_bytes, largest_buffers


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: jax's chip_config_name for it, chips per host, memory and peak bf16 FLOP/s per chip."""

    config_name: str
    host_bounds: tuple[int, int, int]
    hbm_gib: float
    peak_flops: float


# Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): HBM and peak
# bf16 FLOP/s per chip. v4 and v5p chips are one megacore device each; v5e and v6e hosts hold 8 chips.
# HBM is the capacity XLA allocates from (v5e: 16 GiB of which 15.75 are usable).
CHIPS = {
    "v4": Chip("megacore", (2, 2, 1), 32.0, 275e12),
    "v5e": Chip("default", (2, 4, 1), 15.75, 197e12),
    "v5p": Chip("megacore", (2, 2, 1), 95.0, 459e12),
    "v6e": Chip("default", (2, 4, 1), 31.25, 918e12),
}


def parse_topology(name: str) -> tuple[str, tuple[int, int, int]]:
    """'v5e:2x4' → ('v5e', (2, 4, 1)); ValueError naming --topology and the accepted forms."""
    kind, _, dims = name.partition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if kind not in CHIPS or not 2 <= len(shape) <= 3 or min(shape) < 1:
        raise ValueError(f"--topology={name!r} must be <generation>:<chips per axis>, e.g. 'v5e:2x4' (a v5e-8) or "
                         f"'v5p:2x2x1' (a v5p-8); generations: {sorted(CHIPS)}.")
    return kind, (shape + (1,))[:3]


def target_devices(topology: Optional[str]) -> tuple[list[Any], Optional[Chip]]:
    """The devices to compile for: the local ones (topology None), or a TPU topology's, made by libtpu
    without any TPU attached; with the topology's Chip (None for local devices)."""
    if not topology:
        return list(jax.devices()), None
    kind, shape = parse_topology(topology)
    chip = CHIPS[kind]
    # libtpu takes a machine-wide lock for the TPU it drives; compiling for a topology drives none, so
    # other processes that loaded libtpu (tests, a second dry run) must not block this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        description = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name=chip.config_name,
            chips_per_host_bounds=tuple(min(a, b) for a, b in zip(shape, chip.host_bounds)), num_slices=1)
    except Exception as e:  # no libtpu, or a topology it does not know
        raise RuntimeError(f"--topology={topology}: the TPU compiler could not describe it ({e}). It ships in libtpu: "
                           "pip install -e \".[tpu]\"; without --topology the dry run compiles for the local devices.") from e
    return list(description.devices), chip


def local_hbm_gib(device) -> Optional[float]:
    """A local device's memory limit (GPU, TPU), or the host's memory for a CPU device."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:
        limit = None
    if limit:
        return limit / GIB
    if device.platform == "cpu":
        return os_memory_bytes() / GIB
    return None


def os_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
# Reading a compiled program


def memory_report(compiled) -> dict[str, float]:
    """Per-chip GiB of a compiled program's arguments, outputs, aliased outputs and temporaries, and
    their peak sum (aliased outputs reuse their donated arguments' buffers)."""
    m = compiled.memory_analysis()
    parts = {"argument_gib": m.argument_size_in_bytes, "output_gib": m.output_size_in_bytes,
             "alias_gib": m.alias_size_in_bytes, "temp_gib": m.temp_size_in_bytes}
    peak = parts["argument_gib"] + parts["output_gib"] - parts["alias_gib"] + parts["temp_gib"]
    return {k: round(v / GIB, 4) for k, v in {**parts, "peak_gib": peak}.items()}


# ---------------------------------------------------------------------------------------------
# The programs of a run


def matmul_params(model) -> int:
    """Parameters that multiply each token's activations in one forward pass (all but the embedding
    lookup; a tied embedding still projects onto the vocabulary)."""
    from bond.models import init_params

    shapes = jax.eval_shape(init_params, model, jax.random.key(0))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    embedding = model.vocab_size * model.d_model
    return total - (0 if model.tie_embeddings else embedding)


def decode_loop_flops(setup, sample_counts: Sequence[int], num_chips: int) -> float:
    """FLOPs per chip of the decode loops' iterations that XLA's count leaves out (it counts each loop
    body once): per sampling call of `count` samples for B prompts, (L − 2) more decoded tokens of
    B·count rows at 2·matmul_params each (attention over the cache is left out: a lower bound)."""
    rows = sum(setup.config.batch_size * count for count in sample_counts if count)
    extra_tokens = max(setup.task.max_response_length - 2, 0)
    return 2.0 * matmul_params(setup.model) * rows * extra_tokens / num_chips


def step_sample_counts(context) -> list[int]:
    """The sample sets the step draws (policy, anchor, and reference unless cached per prompt)."""
    plan = context.setup.plan
    counts = [plan.policy, plan.anchor]
    if context.traced.reference_samples is None:
        counts.append(plan.reference)
    return [c for c in counts if c]


def compile_train_step(context):
    """The run's own compiled step, ahead of time."""
    return context.step.lower(context.state, context.batch(0), context.fixed, context.traced).compile()


def compile_sampler(context, count: int):
    """The step's sampler (`bond.step.sample_responses`) drawing `count` samples of each of the step's
    prompts from the policy, with the run's shardings, compiled ahead of time. The policy's weights
    are the reference's shapes (it starts there), or in a LoRA run the base with the run's adapters."""
    from bond import lora, sharding
    from bond.step import compute_params, model_params, sample_responses

    setup, batch = context.setup, context.batch(0)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(setup.mesh))
    data = (batch.prompts, batch.prompt_mask, key)
    data_shardings = (context.shardings.batch.prompts, context.shardings.batch.prompt_mask, sharding.replicated(setup.mesh))
    if lora.adapted(setup.model):
        def draw(trained, base, prompts, mask, key):
            return sample_responses(setup, model_params(setup, compute_params(setup, trained), base), prompts, mask, key,
                                    count)
        weights = (context.state.params, context.fixed.reference)
        weight_shardings = (context.shardings.state.params, context.shardings.fixed.reference)
    else:
        def draw(params, prompts, mask, key):
            return sample_responses(setup, params, prompts, mask, key, count)
        weights, weight_shardings = (context.fixed.reference,), (context.shardings.fixed.reference,)
    # Traced under the mesh, as the step traces its sampler: rows split over the batch axes, decode
    # weights gathered once (`constrain_batch`, `gather_for_decoding` act only under a mesh).
    split = context.shardings.batch.prompts == sharding.batch_sharding(setup.mesh)
    sample = sharding.jit_sharded(draw, in_shardings=weight_shardings + data_shardings, out_shardings=None,
                                  activation_mesh=setup.mesh if split else None)
    return sample.lower(*weights, *data).compile()


_OUT_OF_MEMORY = re.compile(r"memory required for HLO temporaries \(([\d.]+)(\w)\) exceeds available HBM \(([\d.]+)(\w)\)")
_UNITS = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 2**10}


def out_of_memory(error: Exception) -> Optional[dict]:
    """The GiB that XLA's TPU compiler says a program's temporaries need and the chip has, from its
    RESOURCE_EXHAUSTED error (it refuses to compile a program that does not fit), or None for other errors."""
    match = _OUT_OF_MEMORY.search(str(error))
    if not match:
        return None
    need, need_unit, have, have_unit = match.groups()
    return {"temp_gib": round(float(need) * _UNITS[need_unit], 3), "hbm_gib": round(float(have) * _UNITS[have_unit], 3)}


def compile_program(lower) -> tuple[Any, Optional[dict]]:
    """(compiled, None), or (None, `out_of_memory` figures) when the compiler refuses the program for its size."""
    try:
        return lower(), None
    except Exception as e:
        figures = out_of_memory(e)
        if figures is None:
            raise
        return None, figures


def report(program: str, compiled, context, chip: Optional[Chip], topology: Optional[str],
           sample_counts: Sequence[int], refused: Optional[dict] = None) -> dict:
    """One JSON-able line about a compiled program (see the module docstring); for a program the
    compiler refused as too large, its figures (`refused`) and fits=False."""
    devices = context.setup.mesh.devices.flatten()
    head = {"program": program, "topology": topology or "local", "device_kind": devices[0].device_kind,
            "chips": len(devices), "mesh": dict(context.setup.mesh.shape)}
    if compiled is None:
        return {**head, **refused, "peak_gib": None, "fits": False,
                "error": "the compiler refused the program: its temporaries alone exceed the chip's memory"}
    memory = memory_report(compiled)
    hbm = chip.hbm_gib if chip else local_hbm_gib(devices[0])
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    from bond.step import micro_batch_count

    flops = float(cost.get("flops", 0.0)) * micro_batch_count(context.setup)
    decode = decode_loop_flops(context.setup, sample_counts, len(devices))
    text = compiled.as_text()
    return {
        **head,
        **memory,
        "hbm_gib": None if hbm is None else round(hbm, 3),
        "fits": None if hbm is None else memory["peak_gib"] <= hbm,
        "flops": flops,
        "decode_flops": decode,
        "seconds_at_peak": round((flops + decode) / chip.peak_flops, 4) if chip else None,
        "decode_collective_bytes_per_token": decode_loop_collective_bytes(text),
        "largest_buffers": largest_buffers(text),
    }


def dry_run(config: ml_collections.ConfigDict, topology: Optional[str] = None, log=print,
            target: Optional[tuple[list[Any], Optional[Chip]]] = None) -> list[dict]:
    """Compiles `config`'s train step and sampler ahead of time for `topology` (None: the local devices)
    from shapes alone and returns one report per program (see the module docstring). `target`:
    `target_devices(topology)`, when the caller already has it."""
    from bond.context import build_context

    devices, chip = target or target_devices(topology)
    context = build_context(config, log, abstract=True, devices=devices)
    counts = step_sample_counts(context)
    total = sum(counts)
    step = compile_program(lambda: compile_train_step(context))
    sampler = compile_program(lambda: compile_sampler(context, total))
    return [report("train_step", *step[:1], context, chip, topology, counts, step[1]),
            report("sampler", *sampler[:1], context, chip, topology, [total], sampler[1])]


def main(config: ml_collections.ConfigDict, topology: Optional[str] = None,
         target: Optional[tuple[list[Any], Optional[Chip]]] = None) -> int:
    """Prints one JSON line per program; the exit status: 0 when every program fits, 1 otherwise."""
    lines = dry_run(config, topology, log=lambda *_: None, target=target)
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0 if all(line["fits"] is not False for line in lines) else 1


