"""Every field of every synthetic task is checked when the task is built (issue 24):
a wrong type raises ``TypeError``, a value that could not make an example
``ValueError`` naming the task, the field, what was expected and what was given."""

from __future__ import annotations

import dataclasses
import re

import pytest

from xformjax import data

BAD_VALUES = [
    (data.MQAR, {"num_pairs": 0}, "MQAR: `num_pairs` must be ≥ 1; got 0"),
    (
        data.MQAR,
        {"num_pairs": 9, "num_keys": 8},
        "MQAR: `num_pairs` must be ≤ `num_keys` (8: the keys of an example are distinct); got 9",
    ),
    (data.MQAR, {"num_queries": 0}, "MQAR: `num_queries` must be ≥ 1; got 0"),
    (data.MQAR, {"num_keys": -2}, "MQAR: `num_keys` must be ≥ 1; got -2"),
    (data.MQAR, {"num_values": 0}, "MQAR: `num_values` must be ≥ 1; got 0"),
    (data.MQAR, {"seed": -1}, "MQAR: `seed` must be ≥ 0; got -1"),
    (data.MQAR, {"num_examples": 0}, "MQAR: `num_examples` must be ≥ 1; got 0"),
    (
        data.Parity,
        {"min_length": 5, "max_length": 3},
        "Parity: `max_length` must be ≥ `min_length` (5); got 3",
    ),
    (data.Parity, {"min_length": 0}, "Parity: `min_length` must be ≥ 1; got 0"),
    (data.ModularArithmetic, {"modulus": 1}, "ModularArithmetic: `modulus` must be ≥ 2; got 1"),
    (
        data.ModularArithmetic,
        {"num_operands": 0},
        "ModularArithmetic: `num_operands` must be ≥ 1; got 0",
    ),
    (
        data.ModularArithmetic,
        {"num_operands": 4, "min_operands": 5},
        "ModularArithmetic: `min_operands` must be in [1, 4]; got 5",
    ),
    (
        data.WordProblem,
        {"group": "S4"},
        "WordProblem: `group` must be one of ['S3', 'A5', 'S5']; got 'S4'",
    ),
    (
        data.WordProblem,
        {"min_length": 9, "max_length": 8},
        "WordProblem: `max_length` must be ≥ `min_length` (9); got 8",
    ),
    (data.ListOps, {"max_depth": 0}, "ListOps: `max_depth` must be in [1, 256]; got 0"),
    (data.ListOps, {"max_args": 1}, "ListOps: `max_args` must be ≥ 2; got 1"),
    (
        data.ListOps,
        {"p_operator": float("nan")},
        "ListOps: `p_operator` must be finite and in [0, 1]; got nan",
    ),
    (data.ListOps, {"p_operator": 1.5}, "ListOps: `p_operator` must be finite and in [0, 1]"),
    (
        data.ListOps,
        {"min_length": 40, "max_length": 30},
        "ListOps: `max_length` must be ≥ `min_length` (40); got 30",
    ),
    # the shortest expression is an operator with two digits: [MAX 1 2 ] (4 tokens)
    (
        data.ListOps,
        {"min_length": 1, "max_length": 3},
        "ListOps: `max_length` must be ≥ 4, the fewest tokens an expression of "
        "ListOps(max_depth=10, max_args=10, p_operator=0.25) has; got 3",
    ),
    # depth 1: only the root operator, at most 2 + max_args tokens
    (
        data.ListOps,
        {"max_depth": 1, "max_args": 4, "min_length": 7},
        "ListOps: `min_length` must be ≤ 6, the most tokens an expression of "
        "ListOps(max_depth=1, max_args=4, p_operator=0.25) has; got 7",
    ),
    # p_operator 1: every node above max_depth is an operator: 2 + 2·(2 + 2·1) = 10 at least
    (
        data.ListOps,
        {"max_depth": 3, "max_args": 2, "p_operator": 1.0, "min_length": 1, "max_length": 9},
        "ListOps: `max_length` must be ≥ 10, the fewest tokens",
    ),
]


@pytest.mark.parametrize(
    "task,options,message", BAD_VALUES, ids=[f"{t.__name__}-{o}" for t, o, _ in BAD_VALUES]
)
def test_a_bad_value_is_a_value_error_naming_the_field(task, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        task(**options)


@pytest.mark.parametrize("task", list(data.TASKS.values()), ids=list(data.TASKS))
def test_every_field_rejects_a_wrong_type(task):
    fields = [f.name for f in dataclasses.fields(task)]
    assert len(fields) >= 4
    for field in fields:
        error = ValueError if field == "group" else TypeError
        with pytest.raises(error, match=re.escape(f"{task.__name__}: `{field}` must be")):
            task(**{field: [1]})
    # a bool is not a count
    with pytest.raises(TypeError, match=re.escape("`num_examples` must be an integer; got True")):
        task(num_examples=True)


def test_the_limits_themselves_are_accepted_and_build_examples():
    edge = [
        data.MQAR(num_pairs=8, num_keys=8, num_queries=1, num_values=1),
        data.Parity(min_length=1, max_length=1),
        data.ModularArithmetic(modulus=2, num_operands=1),
        data.ModularArithmetic(num_operands=3, min_operands=3),
        data.WordProblem(group="A5", min_length=1, max_length=1),
        data.ListOps(max_depth=1, max_args=2, min_length=4, max_length=4),
        data.ListOps(max_depth=3, max_args=2, p_operator=1.0, min_length=10, max_length=10),
        data.ListOps(p_operator=0.0, max_args=2, min_length=4, max_length=4, seed=0),
    ]
    for task in edge:
        example = task[0]
        assert example["inputs"].shape == (task.length,), task
        assert example["mask"].sum() >= 1, task
    # the only expressions of 10 tokens with max_args 2, depth 3, p 1: [OP [OP d d ] [OP d d ] ]
    ids = edge[6][0]["inputs"].tolist()
    operators, closes, digits = [0, 1, 5], [4, 8, 9], [2, 3, 6, 7]
    assert all(10 <= ids[i] <= 13 for i in operators), ids  # [MAX [MIN [MED [SM
    assert all(ids[i] == 14 for i in closes) and all(ids[i] <= 9 for i in digits), ids
