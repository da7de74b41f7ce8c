"""Tables and plots for the reproductions: seeds aggregated, the machine named."""

from __future__ import annotations

import collections
import pathlib
import shlex
import sys
from collections.abc import Sequence

import numpy as np

from experiments.bench.ops import machine
from experiments.harness import mean_over

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """The command that is running, as one would type it."""
    module = pathlib.Path(sys.argv[0]).resolve()
    root = pathlib.Path(__file__).resolve().parents[1]
    name = (
        ".".join(module.relative_to(root).with_suffix("").parts)
        if module.is_relative_to(root)
        else module.name
    )
    return " ".join(["python", "-m", name, *map(shlex.quote, sys.argv[1:])])


def header(title: str) -> list[str]:
    info = machine()
    return [
        f"# {title}",
        "",
        f"`{command_line()}` — {info['date']}, {info['cpu']}, "
        f"{info['cores']} cores, jax {info['jax']} ({info['backend']}).",
        "",
    ]


def mean_and_spread(values: Sequence[float], *, percent: bool = True) -> str:
    """``mean ± std`` with the per-seed minimum and maximum: in percent to one
    decimal, or (``percent=False``, e.g. bits per byte) as is, to three."""
    values = np.asarray([v for v in values if np.isfinite(v)])
    scale, digits, range_digits = (100, 1, 0) if percent else (1, 3, 2)
    if values.size == 0:
        return "—"
    if values.size == 1:
        return f"{scale * values[0]:.{digits}f}"
    return (
        f"{scale * values.mean():.{digits}f} ± {scale * values.std():.{digits}f} "
        f"({scale * values.min():.{range_digits}f}–{scale * values.max():.{range_digits}f})"
    )


def prefix_row(label: str, records: Sequence[dict], test: str, spans: Sequence[range]) -> list[str]:
    """A table row: the label, the number of seeds, the training accuracy and, per
    span of 1-based positions, the mean accuracy of test ``test`` over that span
    (each aggregated over the seeds by :func:`mean_and_spread`)."""
    curves = [record["tests"][test] for record in records]
    return [
        label,
        str(len(records)),
        mean_and_spread([record["train_accuracy"] for record in records]),
    ] + [mean_and_spread([mean_over(curve, span) for curve in curves]) for span in spans]


def steps_cell(records: Sequence[dict]) -> str:
    """The steps the runs trained (the range over seeds) and why they stopped, e.g.
    ``600–1500 (2 target, 1 cap)``."""
    steps = [record["steps"] for record in records]
    reasons = collections.Counter(record.get("stopped", "cap") for record in records)
    span = f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}–{max(steps)}"
    return f"{span} ({', '.join(f'{n} {why}' for why, n in reasons.items())})"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def accuracy_plot(
    curves: dict[str, list[np.ndarray]],
    path: pathlib.Path,
    *,
    title: str,
    train_length: int | None = None,
    xlabel: str = "position (prefix length)",
) -> None:
    """Accuracy against position: each label's mean over seeds, the band min–max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in curves.items():
        stacked = np.asarray(
            [[np.nan if a is None else a for a in run] for run in runs], dtype=float
        )
        x = np.arange(1, stacked.shape[1] + 1)
        (line,) = ax.plot(x, np.nanmean(stacked, 0), label=label)
        if len(runs) > 1:
            ax.fill_between(
                x, np.nanmin(stacked, 0), np.nanmax(stacked, 0), alpha=0.15, color=line.get_color()
            )
    if train_length:
        ax.axvline(train_length, color="gray", ls="--", lw=1)
        ax.text(train_length, 0.02, " train length", color="gray", fontsize=8)
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
