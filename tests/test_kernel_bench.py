"""The kernel benchmark's device check (``experiments/bench/kernels.py``) on tiny settings:
``--device-check --smoke`` end to end on the CPU (the kernels run interpreted), the
budget's skip path and the targets' arithmetic. No time is checked."""

from __future__ import annotations

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # experiments/ lives in the repo, not the package
    from experiments.bench import kernels

    return kernels


@pytest.mark.slow
def test_device_check_smoke_writes_every_table(kernel_bench, tmp_path, capsys):
    argv = ["--device-check", "--smoke", "--out", str(tmp_path)]
    assert kernel_bench.main(argv) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["status"] == "complete"
    assert result["environment"]["device"] and result["environment"]["jax"]
    assert result["ceilings"]["matmul_tflops"] > 0 and result["ceilings"]["copy_tbps"] > 0

    # a correctness row per op and shape (the odd one included), with every gradient
    checks = result["correctness"]
    assert [(c["op"], c["shape"]["key"]) for c in checks] == [
        (op, key) for op in kernel_bench.OPS for key in (32, 20)
    ]
    for c in checks:
        gate = "dgk" if c["op"] == "gla" else "dg"
        expected = {"o", "state", "dq", "dk", "dv", gate, "dh0"}
        expected |= {"dbeta"} if c["op"] == "gated_delta_rule" else set()
        assert not c["error"] and set(c["errors"]) == expected
        assert all(value is not None for value in c["errors"].values())
        # interpret mode computes in full float32 on the CPU: the kernels equal XLA's form
        assert max(c["errors"].values()) <= 1e-5, c["errors"]

    # a timing row per op and implementation, plus flash attention (no cuDNN here)
    rows = {(t["op"], t["impl"]): t for t in result["timings"]}
    assert set(rows) == {(op, impl) for op in kernel_bench.OPS for impl in kernel_bench.IMPLS} | {
        ("flash_attention", "cudnn")
    }
    for op in kernel_bench.OPS:
        for impl in ("pallas", "xla"):
            row = rows[op, impl]
            assert row["fwd"]["ms"] > 0 and row["fwd_bwd"]["ms"] > 0 and row["fwd"]["runs"] == 1
        assert rows[op, "fla"]["note"]  # not installed here, or no CUDA device
    assert rows["flash_attention", "cudnn"]["fwd"] is None
    assert len(result["targets"]) == 10

    report = (tmp_path / "kernels.md").read_text()
    for heading in ("## Ceilings", "## Correctness", "## Timings"):
        assert heading in report
    assert "| gated_delta_rule | B=2 T=37 H=3 K=20 V=12 |" in report
    assert "| 1 | 64 | gla | pallas |" in report
    assert (tmp_path / "kernels.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert out.rindex("| target | measured | result |") > out.rindex("| B | T | op | impl |")


def test_spent_budget_skips_the_rest_and_leaves_the_tables(kernel_bench, tmp_path):
    argv = ["--device-check", "--smoke", "--no-fla", "--no-plot", "--budget", "0"]
    assert kernel_bench.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["status"] == "complete"
    assert all(c["error"] == "skipped: total budget spent" for c in result["correctness"])
    assert len(result["correctness"]) == 6 and len(result["timings"]) == 10
    assert all("skipped" in t["note"] and t["fwd"] is None for t in result["timings"])
    assert "skipped: total budget spent" in (tmp_path / "kernels.md").read_text()


def test_targets_compare_pallas_with_the_goals_flash_and_fla(kernel_bench):
    Cell, Timing = kernel_bench.Cell, kernel_bench.Timing
    ms = lambda value: Timing(value, 20, 1, 1.0)
    cells = [
        Cell("simple_gla", "pallas", 1, 8192, ms(0.25), ms(1.2)),
        Cell("simple_gla", "fla", 1, 8192, ms(0.2), ms(1.0)),
        Cell("gla", "pallas", 1, 8192, ms(0.5), ms(1.5)),
        Cell("gla", "pallas", 1, 2048, ms(0.2), ms(0.6)),
        Cell("flash_attention", "cudnn", 1, 8192, ms(1.0), ms(3.0)),
        Cell("flash_attention", "cudnn", 1, 2048, ms(0.1), ms(0.5)),
    ]
    rows = {row["target"]: row for row in kernel_bench.targets(cells, fla_patched=True)}
    assert rows["simple_gla fwd ≤ 0.3 ms (B=1, T=8192)"]["passed"] is True
    assert rows["simple_gla fwd+bwd ≤ 1.0 ms (B=1, T=8192)"]["passed"] is False
    assert rows["gla fwd+bwd ≤ 2.0 ms (B=1, T=8192)"]["passed"] is True
    assert rows["gated_delta_rule fwd+bwd ≤ 1.5 ms (B=1, T=8192)"]["passed"] is None
    flash = rows["gla fwd+bwd faster than flash attention, T ≥ 2048"]
    assert flash["passed"] is False and "0.83×" in flash["measured"]  # 0.5 / 0.6 at T=2K
    fla = rows["simple_gla within 1.3× of fla"]
    assert fla["passed"] is True and "1.25×" in fla["measured"] and "#640" in fla["measured"]
    assert rows["gla within 1.3× of fla"]["passed"] is None
