"""The collectives of a compiled program, read from its HLO text.

``collectives(compiled.as_text())`` lists every collective of an XLA program after
optimisation (the one a device runs): its kind (``all-gather``, ``all-reduce``,
``reduce-scatter``, ``collective-permute``, ``all-to-all``), the bytes of its result
on one device, and the ``op_name`` of its metadata — the JAX name stack, so a
collective traced under ``jax.named_scope("lasp2")`` carries ``lasp2`` in its name,
and one of the backward pass ``transpose(``.

Two details of XLA:TPU's output are undone here:

- a collective may be split into a chain of pieces (fusions that repeat the same
  instruction, marked with one ``chain_id`` frontend attribute): they are counted
  once; an asynchronous ``*-start`` / ``*-done`` pair is one collective too;
- a reduce-scatter may become an all-reduce followed by a dynamic slice, and lose
  its metadata; such a collective takes the ``op_name`` of the instruction that
  produces its operand (or, failing that, of its first user).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

#: bytes per element of HLO element types
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s(?P<op>[\w\-]+)\("
)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_CHANNEL = re.compile(r"channel_id=(?P<id>\d+)")
_CHAIN = re.compile(r'chain_id="(?P<id>[^"]*)"')
_OPERANDS = re.compile(r"%(?P<name>[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program.

    Attributes:
      kind: one of :data:`KINDS` (``-start`` / ``-done`` halves are one collective).
      shapes: its result's arrays, e.g. ``("f32[4,4,2048]",)`` (XLA's combiners may
        merge independent collectives into one with several arrays).
      array_bytes: the size of each of those arrays on one device.
      op_name: the JAX name stack of the op (``jit(f)/…/lasp2/…/all_gather``).
      channel_id: XLA's channel id (``None`` when absent).
    """

    kind: str
    shapes: tuple[str, ...]
    array_bytes: tuple[int, ...]
    op_name: str
    channel_id: int | None

    @property
    def bytes(self) -> int:
        """The result's size on one device (all its arrays)."""
        return sum(self.array_bytes)

    @property
    def backward(self) -> bool:
        """Whether it belongs to a backward pass (JAX's transpose of the forward)."""
        return "transpose(" in self.op_name

    def in_scope(self, scope: str) -> bool:
        """Whether ``scope`` (a ``jax.named_scope``) is a component of its op name —
        ``lasp2`` matches ``…/lasp2/…`` and ``transpose(jvp(lasp2))`` but not ``lasp2h``."""
        return re.search(rf"(^|[/(]){re.escape(scope)}([)/]|$)", self.op_name) is not None


def _array_bytes(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    shapes, sizes = [], []
    for match in _ARRAY.finditer(text):
        dtype = match["dtype"]
        if dtype not in DTYPE_BYTES:
            continue
        dims = [int(d) for d in match["dims"].split(",") if d]
        shapes.append(f"{dtype}[{match['dims']}]")
        sizes.append(DTYPE_BYTES[dtype] * math.prod(dims))
    return tuple(shapes), tuple(sizes)


def _result_type(op: str, type_text: str) -> str:
    """The part of an instruction's type that is the collective's result: an async
    all-gather or collective-permute start returns ``(operand, result, …)``."""
    type_text = re.sub(r"\{[^{}]*\}", "", type_text)  # layouts
    if op in ("all-gather-start", "collective-permute-start") and type_text.startswith("("):
        return _split_tuple(type_text)[1]
    return type_text


def _split_tuple(text: str) -> list[str]:
    body, depth, parts, current = text[1:-1], 0, [], []
    for char in body:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if current:
        parts.append("".join(current).strip())
    return parts


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of ``hlo_text`` (``compiled.as_text()``), once each, in order."""
    instructions: dict[str, tuple[str, str]] = {}  # name -> (op_name, line)
    users: dict[str, list[str]] = {}
    found: list[tuple[str, str, str, str]] = []  # kind, op, name, line
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, op = match["name"], match["op"]
        op_name = _OP_NAME.search(line)
        instructions[name] = (op_name["op_name"] if op_name else "", line)
        call = line[match.end() :].split(")", 1)[0]
        for operand in _OPERANDS.finditer(call):
            users.setdefault(operand["name"], []).append(name)
        kind = op.removesuffix("-start")
        if kind in KINDS and not op.endswith("-done"):
            found.append((kind, op, name, line))
    result, seen = [], set()
    for kind, op, name, line in found:
        channel = _CHANNEL.search(line)
        channel_id = int(channel["id"]) if channel else None
        match = _INSTRUCTION.match(line)
        assert match is not None
        shapes, sizes = _array_bytes(_result_type(op, match["type"]))
        op_name = instructions[name][0] or _borrowed_name(name, line, instructions, users)
        chain = _CHAIN.search(line)
        key = (kind, chain["id"]) if chain else (name,)
        if key in seen:
            continue
        seen.add(key)
        result.append(Collective(kind, shapes, sizes, op_name, channel_id))
    return result


def _borrowed_name(
    name: str, line: str, instructions: dict[str, tuple[str, str]], users: dict[str, list[str]]
) -> str:
    """The op name of the operand's producer, else of the first user that has one."""
    match = _INSTRUCTION.match(line)
    assert match is not None
    call = line[match.end() :].split(")", 1)[0]
    for operand in _OPERANDS.finditer(call):
        op_name = instructions.get(operand["name"], ("", ""))[0]
        if op_name:
            return op_name
    for user in users.get(name, []):
        op_name = instructions.get(user, ("", ""))[0]
        if op_name:
            return op_name
    return ""


def summarize(items: Iterable[Collective]) -> dict[tuple[str, int], int]:
    """``{(kind, bytes): count}``."""
    counts: dict[tuple[str, int], int] = {}
    for item in items:
        counts[item.kind, item.bytes] = counts.get((item.kind, item.bytes), 0) + 1
    return counts
