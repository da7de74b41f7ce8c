"""The benchmark suite: the op benchmark, then the layer benchmark, the decoding
benchmark, the depth benchmark (and the GPU kernel benchmark on a GPU).

    python -m experiments.bench                   # full run; results in experiments/results/
    python -m experiments.bench --quick           # smoke run of each
    python -m experiments.bench --only depth      # one of: ops, layers, decode, depth, kernels
    make bench BENCH_ARGS="--quick"               # the same, through make

Each benchmark shows its own progress bar and writes its markdown, JSON and plot
with the machine described (CPU model, cores, jax version, backend). The process
re-executes itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` unless
``--no-hugepages`` is given (see :mod:`experiments.bench.ops`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from experiments.bench import decode, depth, layers, ops
from experiments.bench.ops import reexec_with_hugepages

BENCHMARKS = ("ops", "layers", "decode", "depth", "kernels")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke runs: short lengths, few families (kernels: --smoke)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only these of {', '.join(BENCHMARKS)} (default: ops, layers, "
        "decode and depth, plus kernels on a GPU)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=ops.RESULTS,
        help="results folder of ops, layers, decode and depth (default: experiments/results)",
    )
    parser.add_argument(
        "--no-hugepages",
        action="store_true",
        help="keep glibc's default malloc (see experiments.bench.ops)",
    )
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None, reexec: bool = False) -> int:
    """Run the selected benchmarks in turn; with ``reexec``, first restart the process
    under the huge-page malloc tunable (after the arguments parsed, so ``--help``
    and mistakes are answered here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(prog).parse_args(argv)
    if reexec:
        reexec_with_hugepages(argv, "experiments.bench")
    import jax

    names = args.only or [
        name for name in BENCHMARKS if name != "kernels" or jax.default_backend() == "gpu"
    ]
    common = (["--quick"] if args.quick else []) + ["--out", str(args.out)]
    if args.no_hugepages:
        common.append("--no-hugepages")
    for index, name in enumerate(names, 1):
        print(f"== {name} ({index}/{len(names)}) ==", flush=True)
        started = time.perf_counter()
        if name == "ops":
            status = ops.main(common)
        elif name == "layers":
            status = layers.main(common)
        elif name == "decode":
            status = decode.main(common)
        elif name == "depth":
            status = depth.main(common)
        else:
            from experiments.bench import kernels

            status = kernels.main(["--smoke"] if args.quick else [])
        print(f"== {name}: {time.perf_counter() - started:.0f} s ==", flush=True)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m experiments.bench", reexec=True))
