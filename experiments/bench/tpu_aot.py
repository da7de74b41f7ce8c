"""The train step compiled for a TPU v5e slice on a CPU: memory, FLOPs and LASP-2's collectives.

    python -m experiments.bench.tpu_aot            # both presets, T ∈ {8K, 32K}, two meshes
    python -m experiments.bench.tpu_aot --quick    # the default preset at 8K only

For the ``default`` preset (three gated DeltaNet layers and one attention layer,
d_model 128, K = V = 32) and ``base`` (12 layers, d_model 768, 6 heads of
K = V = 128, bf16 projections), at T = 8192 and 32768, on ``v5e:4x4`` (16 chips)
with (data, seq) meshes and an (fsdp, tensor, seq) mesh: the jitted train step of
``xformjax train`` is compiled by libtpu on this host (:mod:`xformjax.train.aot`,
the Pallas kernels through Mosaic) and the table lists per-chip bytes (arguments,
temporaries, outputs), whether the step fits the chip's 16 GiB, the step's FLOPs per
chip, the compile time, and per linear layer the LASP-2 all-gather (count per layer
and bytes) of the forward and its mirror in the backward. The batch is one sequence
per batch shard (B = data × fsdp) at both lengths, so that the collectives of 8K and
32K compare directly. Nothing runs on a TPU: no number here is a speed.
Writes ``experiments/results/tpu_aot.md``; ``tests/train/test_aot.py`` asserts the
same properties on a smaller slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import pathlib
import platform

import jax

from xformjax.parallel import lasp, lasp2h, tpu
from xformjax.train import aot, load_config

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
LIBTPU_DIR = pathlib.Path(__file__).resolve().parents[2] / ".libtpu"
TOPOLOGY = "v5e:4x4"
PRESETS = ("default", "base")
LENGTHS = (8192, 32768)
MESHES: dict[str, dict[str, int]] = {
    "data=4 seq=4": {"data": 4, "seq": 4},
    "data=2 seq=8": {"data": 2, "seq": 8},
    "fsdp=2 tensor=2 seq=4": {"fsdp": 2, "tensor": 2, "seq": 4},
}
#: the meshes of each preset (base's 32K step needs seq=8 on a (data, seq) mesh)
PRESET_MESHES = {
    "default": ("data=4 seq=4", "fsdp=2 tensor=2 seq=4"),
    "base": ("data=4 seq=4", "data=2 seq=8", "fsdp=2 tensor=2 seq=4"),
}


@dataclasses.dataclass(frozen=True)
class Row:
    preset: str
    length: int
    mesh: str
    report: aot.AotReport | None
    error: str | None = None


def _config(preset: str, length: int, mesh: dict[str, int]):
    batch = mesh.get("data", 1) * mesh.get("fsdp", 1)
    sets = [
        f"train.seq_len={length}",
        f"model.mixer.max_seq_len={length}",
        f"train.batch_size={batch}",
        *(f"mesh.{axis}={size}" for axis, size in mesh.items()),
    ]
    return load_config(preset, sets)


def _gib(n: int) -> str:
    return f"{n / tpu.GIB:.2f}"


def _kib(n: int) -> str:
    return f"{n / 1024:g} KiB" if n < tpu.MIB else f"{n / tpu.MIB:g} MiB"


def _linear_layers(preset: str) -> int:
    return sum(name != "attn" for name in load_config(preset).model.layer_names())


def _lasp2(report: aot.AotReport, layers: int, *, backward: bool) -> str:
    items = report.scoped(lasp.SCOPE, backward=backward)
    kinds = sorted({c.kind for c in items})
    sizes = sorted({c.array_bytes[0] for c in items})
    per_layer = len(items) / layers
    return f"{per_layer:g} × {'/'.join(kinds)} of {', '.join(_kib(s) for s in sizes)}"


def table(rows: list[Row]) -> str:
    lines = [
        "| preset | T | mesh | args GiB | temp GiB | out GiB | total GiB | fits 16 GiB | "
        "TFLOP/chip | compile s | LASP-2 fwd per linear layer | LASP-2 bwd per linear layer "
        "| LASP-2H fwd, all attention layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row.preset} | {row.length // 1024}K | {row.mesh} |"
        report = row.report
        if report is None:
            lines.append(f"{head} — | — | — | — | **no**: {row.error} | — | — | — | — | — |")
            continue
        layers = _linear_layers(row.preset)
        attention = report.scoped(lasp2h.SCOPE, backward=False)
        lines.append(
            f"{head} {_gib(report.argument_bytes)} | {_gib(report.temp_bytes)} | "
            f"{_gib(report.output_bytes)} | {_gib(report.peak_bytes)} | "
            f"{'yes' if report.fits else '**no**'} | {report.flops / 1e12:.2f} | "
            f"{report.compile_seconds:.0f} | {_lasp2(report, layers, backward=False)} | "
            f"{_lasp2(report, layers, backward=True)} | "
            f"{len(attention)} × {', '.join(sorted({_kib(c.bytes) for c in attention}))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the default preset at 8K only")
    parser.add_argument("--libtpu", default=None, help="libtpu.so or its directory")
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    libtpu = args.libtpu or tpu.libtpu_path(LIBTPU_DIR) or tpu.libtpu_path()
    if libtpu is None:
        raise SystemExit("libtpu not found: make .libtpu/.installed, or pass --libtpu")
    presets, lengths = (("default",), (8192,)) if args.quick else (PRESETS, LENGTHS)
    rows = []
    for preset in presets:
        for length in lengths:
            for name in PRESET_MESHES[preset]:
                mesh = MESHES[name]
                config = _config(preset, length, mesh)
                try:
                    report = aot.compile_train_step(config, TOPOLOGY, libtpu)
                    rows.append(Row(preset, length, name, report))
                except aot.DoesNotFitError as error:
                    rows.append(Row(preset, length, name, None, str(error).split(" (lower")[0]))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    version = importlib.metadata.version
    libtpu_version = tpu.libtpu_version(tpu.libtpu_path(libtpu) or libtpu)
    header = (
        "# The train step compiled for a TPU v5e slice\n\n"
        f"`python -m experiments.bench.tpu_aot`: compiled on a {os.cpu_count()}-core CPU host "
        f"({platform.processor() or platform.machine()}) with libtpu {libtpu_version}, "
        f"jax {version('jax')}, for `{TOPOLOGY}` (16 v5e chips, 16 GiB HBM each). "
        "Per chip: arguments (parameters, optimiser state, batch), temporaries, outputs "
        "(aliased to the donated state) and their total with the program; FLOPs from XLA's "
        "cost analysis of one chip's program; compile = trace + lower + XLA:TPU/Mosaic. "
        "B = data × fsdp (one sequence per batch shard) at both lengths.\n\n"
        "LASP-2 columns: the collectives under `jax.named_scope('lasp2')` in the compiled "
        "HLO, per linear (gated DeltaNet) layer, and the bytes of each: one all-gather of "
        "the `(transition, contribution)` pairs forward, one reduce-scatter (or the "
        "all-reduce XLA turns it into) backward; the same at 8K and 32K. LASP-2H (the "
        "attention layers: 1 in default, 3 in base) gathers keys and values, which grow "
        "with T (XLA may split a gather in two, or repeat it in the backward). Its local "
        "attention is the parallel form, whose T/seq × T scores dominate the temporaries "
        "at 32K. Compile times were measured while other jobs shared the 2 cores. Nothing "
        "ran on a TPU: no number is a speed.\n\n"
    )
    text = header + table(rows) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "tpu_aot.md").write_text(text)
        print(f"wrote {RESULTS / 'tpu_aot.md'}")


if __name__ == "__main__":
    main()
