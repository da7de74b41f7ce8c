"""DeltaProduct on group word problems (Siems et al. 2025, "DeltaProduct: Improving
State-Tracking in Linear RNNs via Householder Products").

    python -m experiments.deltaproduct           # S3, A5, S5 × n_h ∈ {1, 2, 3} × β range
    python -m experiments.deltaproduct --quick   # S3 only, few steps: a smoke run

A DeltaProduct layer takes ``num_householder`` (n_h) delta-rule steps per token, so
its transition is a product of n_h generalised Householder matrices; with β in
``[0, 2]`` (``allow_neg_eigval``) each factor can be a reflection. The paper's
claims: more steps track harder groups (S3 needs n_h = 2 with negative eigenvalues,
S5 more), and the negative-eigenvalue variants extrapolate to longer words.
Models are trained on words of length 4–``TRAIN_LENGTH`` and scored at every
prefix of words of length ``TEST_LENGTH`` (the accuracy of the running product
after t elements). Writes ``deltaproduct.md``, a plot per group (``deltaproduct_S3.png`` …) and
``deltaproduct.jsonl`` (every run, resumable) to ``experiments/results/``.
"""

from __future__ import annotations

import argparse
import pathlib

from experiments import report
from experiments.harness import ModelSpec, ResultStore, Run, run_all, small_lm
from xformjax.data import WordProblem, group_elements
from xformjax.train.config import TrainConfig

TRAIN_LENGTH, TEST_LENGTH = 24, 96
GROUPS = ("S3", "A5", "S5")
# S3 is where the claim can be tested on a CPU budget; A5 and S5 get a short run
STEPS = {"S3": 2000, "A5": 600, "S5": 600}


def models(steps_per_token: tuple[int, ...]) -> list[ModelSpec]:
    return [
        ModelSpec(
            f"n_h={n} {'[−1, 1]' if negative else '[0, 1]'}",
            "deltaproduct",
            {"num_householder": n, "allow_neg_eigval": negative},
        )
        for n in steps_per_token
        for negative in (False, True)
    ]


def make_runs(groups, seeds, steps_by_group, steps_per_token) -> list[Run]:
    runs = []
    for group in groups:
        steps = steps_by_group[group]
        for spec in models(steps_per_token):
            for seed in seeds:
                task = WordProblem(seed=seed, group=group, min_length=4, max_length=TRAIN_LENGTH)
                test = WordProblem(
                    seed=10_000 + seed, group=group, min_length=TEST_LENGTH, max_length=TEST_LENGTH
                )
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
                        f"{group}|{spec.label}|seed {seed}|{steps} steps",
                        spec.config(small_lm(), task.vocab_size),
                        train,
                        task,
                        {"test": test},
                    )
                )
    return runs


def summarise(records, steps_by_group) -> tuple[list[str], dict]:
    lines = report.header("DeltaProduct: state tracking on group word problems")
    lines += [
        "Two-layer DeltaProduct models (d_model 64, 2 heads of 32, short "
        f"convolution), AdamW steps of 32 words of length 4–{TRAIN_LENGTH} (per "
        f"group below), lr 3e-3; scored on words of length {TEST_LENGTH} at every "
        "prefix. Accuracy in %, mean ± std over seeds (min–max) where there are "
        "several.",
        "",
    ]
    groups: dict = {}
    for record in records:
        group, label, *_ = record["name"].split("|")
        groups.setdefault(group, {}).setdefault(label, []).append(record)
    for group, by_label in groups.items():
        size = len(group_elements(group))
        lines += [
            f"## {group} ({size} elements, chance {100 / size:.1f} %), "
            f"{steps_by_group[group]} steps",
            "",
        ]
        spans = (
            range(1, TRAIN_LENGTH + 1),
            range(TRAIN_LENGTH + 1, 2 * TRAIN_LENGTH + 1),
            range(2 * TRAIN_LENGTH + 1, TEST_LENGTH + 1),
        )
        rows = [report.prefix_row(label, runs, "test", spans) for label, runs in by_label.items()]
        lines += report.table(
            [
                "model",
                "seeds",
                "train acc",
                f"prefixes 1–{TRAIN_LENGTH}",
                f"{TRAIN_LENGTH + 1}–{2 * TRAIN_LENGTH}",
                f"{2 * TRAIN_LENGTH + 1}–{TEST_LENGTH}",
            ],
            rows,
        ) + [""]
    return lines, groups


def _setting(name: str) -> tuple[str, ...]:
    """A run's name without its seed: ``(group, model, steps)``."""
    group, label, _, steps = name.split("|")
    return group, label, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--householder", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--steps", type=int, help=f"training steps of every group (default: {STEPS})"
    )
    parser.add_argument("--quick", action="store_true", help="S3, n_h ∈ {1, 2}, 60 steps")
    parser.add_argument("--out", type=pathlib.Path, default=report.RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.groups, args.householder, args.seeds, args.steps = ["S3"], [1, 2], [0], 60
    steps = {group: args.steps or STEPS[group] for group in args.groups}
    store = ResultStore(args.out / "deltaproduct.jsonl")
    records = run_all(
        make_runs(args.groups, args.seeds, steps, tuple(args.householder)),
        store,
        progress=not args.no_progress,
    )
    # the tables pool every seed in the store for the settings asked for, so extra
    # seeds of a few settings (--seeds 1 2 --groups S3 …) join the full table
    settings = {_setting(record["name"]) for record in records}
    pooled = [r for r in store.results.values() if _setting(r["name"]) in settings]
    pooled.sort(key=lambda r: GROUPS.index(_setting(r["name"])[0]))  # stable: S3, A5, S5
    lines, groups = summarise(pooled, steps)
    for group, by_label in groups.items():
        name = f"deltaproduct_{group}.png"
        report.accuracy_plot(
            {label: [r["tests"]["test"] for r in runs] for label, runs in by_label.items()},
            args.out / name,
            train_length=TRAIN_LENGTH,
            title=f"{group} word problem: accuracy at each prefix",
        )
        lines += [f"![{group}]({name})", ""]
    (args.out / "deltaproduct.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
