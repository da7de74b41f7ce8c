"""Negative eigenvalues and state tracking (Grazzi et al. 2025, "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues").

    python -m experiments.parity                # parity and modular arithmetic, 3 seeds
    python -m experiments.parity --quick        # one seed, few steps: a smoke run

DeltaNet and a diagonal gated RNN (``diag_rnn``), each with transitions whose
eigenvalues lie in ``[0, 1]`` (β = σ, a = σ) or in ``[−1, 1]`` (β = 2σ, a = 2σ − 1),
are trained on

- **parity**: the running parity of bit strings of length 3–40, scored on strings of
  length 256 (the accuracy at prefix lengths 41–256 is the extrapolation figure);
- **modular arithmetic without brackets**: ``a ∘ b ∘ … =`` over Z₅ with ``+ − ×``,
  2–10 operands in training, 11–20 operands in the test.

The paper's claim: only the ``[−1, 1]`` variants solve parity and extrapolate.
Writes ``parity.md``, ``parity.png`` and ``parity.jsonl`` (every run, resumable) to
``experiments/results/``.
"""

from __future__ import annotations

import argparse
import pathlib

from experiments import report
from experiments.harness import ModelSpec, ResultStore, Run, mean_over, run_all, small_lm
from xformjax.data import ModularArithmetic, Parity
from xformjax.train.config import TrainConfig

MODELS = (
    ModelSpec("DeltaNet [0, 1]", "deltanet", {"allow_neg_eigval": False}),
    ModelSpec("DeltaNet [−1, 1]", "deltanet", {"allow_neg_eigval": True}),
    ModelSpec("diagonal RNN [0, 1]", "diag_rnn", {"allow_neg_eigval": False}),
    ModelSpec("diagonal RNN [−1, 1]", "diag_rnn", {"allow_neg_eigval": True}),
)
TRAIN_LENGTH, TEST_LENGTH = 40, 256
TRAIN_OPERANDS, TEST_OPERANDS = 10, 20


def parity_tasks(seed: int):
    return (
        Parity(seed=seed, min_length=3, max_length=TRAIN_LENGTH),
        {"length 256": Parity(seed=10_000 + seed, min_length=TEST_LENGTH, max_length=TEST_LENGTH)},
    )


def arithmetic_tasks(seed: int):
    return (
        ModularArithmetic(seed=seed, modulus=5, num_operands=TRAIN_OPERANDS, min_operands=2),
        {
            "in distribution": ModularArithmetic(
                seed=10_000 + seed, modulus=5, num_operands=TRAIN_OPERANDS, min_operands=2
            ),
            "11–20 operands": ModularArithmetic(
                seed=20_000 + seed,
                modulus=5,
                num_operands=TEST_OPERANDS,
                min_operands=TRAIN_OPERANDS + 1,
            ),
        },
    )


def make_runs(seeds: list[int], steps: int, tasks: list[str]) -> list[Run]:
    runs = []
    builders = {"parity": parity_tasks, "arithmetic": arithmetic_tasks}
    for task_name in tasks:
        for spec in MODELS:
            for seed in seeds:
                task, tests = builders[task_name](seed)
                train = TrainConfig(
                    steps=steps,
                    batch_size=32,
                    learning_rate=3e-3,
                    warmup_steps=min(100, steps // 10),
                    weight_decay=0.01,
                    seed=seed,
                )
                runs.append(
                    Run(
                        f"{task_name}|{spec.label}|seed {seed}|{steps} steps",
                        spec.config(small_lm(), task.vocab_size),
                        train,
                        task,
                        tests,
                    )
                )
    return runs


def summarise(records: list[dict], steps: int) -> tuple[list[str], dict]:
    lines = report.header("Negative eigenvalues and state tracking")
    lines += [
        f"Two-layer models (d_model 64, 2 heads, a short convolution, SwiGLU MLPs), "
        f"{steps} AdamW steps of 32 sequences, lr 3e-3; "
        "mean ± std over seeds (min–max in brackets), accuracy in %.",
        "",
    ]
    by = {}
    for record in records:
        task, label, *_ = record["name"].split("|")
        by.setdefault((task, label), []).append(record)
    if any(task == "parity" for task, _ in by):
        lines += [
            "## Parity",
            "",
            f"Trained on lengths 3–{TRAIN_LENGTH}; tested on "
            f"{TEST_LENGTH}-bit strings, scored at every prefix (chance: 50 %).",
            "",
        ]
        spans = (
            range(1, TRAIN_LENGTH + 1),
            range(TRAIN_LENGTH + 1, TEST_LENGTH + 1),
            range(TEST_LENGTH, TEST_LENGTH + 1),
        )
        rows = [
            report.prefix_row(label, group, "length 256", spans)
            for (task, label), group in by.items()
            if task == "parity"
        ]
        lines += report.table(
            [
                "model",
                "seeds",
                "train acc (last 10 %)",
                "prefixes 1–40",
                "prefixes 41–256",
                "at 256",
            ],
            rows,
        ) + [""]
    if any(task == "arithmetic" for task, _ in by):
        lines += [
            "## Modular arithmetic without brackets",
            "",
            f"Z₅, `+ − ×` with precedence; trained on 2–{TRAIN_OPERANDS} operands, "
            f"tested on 2–{TRAIN_OPERANDS} and on {TRAIN_OPERANDS + 1}–{TEST_OPERANDS} "
            "operands (chance: 20 %).",
            "",
        ]
        rows = []
        for (task, label), group in by.items():
            if task != "arithmetic":
                continue
            rows.append(
                [
                    label,
                    str(len(group)),
                    report.mean_and_spread([g["train_accuracy"] for g in group]),
                ]
                + [
                    report.mean_and_spread([_overall(g["tests"][name]) for g in group])
                    for name in ("in distribution", "11–20 operands")
                ]
            )
        lines += report.table(
            ["model", "seeds", "train acc", "test, 2–10 operands", "test, 11–20 operands"], rows
        ) + [""]
    return lines, by


def _overall(curve) -> float:
    """Arithmetic scores one position per example (the ``=``): the mean over the
    expression lengths, each length weighted equally."""
    return mean_over(curve, range(1, len(curve) + 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument(
        "--tasks", nargs="+", default=["parity", "arithmetic"], choices=["parity", "arithmetic"]
    )
    parser.add_argument("--quick", action="store_true", help="one seed, 60 steps")
    parser.add_argument("--out", type=pathlib.Path, default=report.RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 60
    store = ResultStore(args.out / "parity.jsonl")
    records = run_all(
        make_runs(args.seeds, args.steps, args.tasks), store, progress=not args.no_progress
    )
    lines, by = summarise(records, args.steps)
    parity_curves = {
        label: [g["tests"]["length 256"] for g in group]
        for (task, label), group in by.items()
        if task == "parity"
    }
    if parity_curves:
        report.accuracy_plot(
            parity_curves,
            args.out / "parity.png",
            train_length=TRAIN_LENGTH,
            title="Parity: accuracy at each prefix of 256-bit strings",
        )
        lines += ["![parity](parity.png)", ""]
    (args.out / "parity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
