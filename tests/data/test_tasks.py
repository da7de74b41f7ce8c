"""Synthetic tasks: deterministic per seed, and their labels checked by brute force."""

from __future__ import annotations

import numpy as np
import pytest

from xformjax import data

TASKS = {
    "mqar": data.MQAR(num_pairs=6, num_queries=5, num_keys=10, num_values=7),
    "parity": data.Parity(min_length=1, max_length=25),
    "modular": data.ModularArithmetic(modulus=7, num_operands=6),
    "modular-brackets": data.ModularArithmetic(modulus=5, num_operands=7, brackets=True),
    "S3": data.WordProblem(group="S3"),
    "A5": data.WordProblem(group="A5", max_length=20),
    "S5": data.WordProblem(group="S5", max_length=20),
    "listops": data.ListOps(max_length=200, min_length=5),
}


@pytest.mark.parametrize("name", TASKS)
def test_examples_are_deterministic_fixed_length_and_in_vocabulary(name):
    task = TASKS[name]
    first = [task[i] for i in range(20)]
    again = [type(task)(**{**task.__dict__})[i] for i in range(20)]
    other = [type(task)(**{**task.__dict__, "seed": 1})[i] for i in range(20)]
    for a, b in zip(first, again):
        for key in ("inputs", "targets", "mask"):
            assert np.array_equal(a[key], b[key])
    assert any(not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other))
    for example in first:
        shapes = {k: v.shape for k, v in example.items()}
        assert shapes == dict.fromkeys(("inputs", "targets", "mask"), (task.length,))
        assert example["inputs"].max() < task.vocab_size and example["inputs"].min() >= 0
        assert example["targets"].max() < task.vocab_size
        assert example["mask"].sum() >= 1
    with pytest.raises(IndexError):
        task[len(task)]


def test_mqar_answers_are_the_values_of_the_queried_keys():
    task = TASKS["mqar"]
    for i in range(50):
        ex = task[i]
        context = ex["inputs"][:12]
        pairs = dict(zip(context[0::2].tolist(), context[1::2].tolist()))
        assert len(pairs) == 6 and all(k < 10 <= v < 17 for k, v in pairs.items())
        for position in np.flatnonzero(ex["mask"]):
            assert ex["targets"][position] == pairs[int(ex["inputs"][position])]


def test_parity_labels_are_running_xors():
    task = TASKS["parity"]
    for i in range(50):
        ex = task[i]
        n = int(ex["mask"].sum())
        assert np.all(ex["inputs"][n:] == data.Parity.PAD)
        running = 0
        for t in range(n):
            running ^= int(ex["inputs"][t])
            assert ex["targets"][t] == running


@pytest.mark.parametrize("name", ["modular", "modular-brackets"])
def test_modular_arithmetic_labels_match_python_eval(name):
    task = TASKS[name]
    symbols = {task.symbol(s): s for s in task.SYMBOLS}
    saw_brackets = False
    for i in range(100):
        ex = task[i]
        tokens = [symbols.get(int(t), str(int(t))) for t in ex["inputs"]]
        expression = "".join(tokens[: tokens.index("=")])
        saw_brackets |= "(" in expression
        position = int(np.flatnonzero(ex["mask"])[0])
        assert tokens[position] == "="
        assert ex["targets"][position] == eval(expression) % task.modulus, expression
    assert saw_brackets == task.brackets


@pytest.mark.parametrize("group,order", [("S3", 6), ("A5", 60), ("S5", 120)])
def test_word_problem_labels_are_running_products(group, order):
    task = TASKS[group]
    elements = [np.array(p) for p in data.group_elements(group)]
    assert len(elements) == order and task.vocab_size == order + 1
    for i in range(30):
        ex = task[i]
        state = np.arange(len(elements[0]))
        for t in range(int(ex["mask"].sum())):
            state = elements[ex["inputs"][t]][state]  # apply the new element last
            assert np.array_equal(elements[ex["targets"][t]], state)


def test_listops_labels_match_an_independent_evaluator():
    task = TASKS["listops"]
    names = {10: "max(", 11: "min(", 12: "med(", 13: "sm(", 14: ")"}
    helpers = {
        "max": lambda *a: max(a),
        "min": lambda *a: min(a),
        "med": lambda *a: int(np.floor(np.median(a))),
        "sm": lambda *a: sum(a) % 10,
    }
    operators = set()
    for i in range(100):
        ex = task[i]
        last = int(np.flatnonzero(ex["mask"])[0])
        parts = [names.get(int(t), str(int(t))) for t in ex["inputs"][: last + 1]]
        operators.update(p for p in parts if p.endswith("("))
        expression = ",".join(parts).replace("(,", "(").replace(",)", ")")
        assert ex["targets"][last] == eval(expression, helpers), expression
        assert np.all(ex["inputs"][last + 1 :] == 15)
    assert operators == {"max(", "min(", "med(", "sm("}


def test_task_errors():
    with pytest.raises(ValueError, match="`group` must be one of \\['S3', 'A5', 'S5'\\]; got 'S4'"):
        data.WordProblem(group="S4")
    with pytest.raises(ValueError, match="`num_pairs` must be ≤ `num_keys` \\(8: the keys"):
        data.MQAR(num_pairs=9, num_keys=8)


def test_task_batches_through_grain():
    task = data.WordProblem(group="S3", max_length=12)
    dataset = data.task_dataset(task, batch_size=5, seed=3)
    iterator = iter(dataset)
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for batch in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], batch[k]) for k in batch)
    assert expected[0]["inputs"].shape == (5, 12)
    assert next(iter(dataset))["inputs"].dtype == np.int32
