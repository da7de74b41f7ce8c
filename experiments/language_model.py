"""Byte-level language modelling on the standard-library corpus, every family at
(nearly) equal parameter count and equal steps.

    python -m experiments.language_model            # every family, 300 steps, seed 0
    python -m experiments.language_model --seeds 1 2 --families deltanet gated_deltanet
                                                    # more seeds; they join the table
    python -m experiments.language_model --quick    # three families, 20 steps

Each family's model has ``NUM_LAYERS`` layers of that mixer (and SwiGLU MLPs);
its width is the multiple of 8 whose parameter count comes closest to
``TARGET_PARAMETERS``, so the comparison is at equal size, not equal width. All
train with the same data order, schedule and steps through the library's
:class:`~xformjax.train.trainer.Trainer` (data: this Python's standard-library
sources, split by file). The table reports validation bits per byte. Writes
``language_model.md`` and ``language_model.jsonl`` (every run, resumable) to
``experiments/results/``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from collections.abc import Sequence

import jax
from flax import nnx

from experiments import report
from experiments.bench.ops import machine
from experiments.harness import ResultStore, plain
from xformjax.models import LanguageModel
from xformjax.train.config import config_from_tree
from xformjax.train.trainer import NonFiniteLossError, Trainer

FAMILIES = (
    "attn",
    "linear_attn",
    "retnet",
    "lightning",
    "gla",
    "diag_rnn",
    "deltanet",
    "gated_deltanet",
    "deltaproduct",
    "mom",
    "titans",
    "atlas",
    "gated_deltanet,attn",
)
NUM_LAYERS, NUM_HEADS = 2, 4
TARGET_PARAMETERS = 300_000
WIDTHS = range(64, 257, 8)


def experiment_config(pattern: str, d_model: int, steps: int, seed: int):
    return config_from_tree(
        {
            "model": {
                "num_layers": NUM_LAYERS,
                "layer_pattern": pattern,
                "mixer": {
                    "d_model": d_model,
                    "num_heads": NUM_HEADS,
                    "chunk_size": 64,
                    "max_seq_len": 512,
                },
            },
            "train": {
                "steps": steps,
                "batch_size": 8,
                "seq_len": 256,
                "learning_rate": 2e-3,
                "warmup_steps": max(1, steps // 10),
                "log_every": max(1, steps // 10),
                "eval_every": 10 * steps,
                "eval_batches": 16,
                "checkpoint_every": 10 * steps,
                "seed": seed,
            },
            "data": {"name": "text"},
        }
    )


def parameter_count(config) -> int:
    abstract = nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def matched_width(pattern: str, steps: int, seed: int) -> tuple[int, int]:
    """The width (a multiple of 8) whose model has the
    parameter count closest to :data:`TARGET_PARAMETERS`, and that count."""
    counts = {
        width: parameter_count(experiment_config(pattern, width, steps, seed)) for width in WIDTHS
    }
    width = min(counts, key=lambda w: abs(counts[w] - TARGET_PARAMETERS))
    return width, counts[width]


def train_family(pattern: str, steps: int, seed: int, progress: bool) -> dict:
    """Train one family at its matched width; the record keeps what reproduces it
    (the whole config, the seed, the machine) and the steps and wall time it took."""
    width, parameters = matched_width(pattern, steps, seed)
    config = experiment_config(pattern, width, steps, seed)
    provenance = {
        "seed": seed,
        "config": plain(config),
        "machine": machine(),
        "d_model": width,
        "parameters": parameters,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xformjax-lm-") as workdir:
        trainer = Trainer(config, workdir, progress=progress)
        try:
            final = trainer.run()
        except NonFiniteLossError as error:
            return {**provenance, "diverged": str(error)}
        log = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    speeds = [json.loads(line).get("tokens_per_second") for line in log]
    speeds = [s for s in speeds if s]
    return {
        **provenance,
        "steps": steps,
        "train_seconds": round(time.perf_counter() - started, 1),
        "validation_bits_per_byte": round(final["bits_per_byte"], 4),
        # the first logged interval includes compilation
        "train_tokens_per_second": round(max(speeds[1:] or speeds), 1),
    }


def pooled(store: ResultStore, steps: int, families: Sequence[str] = FAMILIES) -> dict:
    """Every stored run of ``steps`` steps, grouped by family (``families`` first, in
    their order, then any other family the store holds), over whatever seeds ran."""
    groups: dict[str, list[dict]] = {family: [] for family in families}
    for name, record in store.results.items():
        family, _seed, run_steps = name.split("|")
        if run_steps == f"{steps} steps":
            groups.setdefault(family, []).append(record)
    return {family: runs for family, runs in groups.items() if runs}


def seed_zero_bits(records: Sequence[dict]) -> float | None:
    """The validation bits per byte of the family's seed-0 run (``None``: not run or
    diverged): the run every family has, so the families compare on one footing."""
    for record in records:
        if record["name"].split("|")[1] == "seed 0" and "diverged" not in record:
            return record["validation_bits_per_byte"]
    return None


def row(family: str, records: Sequence[dict]) -> list[str]:
    """A table row: the family, its width and size, the seeds, seed 0's validation
    bits per byte, those over the seeds that finished, their training throughput."""
    finished = [r for r in records if "diverged" not in r]
    diverged = len(records) - len(finished)
    bits = report.mean_and_spread([r["validation_bits_per_byte"] for r in finished], percent=False)
    if diverged:
        reason = next(r["diverged"] for r in records if "diverged" in r).split(";")[0]
        bits = f"{bits}; {diverged} diverged: {reason}" if finished else f"diverged: {reason}"
    speeds = [r["train_tokens_per_second"] for r in finished]
    return [
        family,
        str(records[0]["d_model"]),
        f"{records[0]['parameters'] / 1e3:.0f}K",
        str(len(records)),
        "—" if (zero := seed_zero_bits(records)) is None else f"{zero:.3f}",
        bits,
        f"{sum(speeds) / len(speeds):.0f}" if speeds else "—",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=report.RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.families, args.steps, args.seeds = ["attn", "gated_deltanet", "diag_rnn"], 20, [0]
    store = ResultStore(args.out / "language_model.jsonl")
    for seed in args.seeds:
        for pattern in args.families:
            name = f"{pattern}|seed {seed}|{args.steps} steps"
            if name not in store:
                print(f"training {pattern}, seed {seed} …", flush=True)
                record = train_family(pattern, args.steps, seed, not args.no_progress)
                store.add({"name": name, **record})
    groups = pooled(store, args.steps)
    lines = report.header("Language modelling: bits per byte at equal size and steps")
    lines += [
        f"{NUM_LAYERS} layers, {NUM_HEADS} heads, width chosen per family for about "
        f"{TARGET_PARAMETERS / 1e3:.0f}K parameters; {args.steps} steps of 8 × 256 "
        "bytes, AdamW lr 2e-3 (warm-up, cosine); validation on 16 batches of held-out "
        "files, the same bytes for every seed. Lower is better. Rows are in the order "
        "of seed 0, the run every family has; every seed stored for these steps is "
        "pooled in the next column (mean ± standard deviation, with the lowest and "
        "highest); tokens/s is the mean over the seeds, and the first logged interval, "
        "which includes compilation, is left out.",
        "",
    ]

    def order(records: Sequence[dict]) -> float:
        zero = seed_zero_bits(records)
        return float("inf") if zero is None else zero

    rows = [row(family, runs) for family, runs in sorted(groups.items(), key=lambda g: order(g[1]))]
    lines += report.table(
        [
            "layers",
            "d_model",
            "parameters",
            "seeds",
            "seed 0: bits/byte",
            "all seeds: bits/byte",
            "train tokens/s (CPU)",
        ],
        rows,
    ) + [""]
    (args.out / "language_model.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
