"""Multi-query associative recall across the families (Zoology, Arora et al. 2023).

    python -m experiments.mqar             # 8 families × 2 widths × 2 numbers of pairs
    python -m experiments.mqar --quick     # 3 families, one setting, few steps

Each model reads ``k₁ v₁ … k_n v_n`` and then ``n`` of the keys again, and must
answer each with its value. The expected ordering: softmax attention ≥ the delta
rule and Mixture-of-Memories > gated diagonal decays (RetNet, GLA) > plain linear
attention, with the gap growing with the number of pairs and shrinking with the
width (a bigger state holds more pairs). Writes ``mqar.md``, ``mqar.png`` and
``mqar.jsonl`` (every run, resumable) to ``experiments/results/``.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from experiments import report
from experiments.harness import ModelSpec, ResultStore, Run, overall_accuracy, run_all, small_lm
from xformjax.data import MQAR
from xformjax.train.config import TrainConfig

MODELS = (
    ModelSpec("softmax attention", "attn"),
    ModelSpec("linear attention", "linear_attn"),
    ModelSpec("RetNet", "retnet"),
    ModelSpec("GLA", "gla"),
    ModelSpec("DeltaNet", "deltanet"),
    ModelSpec("gated DeltaNet", "gated_deltanet"),
    ModelSpec("MoM", "mom"),
    ModelSpec("Titans (MAL)", "titans"),
)
WIDTHS = (32, 64)
PAIRS = (6, 12)
VOCAB = 32  # keys and values each


def make_runs(models, widths, pairs, seeds, steps) -> list[Run]:
    runs = []
    for width in widths:
        for num_pairs in pairs:
            for spec in models:
                for seed in seeds:
                    task = MQAR(
                        seed=seed,
                        num_pairs=num_pairs,
                        num_queries=num_pairs,
                        num_keys=VOCAB,
                        num_values=VOCAB,
                    )
                    test = MQAR(
                        seed=10_000 + seed,
                        num_pairs=num_pairs,
                        num_queries=num_pairs,
                        num_keys=VOCAB,
                        num_values=VOCAB,
                    )
                    train = TrainConfig(
                        steps=steps,
                        batch_size=32,
                        learning_rate=5e-3,
                        warmup_steps=20,
                        weight_decay=0.01,
                        seed=seed,
                    )
                    model = spec.config(small_lm(d_model=width, chunk_size=8), task.vocab_size)
                    runs.append(
                        Run(
                            f"{spec.label}|d={width}|pairs={num_pairs}|seed {seed}|{steps} steps",
                            model,
                            train,
                            task,
                            {"test": test},
                        )
                    )
    return runs


def query_accuracy(record) -> float:
    return overall_accuracy(record, "test")


def summarise(records, steps) -> tuple[list[str], dict]:
    lines = report.header("Multi-query associative recall")
    lines += [
        f"Two-layer models, 2 heads, {steps} AdamW steps of 32 sequences, lr 5e-3; "
        f"{VOCAB} keys and {VOCAB} values, as many queries as pairs (chance "
        f"{100 / VOCAB:.1f} %). Query accuracy on 256 held-out sequences, in %.",
        "",
    ]
    table: dict = {}
    for record in records:
        label, width, pairs, *_ = record["name"].split("|")
        table.setdefault(label, {}).setdefault((width, pairs), []).append(record)
    settings = sorted(
        {key for cells in table.values() for key in cells},
        key=lambda k: (int(k[0][2:]), int(k[1][6:])),
    )

    def cell(runs) -> str:
        diverged = sum(not r["finite"] for r in runs)
        if diverged == len(runs) and runs:
            return "diverged (NaN loss)"
        text = report.mean_and_spread([query_accuracy(r) for r in runs if r["finite"]])
        return text + (f", {diverged} diverged" if diverged else "")

    rows = [
        [label] + [cell(cells.get(key, [])) for key in settings] for label, cells in table.items()
    ]
    lines += report.table(["model"] + [f"{w}, {p}" for w, p in settings], rows) + [""]
    return lines, table


def plot(table, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted(
        {key for cells in table.values() for key in cells},
        key=lambda k: (int(k[0][2:]), int(k[1][6:])),
    )
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / max(1, len(table))
    for i, (label, cells) in enumerate(table.items()):
        values = [
            np.mean([query_accuracy(r) for r in cells[k]]) if k in cells else np.nan
            for k in settings
        ]
        ax.bar(np.arange(len(settings)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, [f"{w}\n{p}" for w, p in settings])
    ax.set(ylabel="query accuracy", ylim=(0, 1.02), title="MQAR")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--pairs", type=int, nargs="+", default=list(PAIRS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--families", nargs="+", help="layer names to keep (default: all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=report.RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    models = [m for m in MODELS if not args.families or m.layer_pattern in args.families]
    if args.quick:
        models = [m for m in MODELS if m.layer_pattern in ("attn", "linear_attn", "deltanet")]
        args.widths, args.pairs, args.seeds, args.steps = [32], [6], [0], 60
    store = ResultStore(args.out / "mqar.jsonl")
    records = run_all(
        make_runs(models, args.widths, args.pairs, args.seeds, args.steps),
        store,
        progress=not args.no_progress,
    )
    lines, table = summarise(records, args.steps)
    plot(table, args.out / "mqar.png")
    lines += ["![mqar](mqar.png)", ""]
    (args.out / "mqar.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
