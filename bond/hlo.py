"""Reading an optimized XLA program (`compiled.as_text()`): its largest buffers and its collectives.

The HLO text lists computations; each instruction line reads

    %name = bf16[64,512,2048]{...} opcode(operands), ..., metadata={op_name="jit(step)/..." source_file=...}

Instructions inside fusion computations never reach memory (a fusion's result does), and a
while loop's `body=%computation` runs once per iteration: the decode loop's body once per token.
"""

from __future__ import annotations

import math
import re

GIB = 2**30
# Bytes per element of the HLO element types (pred is stored as a byte; 4-bit types padded to one).
_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_SOURCE_FILE = re.compile(r'source_file="([^"]+)"')
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_NOT_BUFFERS = ("parameter", "constant", "get-tuple-element", "bitcast", "tuple", "while", "call", "conditional")


def _nbytes(dtype: str, dims: str) -> int:
    """Bytes of one HLO array type; ValueError for an element type the table does not know (so that
    nothing is silently miscounted)."""
    if dtype.startswith("f8"):
        size = 1
    elif dtype in _DTYPE_BYTES:
        size = _DTYPE_BYTES[dtype]
    else:
        raise ValueError(f"unknown HLO element type {dtype!r}; add it to bond.hlo._DTYPE_BYTES.")
    return math.prod(int(d) for d in dims.split(",") if d) * size


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name → its instruction lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split(" ", 1)[0].lstrip("%")
            out[current] = []
        elif current is not None and line.strip() and line.strip() != "}":
            out[current].append(line)
    return out


def _instructions(lines: list[str]):
    for line in lines:
        match = _INSTRUCTION.match(line)
        if match:
            yield match.group(1), match.group(2), match.group(3), line


def _fusion_bodies(comps: dict[str, list[str]]) -> set[str]:
    bodies = set()
    for lines in comps.values():
        for _, _, opcode, line in _instructions(lines):
            if opcode == "fusion":
                bodies.update(re.findall(r"calls=%([\w.\-]+)", line))
    return bodies


def largest_buffers(hlo_text: str, count: int = 5) -> list[dict]:
    """The `count` largest array results among the program's materialized instructions (not inside a
    fusion; every array of a multi-output instruction): their GiB, dtype[shape], HLO opcode and the
    jax operation that made them (op_name)."""
    comps = computations(hlo_text)
    fused = _fusion_bodies(comps)
    found = []
    for name, lines in comps.items():
        if name in fused:
            continue
        for _, result, opcode, line in _instructions(lines):
            if opcode in _NOT_BUFFERS or opcode.endswith("-done"):  # a -done returns its -start's buffer
                continue
            arrays = sorted(_ARRAY.findall(result), key=lambda a: -_nbytes(*a))
            # an async -start's tuple holds its operand and its result: the result is the new buffer
            op = _OP_NAME.search(line)
            for dtype, dims in arrays[:1] if opcode.endswith("-start") else arrays:
                found.append((_nbytes(dtype, dims), f"{dtype}[{dims}]", opcode, op.group(1) if op else ""))
    found.sort(key=lambda x: -x[0])
    return [{"gib": round(size / GIB, 3), "array": array, "hlo": opcode, "op": op} for size, array, opcode, op in found[:count]]


def _called(comps: dict[str, list[str]], root: str) -> set[str]:
    """`root` and every computation it calls, transitively."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            todo.extend(re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.\-]+)", line))
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                todo.extend(n.strip().lstrip("%") for n in group.split(","))
    return seen


def collective_bytes(lines: list[str]) -> int:
    """Bytes of the results of the collectives among `lines` (an async collective counted at its start,
    by its largest array: the gathered or reduced result)."""
    total = 0
    for _, result, opcode, _ in _instructions(lines):
        base = opcode.removesuffix("-start")
        if base not in COLLECTIVES or opcode.endswith("-done"):
            continue
        sizes = [_nbytes(d, s) for d, s in _ARRAY.findall(result)]
        total += max(sizes) if opcode.endswith("-start") else sum(sizes)
    return total


def _table(hlo_text: str, title: str) -> dict[int, str]:
    """A numbered table of the module's header ('FileNames', 'FileLocations', 'StackFrames'): id → text."""
    match = re.search(rf"^{title}\n((?:\d+ .*\n)+)", hlo_text, re.M)
    rows = match.group(1).splitlines() if match else []
    return {int(row.split(" ", 1)[0]): row.split(" ", 1)[1] for row in rows}


def source_files(hlo_text: str) -> dict[int, str]:
    """stack_frame_id → the source file of that frame (the Python line that made an instruction)."""
    names = {i: text.strip('"') for i, text in _table(hlo_text, "FileNames").items()}
    locations = {i: int(re.search(r"file_name_id=(\d+)", text).group(1))
                 for i, text in _table(hlo_text, "FileLocations").items()}
    frames = _table(hlo_text, "StackFrames")
    return {i: names.get(locations.get(int(re.search(r"file_location_id=(\d+)", text).group(1))), "")
            for i, text in frames.items()}


def _source_file(line: str, files: dict[int, str]) -> str:
    source = _SOURCE_FILE.search(line)
    if source:
        return source.group(1)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    return files.get(int(frame.group(1)), "") if frame else ""


def loop_collective_bytes(hlo_text: str, source_suffix: str = "") -> int:
    """Collective bytes moved per iteration of the program's while loops (each loop body with the
    computations it calls), over the loops whose while instruction was made by a source file ending in
    `source_suffix` ('' = every loop)."""
    comps = computations(hlo_text)
    files = source_files(hlo_text)
    total = 0
    for lines in comps.values():
        for _, _, opcode, line in _instructions(lines):
            if opcode != "while":
                continue
            if source_suffix and not _source_file(line, files).endswith(source_suffix):
                continue
            body = re.search(r"body=%([\w.\-]+)", line).group(1)
            total += sum(collective_bytes(comps[name]) for name in _called(comps, body))
    return total


def decode_loop_collective_bytes(hlo_text: str) -> int:
    """Collective bytes per decoded token: those of the sampler's decode loops (bond/sampling.py)."""
    return loop_collective_bytes(hlo_text, "bond/sampling.py")
