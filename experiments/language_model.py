"""Byte-level language modelling on the standard-library corpus, every family at
(nearly) equal parameter count and equal steps.

    python -m experiments.language_model            # every family, 300 steps each
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=report.RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.families, args.steps = ["attn", "gated_deltanet", "diag_rnn"], 20
    store = ResultStore(args.out / "language_model.jsonl")
    for pattern in args.families:
        name = f"{pattern}|seed {args.seed}|{args.steps} steps"
        if name not in store:
            print(f"training {pattern} …", flush=True)
            store.add(
                {"name": name, **train_family(pattern, args.steps, args.seed, not args.no_progress)}
            )
    records = [store.results[f"{p}|seed {args.seed}|{args.steps} steps"] for p in args.families]
    lines = report.header("Language modelling: bits per byte at equal size and steps")
    lines += [
        f"{NUM_LAYERS} layers, {NUM_HEADS} heads, width chosen per family for about "
        f"{TARGET_PARAMETERS / 1e3:.0f}K parameters; {args.steps} steps of 8 × 256 "
        "bytes, AdamW lr 2e-3 (warm-up, cosine), seed "
        f"{args.seed}; validation on 16 batches of held-out files. Lower is better.",
        "",
    ]

    def row(record) -> list[str]:
        head = [
            record["name"].split("|")[0],
            str(record["d_model"]),
            f"{record['parameters'] / 1e3:.0f}K",
        ]
        if "diverged" in record:
            return head + [f"diverged: {record['diverged'].split(';')[0]}", "—"]
        return head + [
            f"{record['validation_bits_per_byte']:.3f}",
            f"{record['train_tokens_per_second']:.0f}",
        ]

    rows = [
        row(r)
        for r in sorted(records, key=lambda r: r.get("validation_bits_per_byte", float("inf")))
    ]
    lines += report.table(
        ["layers", "d_model", "parameters", "validation bits/byte", "train tokens/s (CPU)"], rows
    ) + [""]
    (args.out / "language_model.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
