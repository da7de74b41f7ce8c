"""The reproductions' shared harness: training and per-position scoring, the
resumable result store, and the summaries' arithmetic."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os

import numpy as np
import pytest

from experiments import harness, report
from xformjax.data import ModularArithmetic, Parity
from xformjax.train.config import TrainConfig


def tiny_run(name: str, steps: int = 3) -> harness.Run:
    task = Parity(seed=0, min_length=3, max_length=8)
    spec = harness.ModelSpec("diag", "diag_rnn", {"allow_neg_eigval": True})
    model = spec.config(harness.small_lm(d_model=16, num_layers=1, chunk_size=4), task.vocab_size)
    return harness.Run(
        name,
        model,
        TrainConfig(steps=steps, batch_size=4, warmup_steps=1),
        task,
        {"long": Parity(seed=1, min_length=12, max_length=12)},
    )


def test_train_and_score_reports_accuracy_at_every_position(monkeypatch):
    monkeypatch.setattr(harness, "TEST_EXAMPLES", 8)
    record = harness.train_and_score(tiny_run("a"), progress=False)
    accuracy, counts = record["tests"]["long"], record["counts"]["long"]
    assert len(accuracy) == len(counts) == 12
    assert counts == [8] * 12  # every bit of a 12-bit string is scored
    assert all(0.0 <= a <= 1.0 for a in accuracy)
    assert record["finite"] and record["parameters"] > 0
    assert harness.overall_accuracy(record, "long") == pytest.approx(np.mean(accuracy))
    # what reproduces the run: settings, seed, steps, wall time, machine; all JSON
    config = json.loads(json.dumps(record))["config"]
    assert config["model"]["layer_pattern"] == "diag_rnn"
    assert config["model"]["mixer"]["allow_neg_eigval"] is True
    assert config["train"]["steps"] == record["steps"] == 3 and record["seed"] == 0
    assert config["task"] == {**config["task"], "kind": "Parity", "max_length": 8}
    assert config["tests"]["long"]["min_length"] == 12 and config["stopping"] is None
    assert record["machine"]["cores"] > 0 and record["train_seconds"] >= 0


def test_training_stops_at_the_target_or_a_plateau(monkeypatch):
    monkeypatch.setattr(harness, "TEST_EXAMPLES", 8)
    validation = Parity(seed=2, min_length=3, max_length=8)
    run = dataclasses.replace(tiny_run("a", steps=9), stopping=harness.Stopping(validation, 2))
    at_target = dataclasses.replace(
        run, stopping=dataclasses.replace(run.stopping, target=1e-9, examples=8)
    )
    record = harness.train_and_score(at_target, progress=False)
    assert (record["steps"], record["stopped"], len(record["validation"])) == (2, "target", 1)
    # the first validation is the best so far, the second cannot gain 1.0: a plateau
    plateau = dataclasses.replace(
        run, stopping=dataclasses.replace(run.stopping, patience=1, min_delta=1.0, examples=8)
    )
    record = harness.train_and_score(plateau, progress=False)
    assert (record["steps"], record["stopped"]) == (4, "plateau")
    assert [step for step, _ in record["validation"]] == [2, 4]
    assert all(0.0 <= score <= 1.0 for _, score in record["validation"])
    record = harness.train_and_score(tiny_run("b", steps=5), progress=False)
    assert (record["steps"], record["stopped"], record["validation"]) == (5, "cap", [])
    with pytest.raises(ValueError, match="patience"):
        harness.Stopping(validation, patience=0)


def test_mqar_keeps_each_models_best_rate_and_trains_the_other_seeds_there(tmp_path):
    from experiments import mqar

    grid = mqar.Grid((16,), (2,), (1e-3, 3e-3), (0, 1), cap=4, every=2)
    spec = mqar.MODELS[0]
    store = harness.ResultStore(tmp_path / "mqar.jsonl")
    table = mqar.run_grid([spec], grid, store, progress=False)
    rate, runs, by_rate = table[spec.label, 16, 2]
    assert set(by_rate) == {1e-3, 3e-3} and rate == mqar.choose_rate(by_rate)
    assert [r["name"] for r in runs] == [
        mqar.run_name(spec, 16, 2, rate, seed, 4) for seed in (0, 1)
    ]
    assert len(store.results) == 3  # two rates on seed 0, the chosen one on seed 1
    lines = mqar.summarise(table, grid)
    assert any(line.startswith("| softmax attention |") and f"@ {rate:g}" in line for line in lines)
    a = {"validation": [[2, 0.5], [4, 0.9]], "steps": 4}
    b = {"validation": [[2, 0.9]], "steps": 2}
    assert mqar.choose_rate({1e-3: a, 3e-3: b}) == 3e-3  # as good, in fewer steps


def test_mqar_stored_gathers_the_cells_whose_sweep_is_complete_and_names_the_rest(tmp_path):
    from experiments import mqar

    grid = mqar.Grid((16,), (2, 3), (1e-3, 3e-3), (0, 1), cap=4, every=2)
    spec = mqar.MODELS[0]
    store = harness.ResultStore(tmp_path / "mqar.jsonl")
    ran = mqar.run_grid([spec], dataclasses.replace(grid, pairs=(3,)), store, progress=False)
    table, missing = mqar.stored_table([spec], grid, harness.ResultStore(store.path))
    assert set(table) == {(spec.label, 16, 3)} and missing == {(16, 2): [spec.label]}
    assert [r["name"] for r in table[spec.label, 16, 3][1]] == [
        r["name"] for r in ran[spec.label, 16, 3][1]
    ]
    rate = table[spec.label, 16, 3][0]
    del store.results[mqar.run_name(spec, 16, 3, rate, 1, 4)]  # seed 1's repeat is owed
    table, _ = mqar.stored_table([spec], grid, store)
    assert len(table[spec.label, 16, 3][1]) == 1
    row = next(line for line in mqar.summarise(table, grid) if line.startswith("| softmax"))
    assert row.endswith(f"@ {rate:g}, 1 of 2 seeds |")
    assert mqar.output_name("grid") == "mqar_grid"
    assert mqar.output_name("default", [64], vocab=128) == "mqar_d64_vocab128"
    wide = dataclasses.replace(grid, vocab=40)
    run = mqar.make_run(spec, 16, 3, 1e-3, 0, wide)
    assert run.name == mqar.run_name(spec, 16, 3, 1e-3, 0, 4) + "|vocab 40"
    assert (run.task.num_keys, run.task.num_values, run.model.vocab_size) == (40, 40, 80)
    assert "40 keys and 40 values" in mqar.summarise(table, wide)[4]
    to_cap = mqar.make_run(spec, 16, 3, 1e-3, 0, dataclasses.replace(grid, plateau=False))
    assert to_cap.name == mqar.run_name(spec, 16, 3, 1e-3, 0, 4) + "|to cap"
    assert to_cap.stopping is not None and to_cap.stopping.min_steps == 4  # the cap
    assert mqar.output_name("full", plateau=False) == "mqar_full_to_cap"
    assert mqar.GRIDS["grid"].settings == mqar.GRIDS["full"].settings


def test_mqar_cross_keeps_each_width_at_the_middle_pairs_and_each_pairs_at_the_middle_width():
    from experiments import mqar

    cross = mqar.GRIDS["cross"]
    assert cross.settings == [(32, 8), (64, 4), (64, 8), (64, 16), (128, 8)]
    assert len(mqar.GRIDS["full"].settings) == 9
    assert (cross.learning_rates, cross.seeds) == ((3e-3,), (0,))
    assert mqar.output_name("default") == "mqar"
    assert mqar.output_name("cross") == "mqar_cross"
    assert mqar.output_name("default", [64], [16], ["attn"]) == "mqar_d64_pairs16_attn"
    assert mqar.output_name("full", [32, 64], None, ["attn", "a,b"]) == "mqar_full_d32-64_attn-a+b"
    assert mqar.output_name("default", no_conv=True) == "mqar_no_conv"
    assert [spec.mixer for spec in mqar.WITHOUT_CONV] == [{"conv_size": 0}] * 4
    assert mqar.output_name("default", with_conv=True) == "mqar_with_conv"
    assert [spec.layer_pattern for spec in mqar.WITH_CONV] == ["linear_attn", "retnet", "gla"]
    assert [spec.mixer for spec in mqar.WITH_CONV] == [{"short_conv": True}] * 3


def test_result_store_resumes_without_rerunning(tmp_path, monkeypatch):
    store = harness.ResultStore(tmp_path / "runs.jsonl")
    store.add({"name": "done", "tests": {}})
    trained = []
    monkeypatch.setattr(
        harness,
        "train_and_score",
        lambda run, progress: trained.append(run.name) or {"name": run.name},
    )
    records = harness.run_all([tiny_run("done"), tiny_run("new")], store, progress=False)
    assert trained == ["new"]
    assert [r["name"] for r in records] == ["done", "new"]
    reopened = harness.ResultStore(tmp_path / "runs.jsonl")
    assert "done" in reopened and "new" in reopened
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin two workers")
def test_run_all_with_two_workers_stores_what_one_worker_would(tmp_path):
    runs = [tiny_run("first", steps=4), tiny_run("second", steps=2)]
    store = harness.ResultStore(tmp_path / "runs.jsonl")
    records = harness.run_all(runs, store, progress=False, workers=2)
    assert [r["name"] for r in records] == ["first", "second"]
    assert [r["steps"] for r in records] == [4, 2] and all(r["workers"] == 2 for r in records)
    alone = harness.train_and_score(runs[1], progress=False)
    assert records[1]["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)
    assert records[1]["tests"] == alone["tests"]
    assert len(harness.ResultStore(store.path).results) == 2  # stored as they finish
    context = multiprocessing.get_context("spawn")
    cores = context.Queue()
    for core in sorted(os.sched_getaffinity(0))[:2]:
        cores.put(core)
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=context, initializer=harness._pin_to_a_core, initargs=(cores,)
    ) as pool:
        assert len(pool.submit(os.sched_getaffinity, 0).result()) == 1


def test_overall_accuracy_weights_positions_by_their_counts():
    record = {"tests": {"t": [1.0, None, 0.0]}, "counts": {"t": [3, 0, 1]}}
    assert harness.overall_accuracy(record, "t") == pytest.approx(0.75)
    assert harness.mean_over([1.0, None, 0.0], range(1, 4)) == pytest.approx(0.5)
    assert harness.mean_over([1.0, 0.5], range(1, 2)) == pytest.approx(1.0)


def test_mean_and_spread_formats_percentages():
    assert report.mean_and_spread([0.5]) == "50.0"
    assert report.mean_and_spread([0.5, 1.0]) == "75.0 ± 25.0 (50–100)"
    assert report.mean_and_spread([]) == "—"
    assert report.mean_and_spread([3.0, 3.1], percent=False) == "3.050 ± 0.050 (3.00–3.10)"


def test_modular_arithmetic_varies_the_operand_count():
    task = ModularArithmetic(seed=0, modulus=5, num_operands=6, min_operands=2)
    equals = task.symbol("=")
    lengths = {int(np.argmax(task[i]["inputs"] == equals)) for i in range(200)}
    assert lengths == {2 * n - 1 for n in range(2, 7)}  # n operands, n − 1 operators
    with pytest.raises(ValueError, match="min_operands"):
        ModularArithmetic(num_operands=4, min_operands=5)


def test_state_tracking_runs_validate_on_held_out_examples_with_a_cap():
    from experiments import deltaproduct, parity

    runs = parity.make_runs([0, 1], parity.BUDGETS["quick"], list(parity.TASKS))
    runs += deltaproduct.make_runs(["S3"], [0], deltaproduct.BUDGETS["quick"], (1, 2))
    assert len(runs) == 3 * 4 * 2 + 2 * 2
    assert len({run.name for run in runs}) == len(runs)
    for run in runs:
        assert run.stopping is not None and run.train.steps == 40
        assert run.stopping.min_steps == 20 and run.stopping.every == 20
        seeds = {run.task.seed, run.stopping.validation.seed, *(t.seed for t in run.tests.values())}
        assert len(seeds) >= 3  # training, validation and test data are disjoint
        assert run.stopping.validation.length == run.task.length  # in distribution
    brackets = [run for run in runs if run.name.startswith("brackets|")]
    assert brackets and all(run.task.brackets for run in brackets)


def test_steps_cell_gives_the_range_and_why_runs_stopped():
    records = [{"steps": 600, "stopped": "target"}, {"steps": 1500, "stopped": "cap"}]
    records.append({"steps": 900, "stopped": "target"})
    assert report.steps_cell(records) == "600–1500 (2 target, 1 cap)"
    assert report.steps_cell(records[:1]) == "600 (1 target)"


def test_deltaproduct_table_pools_every_householder_count_at_the_same_cap(tmp_path):
    from experiments import deltaproduct

    store = harness.ResultStore(tmp_path / "deltaproduct.jsonl")
    for name in (
        "S3|n_h=3 [0, 1]|seed 0|cap 50",
        "S3|n_h=1 [−1, 1]|seed 1|cap 50",
        "S3|n_h=1 [−1, 1]|seed 0|cap 50",
        "S3|n_h=1 [0, 1]|seed 0|cap 40",  # another cap: another table
        "S5|n_h=2 [0, 1]|seed 0|cap 50",  # a group not asked for
    ):
        store.add({"name": name})
    assert [r["name"] for r in deltaproduct.pooled(store, ["S3"], 50)] == [
        "S3|n_h=1 [−1, 1]|seed 0|cap 50",
        "S3|n_h=1 [−1, 1]|seed 1|cap 50",
        "S3|n_h=3 [0, 1]|seed 0|cap 50",
    ]


def test_parity_table_pools_every_task_at_its_cap(tmp_path):
    from experiments import parity

    store = harness.ResultStore(tmp_path / "parity.jsonl")
    budgets = parity.BUDGETS["quick"]
    for name in (
        "brackets|DeltaNet [0, 1]|seed 0|cap 40",
        "parity|diagonal RNN [0, 1]|seed 0|cap 40",
        "parity|DeltaNet [−1, 1]|seed 1|cap 40",
        "parity|DeltaNet [−1, 1]|seed 0|cap 40",
        "arithmetic|DeltaNet [0, 1]|seed 0|cap 9",  # another cap: another table
    ):
        store.add({"name": name})
    assert [r["name"] for r in parity.pooled(store, budgets)] == [
        "parity|DeltaNet [−1, 1]|seed 0|cap 40",
        "parity|DeltaNet [−1, 1]|seed 1|cap 40",
        "parity|diagonal RNN [0, 1]|seed 0|cap 40",
        "brackets|DeltaNet [0, 1]|seed 0|cap 40",
    ]


def test_language_model_table_pools_the_seeds_of_each_family(tmp_path):
    from experiments import language_model

    store = harness.ResultStore(tmp_path / "language_model.jsonl")
    sizes = {"d_model": 104, "parameters": 313_000, "train_tokens_per_second": 100.0}
    store.add({"name": "deltanet|seed 1|300 steps", "validation_bits_per_byte": 3.1, **sizes})
    store.add({"name": "attn|seed 0|300 steps", "validation_bits_per_byte": 3.4, **sizes})
    store.add({"name": "deltanet|seed 0|300 steps", "validation_bits_per_byte": 3.0, **sizes})
    store.add({"name": "titans|seed 0|300 steps", "diverged": "NaN at step 47; …", **sizes})
    store.add({"name": "attn|seed 0|20 steps", "validation_bits_per_byte": 5.0, **sizes})
    groups = language_model.pooled(store, 300)
    assert list(groups) == ["attn", "deltanet", "titans"]  # FAMILIES' order
    assert [r["name"] for r in groups["deltanet"]] == [
        "deltanet|seed 1|300 steps",
        "deltanet|seed 0|300 steps",
    ]
    assert language_model.row("deltanet", groups["deltanet"]) == [
        "deltanet", "104", "313K", "2", "3.000", "3.050 ± 0.050 (3.00–3.10)", "100",
    ]  # fmt: skip
    assert language_model.row("titans", groups["titans"])[4:] == [
        "—",
        "diverged: NaN at step 47",
        "—",
    ]
