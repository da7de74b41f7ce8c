"""The benchmark suite's harness on tiny settings: the op and layer benchmarks' tables,
the layer summary, and the suite's command line (no timing is checked)."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import pytest

from xformjax.train import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def layers(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments/ lives in the repo, not the package
    from experiments.bench import layers

    return layers


@pytest.fixture
def op_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments.bench import ops

    return ops


def test_op_benchmark_runs_every_form_of_the_chosen_ops(op_bench, tmp_path):
    assert (
        op_bench.main(
            [
                "--ops",
                "delta_product",
                "--lengths",
                "64",
                "--repeats",
                "1",
                "--sample-seconds",
                "0",
                "--no-hugepages",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "ops.json").read_text())
    assert {(r["op"], r["mode"]) for r in result["rows"]} == {
        ("delta_product", mode) for mode in ("chunk", "recurrent", "parallel")
    }
    assert all(r["length"] == 64 and r["backward_ms"] > 0 for r in result["rows"])
    report = (tmp_path / "ops.md").read_text()
    assert "| delta_product | chunk | 64 |" in report
    assert "| delta_product | 64 / 64 | 1.00 |" in report  # the linearity table
    assert (tmp_path / "ops.png").stat().st_size > 0


def test_op_benchmark_inputs_follow_each_op(op_bench):
    q, k, v, gate, beta = op_bench.make_inputs("delta_product", 8)
    assert q.shape == (1, 8, 4, 64) and k.shape == v.shape == (1, 16, 4, 64)
    assert gate.shape == (1, 8, 4) and beta.shape == (1, 16, 4)
    assert abs(float(jnp.linalg.norm(k[0, 3, 1])) - 1) < 1e-6
    _, _, _, gk, _ = op_bench.make_inputs("delta_rule_gk", 8)
    assert gk.shape == (1, 8, 4, 64) and bool(jnp.all(gk < 0))


def test_layer_benchmark_writes_markdown_json_and_plot(layers, tmp_path):
    # --budget 0: each family runs T=64 and stops before T=128 (the time-budget path)
    assert (
        layers.main(
            [
                "--families",
                "linear_attn",
                "retnet",
                "--lengths",
                "64",
                "128",
                "--repeats",
                "1",
                "--sample-seconds",
                "0",
                "--budget",
                "0",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "layers.json").read_text())
    assert {r["family"] for r in result["rows"]} == {"linear_attn", "retnet"}
    assert all(r["length"] == 64 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert [(s["family"], s["length"], s["kind"]) for s in result["stops"]] == [
        ("linear_attn", 128, "time"),
        ("retnet", 128, "time"),
    ]
    assert result["machine"]["cores"] and result["machine"]["jax"]
    report = (tmp_path / "layers.md").read_text()
    assert "| linear_attn | " in report and "stop (time)" in report
    assert (tmp_path / "layers.png").stat().st_size > 0


def test_decode_benchmark_writes_markdown_json_and_plot(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments.bench import decode

    argv = ["--quick", "--batches", "1", "--new-tokens", "3", "--repeats", "1"]
    argv += ["--sample-seconds", "0"]
    assert decode.main([*argv, "--no-hugepages", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert (row["batch"], row["prompt"], row["new_tokens"]) == (1, 8, 3)
    assert row["decode_tokens_per_s"] > 0 and row["first_s"] >= row["run_s"] > 0
    assert "| 1 | 8 | 3 |" in (tmp_path / "decode.md").read_text()
    assert (tmp_path / "decode.png").stat().st_size > 0


def test_depth_benchmark_writes_markdown_json_and_plot(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments.bench import depth

    shape = ["--pattern", "attn", "--d-model", "16", "--batch", "1", "--seq", "16"]
    argv = ["--layers", "1", "--remat-layers", "1", "--policies", "none", "full", *shape]
    assert depth.main([*argv, "--in-process", "--out", str(tmp_path)]) == 0
    points = json.loads((tmp_path / "depth.json").read_text())["points"]
    assert [(p["layers"], p["scan"], p["remat"]) for p in points] == [
        (1, False, "none"),
        (1, True, "none"),
        (1, True, "full"),
    ]
    assert all(p["kind"] == "point" and p["compile_s"] > 0 and p["temp_mib"] > 0 for p in points)
    assert points[0]["params"] == points[1]["params"]  # scanning does not change the model
    report = (tmp_path / "depth.md").read_text()
    assert "| 1 | True |" in report and "| full |" in report and "remat='full'" in report
    assert (tmp_path / "depth.png").stat().st_size > 0


def test_summary_is_filled_from_the_numbers(layers):
    rows = [
        layers.Row("attn", 1024, 100.0, 1.0, 0.1),
        layers.Row("attn", 2048, 400.0, 2.0, 0.1),
        layers.Row("lightning", 1024, 50.0, 1.0, 0.1),
        layers.Row("lightning", 2048, 100.0, 2.0, 0.1),
        layers.Row("lightning", 4096, 220.0, 4.0, 0.1),
    ]
    stops = [layers.Stop("attn", 4096, "time", "one step predicted at ~2 s")]
    text = layers.markdown(
        rows,
        stops,
        ["attn", "lightning"],
        [1024, 2048, 4096],
        {
            "date": "d",
            "cpu": "c",
            "cores": 2,
            "jax": "j",
            "backend": "cpu",
            "device": "cpu",
            "glibc_tunables": "",
        },
        budget_s=1.0,
    )
    assert "| attn (quadratic) | 10,240 | 5,120 | stop (time) | 0.50 (at 2K) |" in text
    assert "| lightning | 20,480 | 20,480 | 18,618 | 0.91 |" in text
    assert "Within 20 % of constant speed: `lightning`" in text
    assert "`attn` stops before 4K (time" in text
    assert "At 2K, `lightning` trains 4.0× as many tokens/s as `attn`." in text


def test_suite_help_and_the_installed_command_has_no_bench(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    from experiments.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"], prog="python -m experiments.bench")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m experiments.bench" in out and "--quick" in out and "--only" in out
    # the benchmarks live in the repository, not in the wheel: the command does not offer them
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--quick"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
