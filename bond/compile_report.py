"""What a compiled program communicates, read from its HLO text (`jax.jit(f).lower(...).compile().as_text()`).

`collective_bytes(hlo_text)` sums the result bytes of the collectives (all-gather, all-reduce,
reduce-scatter, collective-permute, all-to-all) in the program, or with `inside_loops=True` only
in the computations a `while` loop runs (its bodies and conditions and everything they call). The
text is the SPMD-partitioned program of one device, so the bytes are per device; a decode loop's
body runs once per token, so inside its loop they are the bytes collected per decoded token. E.g.
the sampler with its weights in the FSDP layout all-gathers every weight at every token, and with
`config.memory.decode_weights='gathered'` gathers them once, outside the loop.

Asynchronous collectives (`all-gather-start` / `-done` pairs, as TPU programs have them) count once,
by their `-done` result. Nested loops count once each (per iteration of the outermost).
"""

from __future__ import annotations

import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

# Bytes per element of the HLO element types (pred is stored as a byte).
_ELEMENT_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-done)?\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_LOOP = re.compile(r"\swhile\(.*?\bbody=%?([\w.\-]+)")
_LOOP_CONDITION = re.compile(r"\swhile\(.*?\bcondition=%?([\w.\-]+)")


def array_bytes(shape_text: str) -> int:
    """Bytes of the arrays an HLO result type lists (`f32[8,32]{1,0}`, or a tuple of them).

    Raises:
      ValueError for an element type this table does not know (so that nothing is silently skipped).
    """
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype.startswith("f8"):
            size = 1
        elif dtype in _ELEMENT_BYTES:
            size = _ELEMENT_BYTES[dtype]
        else:
            raise ValueError(f"unknown HLO element type {dtype!r} in {shape_text!r}; add it to _ELEMENT_BYTES.")
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += size * count
    return total


def computations(hlo_text: str) -> dict[str, list[str]]:
    """The HLO module's computations: name -> its instruction lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and not line.startswith((" ", "HloModule")):
                current = match.group(1)
                out[current] = []
        elif line.startswith("}"):
            current = None
        else:
            out[current].append(line)
    return out


def _called(line: str) -> list[str]:
    names = []
    for target in _CALLED.findall(line):
        names += [n.strip().lstrip("%") for n in target.strip("{}").split(",") if n.strip()]
    return names


def loop_computations(hlo_text: str) -> set[str]:
    """The computations a `while` loop runs: its bodies and conditions, and all they call."""
    comps = computations(hlo_text)
    todo = [name for lines in comps.values() for line in lines
            for pattern in (_LOOP, _LOOP_CONDITION) for name in pattern.findall(line)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += [callee for line in comps[name] for callee in _called(line)]
    return seen


def collective_bytes(hlo_text: str, inside_loops: bool = True) -> int:
    """Result bytes of the collectives in a compiled program's HLO text, per device.

    inside_loops: count only the collectives that `while` loops run (per iteration: for a decode
      loop, the bytes collected per decoded token); False counts the whole program, once each.
    """
    comps = computations(hlo_text)
    names = loop_computations(hlo_text) if inside_loops else set(comps)
    total = 0
    for name in names:
        for line in comps[name]:
            match = _INSTRUCTION.match(line)
            if match:
                total += array_bytes(match.group(1))
    return total
