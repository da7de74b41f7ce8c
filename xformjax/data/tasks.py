"""Synthetic sequence tasks as grain random-access sources.

Every task is a frozen dataclass with a ``seed`` and ``num_examples``; indexing it
(``task[i]``) builds example ``i`` from ``numpy.random.default_rng((seed, i))``,
so a task is deterministic, random-access and cheap to shard or resume. An
example is a dict of fixed-length arrays:

- ``inputs``  int32 ``[L]``: the token ids the model reads;
- ``targets`` int32 ``[L]``: what it should predict *at* each position;
- ``mask``    float32 ``[L]``: 1 where the prediction is scored.

``vocab_size`` covers every id in ``inputs`` and ``targets``; ``PAD`` positions
carry mask 0. A task checks its fields when it is built: a field of the wrong type
raises ``TypeError``, a value that could not make an example (``num_pairs=0``,
``min_length > max_length``, a ListOps length no expression can have) ``ValueError``
naming the task and the field. Tasks:

- :class:`MQAR` — multi-query associative recall (Zoology, Arora et al. 2023);
- :class:`Parity` — the running parity of a bit string;
- :class:`ModularArithmetic` — an expression over ``Z_m`` with or without brackets;
- :class:`WordProblem` — running products in S3, A5 or S5 (Merrill et al. 2024);
- :class:`ListOps` — Long Range Arena's nested MAX/MIN/MED/SM lists (Nangia &
  Bowman 2018; Tay et al. 2021).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
from typing import ClassVar

import numpy as np

from xformjax.field_checks import check_int, check_real


def _example(inputs, targets, mask) -> dict[str, np.ndarray]:
    return {
        "inputs": np.asarray(inputs, np.int32),
        "targets": np.asarray(targets, np.int32),
        "mask": np.asarray(mask, np.float32),
    }


def _labelled_at_end(ids: list[int], value: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """``ids`` padded to ``length``; ``value`` is the target at the last real token,
    the only scored position."""
    targets, mask = np.zeros(length), np.zeros(length)
    targets[len(ids) - 1], mask[len(ids) - 1] = value, 1
    return _example(ids + [pad_id] * (length - len(ids)), targets, mask)


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """Base: deterministic random access by index."""

    seed: int = 0
    num_examples: int = 100_000

    name: ClassVar[str] = ""

    def __post_init__(self):
        self._int("seed", 0)
        self._int("num_examples", 1)

    def _int(self, field: str, low: int | None = None, high: int | None = None) -> int:
        """Raise unless the field ``field`` is an integer in ``[low, high]``."""
        return check_int(
            f"{type(self).__name__}: `{field}`", getattr(self, field), low=low, high=high
        )

    def _lengths(self) -> None:
        """``1 ≤ min_length ≤ max_length``."""
        low, high = self._int("min_length", 1), self._int("max_length")
        if high < low:
            raise ValueError(
                f"{type(self).__name__}: `max_length` must be ≥ `min_length` ({low}); got {high}"
            )

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(
                f"{type(self).__name__} has {self.num_examples} examples; got index {index}"
            )
        return self.build(np.random.default_rng((self.seed, int(index))))

    @abc.abstractmethod
    def build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One example from ``rng``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids in inputs and targets."""

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """``L``, the fixed length of every example."""


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
    """``k_1 v_1 … k_n v_n`` then queries ``q_1 … q_m`` (each one of the keys):
    predict each query's value. Keys are ids ``[0, num_keys)``, values
    ``[num_keys, num_keys + num_values)``; the ``n`` keys of an example are distinct."""

    num_pairs: int = 8
    num_queries: int = 8
    num_keys: int = 64
    num_values: int = 64
    name: ClassVar[str] = "mqar"

    def __post_init__(self):
        super().__post_init__()
        for field in ("num_keys", "num_values", "num_queries"):
            self._int(field, 1)
        if self._int("num_pairs", 1) > self.num_keys:
            raise ValueError(
                f"MQAR: `num_pairs` must be ≤ `num_keys` ({self.num_keys}: the keys of an "
                f"example are distinct); got {self.num_pairs}"
            )

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    @property
    def length(self) -> int:
        return 2 * self.num_pairs + self.num_queries

    def build(self, rng):
        keys = rng.choice(self.num_keys, self.num_pairs, replace=False)
        values = self.num_keys + rng.integers(0, self.num_values, self.num_pairs)
        asked = rng.integers(0, self.num_pairs, self.num_queries)
        context = np.stack([keys, values], 1).reshape(-1)
        inputs = np.concatenate([context, keys[asked]])
        targets = np.concatenate([np.zeros_like(context), values[asked]])
        mask = np.concatenate([np.zeros(context.size), np.ones(self.num_queries)])
        return _example(inputs, targets, mask)


@dataclasses.dataclass(frozen=True)
class Parity(Task):
    """Bits ``b_1 … b_n`` (n uniform in ``[min_length, max_length]``, padded with
    ``PAD = 2``); the target at position t is ``b_1 ⊕ … ⊕ b_t``."""

    min_length: int = 3
    max_length: int = 40
    name: ClassVar[str] = "parity"
    PAD: ClassVar[int] = 2

    def __post_init__(self):
        super().__post_init__()
        self._lengths()

    @property
    def vocab_size(self) -> int:
        return 3

    @property
    def length(self) -> int:
        return self.max_length

    def build(self, rng):
        n = int(rng.integers(self.min_length, self.max_length + 1))
        bits = rng.integers(0, 2, n)
        pad = self.max_length - n
        return _example(
            np.concatenate([bits, np.full(pad, self.PAD)]),
            np.concatenate([np.cumsum(bits) % 2, np.zeros(pad)]),
            np.concatenate([np.ones(n), np.zeros(pad)]),
        )


@dataclasses.dataclass(frozen=True)
class ModularArithmetic(Task):
    """An expression over ``{0, …, modulus−1}`` with ``+ − ×`` (usual precedence),
    ``num_operands`` operands (uniform in ``[min_operands, num_operands]`` when
    ``min_operands`` is set), and with ``brackets`` randomly nested parentheses,
    then ``=``; predict its value mod ``modulus`` at the ``=``. Ids: digits
    ``0 … m−1``, then ``+ − × ( ) = PAD``."""

    modulus: int = 5
    num_operands: int = 8
    brackets: bool = False
    min_operands: int | None = None
    name: ClassVar[str] = "modular_arithmetic"
    SYMBOLS: ClassVar[tuple[str, ...]] = ("+", "-", "*", "(", ")", "=", "PAD")

    @property
    def vocab_size(self) -> int:
        return self.modulus + len(self.SYMBOLS)

    @property
    def length(self) -> int:
        # operands + operators + at most a bracket pair per operand + "="
        return 2 * self.num_operands + (2 * self.num_operands if self.brackets else 0)

    def __post_init__(self):
        super().__post_init__()
        self._int("modulus", 2)
        self._int("num_operands", 1)
        if not isinstance(self.brackets, bool):
            raise TypeError(f"ModularArithmetic: `brackets` must be a bool; got {self.brackets!r}")
        if self.min_operands is not None:
            self._int("min_operands", 1, self.num_operands)

    def symbol(self, text: str) -> int:
        return self.modulus + self.SYMBOLS.index(text)

    def _expression(self, rng, operands: int) -> list[str]:
        if operands == 1:
            return [str(int(rng.integers(0, self.modulus)))]
        left = int(rng.integers(1, operands))
        tokens = (
            self._expression(rng, left)
            + [str(rng.choice(["+", "-", "*"]))]
            + self._expression(rng, operands - left)
        )
        if self.brackets and rng.random() < 0.5:
            tokens = ["("] + tokens + [")"]
        return tokens

    def build(self, rng):
        operands = (
            self.num_operands
            if self.min_operands is None
            else int(rng.integers(self.min_operands, self.num_operands + 1))
        )
        if self.brackets:
            tokens = self._expression(rng, operands)
        else:
            digits = rng.integers(0, self.modulus, operands)
            ops = rng.choice(["+", "-", "*"], operands - 1)
            tokens = [str(digits[0])] + [
                t for pair in zip(ops, digits[1:]) for t in (str(pair[0]), str(pair[1]))
            ]
        value = evaluate_arithmetic(tokens, self.modulus)
        ids = [int(t) if t.isdigit() else self.symbol(t) for t in tokens] + [self.symbol("=")]
        return _labelled_at_end(ids, value, self.length, self.symbol("PAD"))


def evaluate_arithmetic(tokens: list[str], modulus: int) -> int:
    """Value mod ``modulus`` of an infix expression (precedence ``×`` over ``+ −``,
    left to right, brackets), by recursive descent."""
    position = 0

    def atom() -> int:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "(":
            value = expression()
            position += 1  # ")"
            return value
        return int(token)

    def term() -> int:
        nonlocal position
        value = atom()
        while position < len(tokens) and tokens[position] == "*":
            position += 1
            value = value * atom() % modulus
        return value

    def expression() -> int:
        nonlocal position
        value = term()
        while position < len(tokens) and tokens[position] in "+-":
            sign = 1 if tokens[position] == "+" else -1
            position += 1
            value = (value + sign * term()) % modulus
        return value

    return expression() % modulus


#: The groups of :class:`WordProblem` and the size of the set they permute.
GROUPS: dict[str, int] = {"S3": 3, "A5": 5, "S5": 5}


@functools.cache
def group_elements(group: str) -> tuple[tuple[int, ...], ...]:
    """The permutations of ``S3``, ``S5`` or ``A5`` (even permutations), sorted
    (computed once per group)."""
    n = GROUPS.get(group) if isinstance(group, str) else None
    if n is None:
        raise ValueError(f"unknown group {group!r}; choose one of {list(GROUPS)}")
    perms = list(itertools.permutations(range(n)))
    if group == "A5":
        perms = [p for p in perms if _is_even(p)]
    return tuple(perms)


def _is_even(perm: tuple[int, ...]) -> bool:
    inversions = sum(
        1 for i in range(len(perm)) for j in range(i + 1, len(perm)) if perm[i] > perm[j]
    )
    return inversions % 2 == 0


def compose(first: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation ``x ↦ then(first(x))``."""
    return tuple(then[first[i]] for i in range(len(first)))


@dataclasses.dataclass(frozen=True)
class WordProblem(Task):
    """Group elements ``g_1 … g_n`` (ids index :func:`group_elements`); the target at
    position t is the id of ``g_t ∘ … ∘ g_1`` (apply ``g_1`` first). Lengths are
    uniform in ``[min_length, max_length]``, padded with ``PAD = |G|``."""

    group: str = "S3"
    min_length: int = 4
    max_length: int = 32
    name: ClassVar[str] = "word_problem"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.group, str) or self.group not in GROUPS:
            raise ValueError(
                f"WordProblem: `group` must be one of {list(GROUPS)}; got {self.group!r}"
            )
        self._lengths()

    @property
    def vocab_size(self) -> int:
        return len(group_elements(self.group)) + 1

    @property
    def length(self) -> int:
        return self.max_length

    def build(self, rng):
        elements = group_elements(self.group)
        table = _composition_table(self.group)
        n = int(rng.integers(self.min_length, self.max_length + 1))
        word = rng.integers(0, len(elements), n)
        targets, state = [], elements.index(tuple(range(len(elements[0]))))
        for g in word:
            state = table[state, g]
            targets.append(state)
        pad = self.max_length - n
        return _example(
            np.concatenate([word, np.full(pad, len(elements))]),
            np.concatenate([targets, np.zeros(pad)]),
            np.concatenate([np.ones(n), np.zeros(pad)]),
        )


_TABLES: dict[str, np.ndarray] = {}


def _composition_table(group: str) -> np.ndarray:
    """``table[a, b]`` = id of ``b ∘ a`` (``a`` applied first)."""
    if group not in _TABLES:
        elements = group_elements(group)
        index = {p: i for i, p in enumerate(elements)}
        _TABLES[group] = np.array([[index[compose(a, b)] for b in elements] for a in elements])
    return _TABLES[group]


@dataclasses.dataclass(frozen=True)
class ListOps(Task):
    """Long Range Arena's ListOps: a random nested expression such as
    ``[MAX 2 9 [MIN 4 7 ] 0 ]`` over digits with ``MAX``, ``MIN``, ``MED`` (the
    median, rounded down) and ``SM`` (sum mod 10); predict its value (0–9) at the
    last token. LRA's generator: an operator node with probability ``p_operator``
    (while below ``max_depth``), 2…``max_args`` arguments; expressions longer than
    ``max_length`` tokens are re-drawn. Ids: digits 0–9, ``[MAX [MIN [MED [SM ] PAD``."""

    max_depth: int = 10
    max_args: int = 10
    max_length: int = 512
    min_length: int = 16
    p_operator: float = 0.25
    name: ClassVar[str] = "listops"
    OPERATORS: ClassVar[tuple[str, ...]] = ("[MAX", "[MIN", "[MED", "[SM")

    def __post_init__(self):
        super().__post_init__()
        self._int("max_depth", 1, MAX_LISTOPS_DEPTH)
        self._int("max_args", 2)
        check_real("ListOps: `p_operator`", self.p_operator, low=0, high=1)
        self._lengths()
        # build() redraws until min_length ≤ tokens ≤ max_length: a range that no
        # expression of these settings reaches would loop forever
        shortest, longest = self._length_range()
        settings = (
            f"ListOps(max_depth={self.max_depth}, max_args={self.max_args}, "
            f"p_operator={self.p_operator})"
        )
        if self.max_length < shortest:
            raise ValueError(
                f"ListOps: `max_length` must be ≥ {shortest}, the fewest tokens an "
                f"expression of {settings} has; got {self.max_length}"
            )
        if self.min_length > longest:
            raise ValueError(
                f"ListOps: `min_length` must be ≤ {longest}, the most tokens an "
                f"expression of {settings} has; got {self.min_length}"
            )

    def _length_range(self) -> tuple[int, int]:
        """The fewest and most tokens an expression can have: a node at depth d is an
        operator (``[OP``, 2…``max_args`` arguments, ``]``) always at d = 1, never at
        ``max_depth`` or deeper, and in between with probability ``p_operator``."""
        shortest = longest = 1  # a digit, the deepest node
        for depth in range(self.max_depth - 1, 0, -1):
            can = depth == 1 or self.p_operator > 0
            must = depth == 1 or self.p_operator >= 1
            longest = 2 + self.max_args * longest if can else 1
            shortest = 2 + 2 * shortest if must else 1
        if self.max_depth == 1:  # the root is an operator even then
            shortest, longest = 4, 2 + self.max_args
        return shortest, longest

    @property
    def vocab_size(self) -> int:
        return 10 + len(self.OPERATORS) + 2

    @property
    def length(self) -> int:
        return self.max_length

    def _tree(self, rng, depth: int):
        if (depth < self.max_depth and rng.random() < self.p_operator) or depth == 1:
            operator = self.OPERATORS[int(rng.integers(0, len(self.OPERATORS)))]
            count = int(rng.integers(2, self.max_args + 1))
            return (operator, [self._tree(rng, depth + 1) for _ in range(count)])
        return int(rng.integers(0, 10))

    def build(self, rng):
        while True:
            tokens = _flatten(self._tree(rng, 1))
            if self.min_length <= len(tokens) <= self.max_length:
                break
        value = _tree_value(_parse(tokens))
        ids = [self._id(t) for t in tokens]
        return _labelled_at_end(ids, value, self.max_length, self._id("PAD"))

    def _id(self, token) -> int:
        if isinstance(token, int):
            return token
        return 10 + (self.OPERATORS + ("]", "PAD")).index(token)


#: ListOps builds an expression recursively, one Python call per level.
MAX_LISTOPS_DEPTH = 256


def _flatten(tree) -> list:
    if isinstance(tree, int):
        return [tree]
    operator, args = tree
    return [operator] + [t for a in args for t in _flatten(a)] + ["]"]


def _parse(tokens: list):
    """Tokens → nested ``(operator, args)`` tree."""
    stack: list = [("ROOT", [])]
    for token in tokens:
        if token == "]":
            node = stack.pop()
            stack[-1][1].append(node)
        elif isinstance(token, str):
            stack.append((token, []))
        else:
            stack[-1][1].append(token)
    return stack[0][1][0]


def _tree_value(tree) -> int:
    if isinstance(tree, int):
        return tree
    operator, args = tree
    values = [_tree_value(a) for a in args]
    if operator == "[MAX":
        return max(values)
    if operator == "[MIN":
        return min(values)
    if operator == "[MED":
        return int(np.floor(np.median(values)))
    return sum(values) % 10


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (MQAR, Parity, ModularArithmetic, WordProblem, ListOps)
}
