"""Paper estimate: bytes each chip receives per layer (forward) under sequence
parallelism, LASP-2 against ring attention, on a 256-chip pod.

    python -m experiments.bench.sequence_parallel_estimate

Model of a layer (a 7B-class width): ``d_model = 4096``, ``H = 32`` heads of
``K = V = 128``; attention with ``H_kv = 8`` grouped key/value heads in bf16;
recurrent states and transitions in float32; ``B = 1`` sequence per
sequence-parallel group of ``n`` chips, ``T`` tokens split ``T/n`` per chip.

- LASP-2 (one all-gather of every shard's pair): each chip receives the other
  ``n − 1`` pairs, ``(n − 1)·B·H·(K·V + transition)·4`` bytes, where the transition
  is ``0`` for plain linear attention, ``1`` per head for a scalar decay (RetNet,
  lightning, gated DeltaNet's ``g`` part is folded into the K×K matrix), ``K`` for
  GLA's diagonal and ``K²`` for the delta rule. Independent of T.
- Ring attention (and LASP-2H's all-gather, which moves the same bytes in one
  collective): each chip receives every other shard's keys and values,
  ``(n − 1)/n · B·T·H_kv·(K + V)·2`` bytes. Linear in T.

Times assume 200 GB/s of inter-chip bandwidth per chip (TPU v5e's quoted
1,600 Gbit/s ICI) and ignore latency and topology: an estimate, not a measurement.
Writes ``experiments/results/sequence_parallel_estimate.{md,png}``.
"""

from __future__ import annotations

import dataclasses
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
BANDWIDTH = 200e9  # bytes/s per chip (assumed, see the module docstring)
LENGTHS = (32_768, 131_072, 524_288, 1_048_576, 4_194_304)
GROUPS = (16, 256)


@dataclasses.dataclass(frozen=True)
class Layer:
    heads: int = 32
    kv_heads: int = 8
    key_dim: int = 128
    value_dim: int = 128
    batch: int = 1


def lasp2_bytes(layer: Layer, shards: int, transition: str) -> float:
    """Bytes one chip receives in LASP-2's all-gather (float32 pairs)."""
    per_head = {"none": 0, "scalar": 1, "diagonal": layer.key_dim, "matrix": layer.key_dim**2}[
        transition
    ]
    pair = layer.batch * layer.heads * (layer.key_dim * layer.value_dim + per_head) * 4
    return (shards - 1) * pair


def ring_bytes(layer: Layer, shards: int, length: int) -> float:
    """Bytes one chip receives in ring attention (bf16 K and V of the other shards)."""
    kv = layer.batch * length * layer.kv_heads * (layer.key_dim + layer.value_dim) * 2
    return kv * (shards - 1) / shards


def crossover(layer: Layer, shards: int, transition: str = "matrix") -> int:
    """The sequence length at which ring attention starts to move more bytes."""
    return round(lasp2_bytes(layer, shards, transition) / ring_bytes(layer, shards, 1))


def _size(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def table(layer: Layer) -> list[str]:
    lines = [
        "| chips on `seq` | T | tokens/chip | LASP-2, linear attn | LASP-2, GLA | "
        "LASP-2, delta rule | ring attention (GQA 8) | ring ÷ LASP-2 delta |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shards in GROUPS:
        for length in LENGTHS:
            delta = lasp2_bytes(layer, shards, "matrix")
            ring = ring_bytes(layer, shards, length)
            lines.append(
                f"| {shards} | {length // 1024}K | {length // shards:,} | "
                f"{_size(lasp2_bytes(layer, shards, 'scalar'))} | "
                f"{_size(lasp2_bytes(layer, shards, 'diagonal'))} | {_size(delta)} "
                f"({delta / BANDWIDTH * 1e3:.2g} ms) | {_size(ring)} "
                f"({ring / BANDWIDTH * 1e3:.2g} ms) | {ring / delta:.2g}× |"
            )
    return lines


def plot(layer: Layer, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [2**e for e in range(13, 23)]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for shards, style in zip(GROUPS, ("-", "--")):
        axis.plot(
            lengths,
            [ring_bytes(layer, shards, t) for t in lengths],
            "C3" + style,
            label=f"ring attention, n={shards}",
        )
        for transition, colour in (("scalar", "C0"), ("matrix", "C2")):
            name = {"scalar": "linear attn", "matrix": "delta rule"}[transition]
            axis.plot(
                lengths,
                [lasp2_bytes(layer, shards, transition)] * len(lengths),
                colour + style,
                label=f"LASP-2 {name}, n={shards}",
            )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length T (tokens)",
        ylabel="bytes received per chip per layer",
        title="Sequence-parallel communication (estimate)",
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    layer = Layer()
    lines = table(layer)
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = [
        "# Sequence parallelism on a 256-chip pod: a paper estimate",
        "",
        "Bytes each chip receives per layer in the forward pass (the backward is the "
        "mirror image), from `python -m experiments.bench.sequence_parallel_estimate`. "
        f"Layer: {layer.heads} heads of K = V = {layer.key_dim}, attention with "
        f"{layer.kv_heads} key/value heads in bf16, float32 recurrent states, one "
        "sequence per group. Times in brackets at an assumed 200 GB/s per chip "
        "(TPU v5e's quoted ICI bandwidth), ignoring latency and topology.",
        "",
        "LASP-2's volume is `(n − 1)·H·(K·V + transition)·4` bytes whatever T; ring "
        "attention's is `(n − 1)/n·T·H_kv·(K + V)·2` bytes, linear in T. With the whole "
        "pod on one sequence (n = 256) the delta rule's K×K transitions make LASP-2 "
        f"heavier than ring attention below about {crossover(layer, 256) // 1024}K tokens "
        "(linear attention: "
        f"{crossover(layer, 256, 'scalar') // 1024}K), and lighter beyond; with n = 16 "
        "(and 16-way data parallelism across the pod) it is lighter from about "
        f"{crossover(layer, 16) // 1024}K tokens. "
        "LASP-2 is also one collective, where ring attention is n − 1 "
        "dependent steps, and the linear layers' compute is O(T/n) per chip against "
        "attention's O(T²/n).",
        "",
    ]
    (RESULTS / "sequence_parallel_estimate.md").write_text(
        "\n".join(header + lines + ["", "![bytes vs T](sequence_parallel_estimate.png)", ""])
    )
    plot(layer, RESULTS / "sequence_parallel_estimate.png")
    print(f"wrote {RESULTS / 'sequence_parallel_estimate.md'} and .png")


if __name__ == "__main__":
    main()
