"""Decoding benchmark: generated tokens/s of the default language model at batch 1 and 32.

    python -m experiments.bench.decode             # the default run's model, B ∈ {1, 32}
    python -m experiments.bench.decode --quick     # the tiny preset, short: a smoke run
    python -m experiments.bench                    # with the op and layer benchmarks

The model is the ``default`` training config's (``xformjax train --config default``:
three gated DeltaNet layers and one attention layer, d_model 128), with random
initial parameters in float32. For each batch size a prompt of 64 random byte tokens
per row is continued by 256 tokens with :func:`xformjax.models.complete` (one jitted
program: the prefill, then a ``lax.scan`` of one-token steps), sampling at the
command's defaults (temperature 0.8, top-k 40). Reported per batch size:

- the first call, which compiles the program (``compile ≈ first − run``);
- the best of ``--repeats`` further calls of the whole generation (``run``) and of a
  one-token generation (``prefill``: the prompt and one sampled token);
- decode tokens/s ``B · (N − 1) / (run − prefill)``: the one-token steps alone, and
  overall tokens/s ``B · N / run``.

Writes ``decode.md``, ``decode.json`` and ``decode.png`` to ``experiments/results/``
with the machine and its load average recorded. Like the other benchmarks, the
process re-executes itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` unless
``--no-hugepages`` is given (see :mod:`experiments.bench.ops`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from experiments.bench.ops import RESULTS, machine, reexec_with_hugepages
from xformjax import models

BATCHES = [1, 32]
PROMPT, NEW_TOKENS = 64, 256
QUICK = {"batches": [1, 2], "prompt": 8, "new_tokens": 8}
SAMPLING = models.SamplingOptions(temperature=0.8, top_k=40)


@dataclasses.dataclass(frozen=True)
class Row:
    batch: int
    prompt: int
    new_tokens: int
    first_s: float  # compile + one generation
    run_s: float  # best whole generation
    prefill_s: float  # best one-token generation
    run_median_s: float  # median whole generation
    samples: int  # timed whole generations

    @property
    def compile_s(self) -> float:
        return max(self.first_s - self.run_s, 0.0)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * (self.new_tokens - 1) / max(self.run_s - self.prefill_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.run_s

    @property
    def median_tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.run_median_s


def timings(fn, arg, repeats: int, sample_s: float) -> list[float]:
    """Seconds of at least ``repeats`` calls ``fn(arg)`` (after one warm-up call),
    sampling for ``sample_s`` seconds."""
    jax.block_until_ready(fn(arg))
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < sample_s:
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return times


def model_config(name: str) -> models.LMConfig:
    """``default``/``base``/``tiny`` training configs' models (``tiny``: the LM preset)."""
    if name == "tiny":
        return models.LMConfig.preset("tiny")
    from xformjax.train.config import load_config

    return load_config(name).model


def measure(model, batch: int, prompt: int, new_tokens: int, repeats: int, sample_s: float) -> Row:
    tokens = np.random.default_rng(batch).integers(0, model.config.vocab_size, (batch, prompt))

    def generate(count: int):
        return models.complete(model, tokens, count, sampling=SAMPLING, seed=0).tokens

    started = time.perf_counter()
    jax.block_until_ready(generate(new_tokens))
    first = time.perf_counter() - started
    runs = timings(generate, new_tokens, repeats, sample_s)
    prefill_s = min(timings(generate, 1, repeats, sample_s))
    return Row(
        batch, prompt, new_tokens, first, min(runs), prefill_s, float(np.median(runs)), len(runs)
    )


def markdown(
    rows: list[Row], config_name: str, config, params: int, info: dict, load: tuple
) -> str:
    cpu = f"this {info['cores']}-core {info['backend'].upper()}, {info['cpu']}"
    lines = [
        "# Decoding throughput",
        "",
        f"`python -m experiments.bench.decode` on {info['date']}: {cpu}; jax {info['jax']}.",
        (
            f"The machine was shared with other work while it ran (load average "
            f"{load[0]:.2f} before, {load[1]:.2f} after, on {info['cores']} cores): the "
            "timings are those of a loaded machine."
            if load[0] > 0.5 * info["cores"]
            else f"Nothing else ran on the machine (load average {load[0]:.2f} before the "
            f"benchmark, {load[1]:.2f} after, on {info['cores']} cores; the benchmark "
            "itself is the load after)."
        ),
        "",
        f"Model: the `{config_name}` config's, random initial parameters, float32: "
        f"{config.num_layers} layers `{config.layer_pattern}`, d_model {config.d_model}, "
        f"{config.mixer.num_heads} heads, vocabulary {config.vocab_size} "
        f"({params:,} parameters). Each row continues a random prompt: `models.complete` "
        "(the prefill, then a jitted `lax.scan` of one-token steps), temperature 0.8, "
        "top-k 40.",
        "",
        "| batch | prompt | new tokens | first call (s) | compile ≈ (s) | run: best (s) | "
        "run: median (s) | runs timed | prefill + 1 (s) | decode tokens/s | "
        "overall tokens/s: best | overall: median |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.batch} | {r.prompt} | {r.new_tokens} | {r.first_s:.2f} | {r.compile_s:.2f} "
            f"| {r.run_s:.3f} | {r.run_median_s:.3f} | {r.samples} | {r.prefill_s:.3f} | "
            f"{r.decode_tokens_per_s:,.0f} | {r.tokens_per_s:,.0f} | "
            f"{r.median_tokens_per_s:,.0f} |"
        )
    lines += [
        "",
        "run: the whole generation, timed at least 3 times and for 8 s (by default) after "
        "the first call; prefill + 1: the best one-token generation (the prompt and its "
        "first token); decode tokens/s: B · (N − 1) / (best run − prefill), the one-token "
        "steps alone; overall: B · N / run; compile: first call − best run.",
    ]
    if len(rows) > 1:
        low, high = rows[0], rows[-1]
        lines += [
            "",
            f"Batch {high.batch} decodes {high.decode_tokens_per_s / low.decode_tokens_per_s:.1f}× "
            f"as many tokens/s as batch {low.batch} "
            f"({high.run_s / high.new_tokens * 1e3:.2f} ms against "
            f"{low.run_s / low.new_tokens * 1e3:.2f} ms per step of the whole batch; "
            f"{high.median_tokens_per_s / low.median_tokens_per_s:.1f}× by the medians).",
        ]
        if max(r.samples for r in rows) > 3 * min(r.samples for r in rows):
            lines += [
                "",
                "On a loaded machine the best of many short calls catches a quiet moment "
                "more often than the best of a few long ones (the medians are the fairer "
                "comparison there): the rows were timed "
                + ", ".join(f"{r.samples} times (batch {r.batch})" for r in rows)
                + ", so the best-time comparison favours the smaller batch.",
            ]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    labels = [str(r.batch) for r in rows]
    ax.bar(labels, [r.decode_tokens_per_s for r in rows], color="tab:blue")
    for index, r in enumerate(rows):
        ax.annotate(f"{r.decode_tokens_per_s:,.0f}", (index, r.decode_tokens_per_s), ha="center")
    ax.set(xlabel="batch", ylabel="decode tokens/s (best run)", title="Decoding throughput")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default="default",
        help="the training config whose model runs (default, base; tiny: the LM preset)",
    )
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 1 32)")
    parser.add_argument("--prompt", type=int, help=f"prompt tokens (default {PROMPT})")
    parser.add_argument("--new-tokens", type=int, help=f"tokens generated (default {NEW_TOKENS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny preset, B ∈ {1, 2}, 8 + 8 tokens (unless the flags say otherwise)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls, at least")
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=8.0,
        help="keep timing for this long, best call counts (default 8: a loaded machine)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument(
        "--no-hugepages",
        action="store_true",
        help="keep glibc's default malloc (see experiments.bench.ops)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config_name = "tiny" if args.quick and args.config == "default" else args.config
    batches = args.batches or (QUICK["batches"] if args.quick else BATCHES)
    prompt = args.prompt or (QUICK["prompt"] if args.quick else PROMPT)
    new_tokens = args.new_tokens or (QUICK["new_tokens"] if args.quick else NEW_TOKENS)
    started = time.perf_counter()
    config = model_config(config_name)
    model = models.LanguageModel(config, rngs=nnx.Rngs(0))
    load_before = os.getloadavg()[0]
    rows = []
    for batch in batches:
        rows.append(measure(model, batch, prompt, new_tokens, args.repeats, args.sample_seconds))
        print(f"batch {batch}: {rows[-1].decode_tokens_per_s:,.0f} decode tokens/s", flush=True)
    load = (load_before, os.getloadavg()[0])
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(rows, config_name, config, models.count_params(model), info, load)
    (args.out / "decode.md").write_text(report)
    (args.out / "decode.json").write_text(
        json.dumps(
            {
                "machine": {**info, "load_average": load},
                "settings": {
                    "config": config_name,
                    "sampling": dataclasses.asdict(SAMPLING),
                    "repeats": args.repeats,
                    "sample_seconds": args.sample_seconds,
                },
                "rows": [
                    {
                        **dataclasses.asdict(r),
                        "compile_s": r.compile_s,
                        "decode_tokens_per_s": r.decode_tokens_per_s,
                        "tokens_per_s": r.tokens_per_s,
                    }
                    for r in rows
                ],
                "seconds": time.perf_counter() - started,
            },
            indent=1,
        )
    )
    plot(rows, args.out / "decode.png")
    print(report)
    print(f"wrote {args.out / 'decode.md'}, decode.json, decode.png")
    return 0


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv[1:], "experiments.bench.decode")
    sys.exit(main(sys.argv[1:]))
