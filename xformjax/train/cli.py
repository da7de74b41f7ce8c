"""The ``xformjax`` command: ``train``, ``eval``, ``generate`` and ``aot``.

    xformjax train [--config NAME|PATH.yaml] [--workdir DIR] [--set key=value ...]...
                   [--profile START:END] [--distributed auto|on|off]
    xformjax eval --workdir DIR
    xformjax generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
                      [--temperature T] [--top-k K] [--top-p P] [--min-p P]
                      [--repetition-penalty R] [--seed N] [--stop TEXT]
    xformjax aot --config NAME|PATH.yaml --topology v5e:4x4 [--set key=value ...]...
                 [--libtpu PATH]

``train`` resumes from ``DIR``'s latest checkpoint when there is one; it logs to
``DIR/metrics.jsonl`` and ``DIR/tensorboard/`` (TensorBoard events; off with
``--set train.tensorboard=false``), and ``--profile START:END`` (``train.profile``)
writes a ``jax.profiler`` trace of the steps ``START ≤ step < END`` to
``DIR/profile/``. Its presets
(``--config tiny``, ``default``) are package data, so an installed wheel trains
from any directory. ``eval`` and ``generate`` read the run's ``config.yaml`` and
its latest checkpoint. The benchmarks are not part of the installed command: they
live in a checkout's ``experiments/bench`` (``make bench`` or
``python -m experiments.bench``).

``--set`` takes one or more ``key=value`` and may be repeated: all of them apply
(``--set train.steps=300 --set train.checkpoint_every=50``); a key given twice is an
error. A config error — an unknown preset, a missing file, broken YAML, an unknown
key, a bad value, ``--set`` without ``=`` — prints one line,
``xformjax: error: ...``, on stderr and exits with 2 (no traceback).

``aot`` compiles the train step of a config for a TPU slice on this (CPU) machine
with libtpu and prints what one chip needs (:mod:`xformjax.train.aot`): plan a pod
run before paying for it. It exits with 2 when the slice, libtpu or the mesh is
wrong, and with 1 when the step does not fit a chip's HBM.

On a multi-host slice every host runs the same ``xformjax train`` command;
``--distributed`` (default ``auto``: from the environment, see
:mod:`xformjax.parallel.distributed`) calls ``jax.distributed.initialize()`` first.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys


def _quiet_libraries() -> None:
    """orbax logs a warning per async save through absl; keep errors only."""
    from absl import logging as absl_logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)


class CommandError(Exception):
    """A problem with what the command was given (its config, its run directory):
    :func:`main` prints it as one line and exits with 2."""


def _fail(message: object, code: int = 2) -> int:
    """Print ``xformjax: error: MESSAGE`` (one line) on stderr; return ``code``."""
    print(f"xformjax: error: {' '.join(str(message).splitlines())}", file=sys.stderr)
    return code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1; got {value}")
    return value


def _load(name_or_path: str, assignments: list[str]):
    """:func:`~xformjax.train.config.load_config` with ``--set``'s ``key=value``
    assignments (each key once); its errors as :class:`CommandError`."""
    from xformjax.train.config import load_config, parse_assignments

    try:
        return load_config(name_or_path, parse_assignments(assignments, unique=True))
    except ValueError as error:
        raise CommandError(error) from None


def _parser() -> argparse.ArgumentParser:
    from xformjax.train.config import available_presets

    parser = argparse.ArgumentParser(prog="xformjax", description=(__doc__ or "").split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model (resumes from WORKDIR's checkpoint)",
        description="Train a model. Starting again in the same WORKDIR resumes from its "
        "latest checkpoint.",
    )
    train.add_argument(
        "--config",
        default="default",
        help=f"preset name ({', '.join(available_presets())}) or a .yaml path",
    )
    train.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    train.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. train.steps=100 model.layer_pattern=attn "
        "(repeatable; each key once)",
    )
    train.add_argument(
        "--profile",
        metavar="START:END",
        help="trace the steps START ≤ step < END (from 1) with jax.profiler into "
        "WORKDIR/profile/ (the same as --set train.profile='START:END')",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--distributed",
        choices=("auto", "on", "off"),
        default="auto",
        help="join a multi-host run with jax.distributed.initialize() "
        "(auto: when the environment names a cluster or "
        "XFORMJAX_DISTRIBUTED=1)",
    )
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a run's latest checkpoint",
        description="Score the validation split with the latest checkpoint of WORKDIR.",
    )
    evaluate.add_argument("--workdir", required=True)
    evaluate.add_argument(
        "--batches", type=_positive_int, help="validation batches (default: the run's)"
    )
    generate = commands.add_parser(
        "generate",
        help="generate text from a run's checkpoint",
        description="Continue PROMPT with the latest checkpoint of "
        "WORKDIR (a model trained on text).",
    )
    generate.add_argument("--workdir", required=True)
    generate.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="the text to continue; repeat for a batch (each printed under a header)",
    )
    generate.add_argument("--max-new-tokens", type=_positive_int, default=200)
    generate.add_argument(
        "--temperature", default="0.8", metavar="T", help="≥ 0; 0 is greedy (default 0.8)"
    )
    generate.add_argument(
        "--top-k", default="40", metavar="K", help="an int ≥ 1, or 'none' (default 40)"
    )
    generate.add_argument("--top-p", default="1", metavar="P", help="nucleus mass in (0, 1]")
    generate.add_argument(
        "--min-p", default="0", metavar="P", help="in [0, 1]: keep p ≥ min_p · p_max"
    )
    generate.add_argument(
        "--repetition-penalty", default="1", metavar="R", help="> 0; 1 is off (CTRL-style)"
    )
    generate.add_argument("--seed", metavar="N", help="sampler seed (default: the run's seed)")
    generate.add_argument(
        "--stop", metavar="TEXT", help="end each sample before the first TEXT it generates"
    )
    aot = commands.add_parser(
        "aot",
        help="compile the train step for a TPU slice on this machine and report its memory",
        description="Compile the train step of a config for a TPU slice with libtpu, on "
        "this machine's CPU, and print the per-chip HBM (arguments, temporaries, outputs) "
        "against the chip's capacity, the step's FLOPs, its collectives and the compile "
        "time. Nothing runs on a TPU.",
    )
    aot.add_argument(
        "--config",
        default="default",
        help=f"preset name ({', '.join(available_presets())}) or a .yaml path",
    )
    aot.add_argument("--topology", required=True, help="the slice, e.g. v5e:2x2, v5e:4x4, v6e:2x2")
    aot.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. mesh.data=4 mesh.seq=4 train.seq_len=32768 "
        "(repeatable; each key once)",
    )
    aot.add_argument(
        "--libtpu",
        help="libtpu.so, or a directory holding libtpu/libtpu.so (default: "
        "$TPU_LIBRARY_PATH, else the installed libtpu package)",
    )
    return parser


def _run_config(workdir: pathlib.Path, overrides=None):
    path = workdir / "config.yaml"
    if not path.is_file():
        raise CommandError(f"{path} not found: is {workdir} a training run directory?")
    return _load(str(path), overrides or [])


def _restored_trainer(workdir: pathlib.Path, overrides=None):
    from xformjax.train.trainer import Trainer

    config = _run_config(workdir, overrides)
    try:
        trainer = Trainer(config, workdir, progress=False)
    except ValueError as error:  # the run's data is gone or no longer fits the devices
        raise CommandError(error) from None
    try:
        step = trainer.checkpointer.restore_model(trainer.model)
    except FileNotFoundError as error:
        raise CommandError(error) from None
    return trainer, step


def _aot(args: argparse.Namespace) -> int:
    """``xformjax aot``: see the module docstring."""
    import jax

    # before any backend starts: where libtpu is importable JAX would look for a TPU on
    # this machine; the slice's devices come from libtpu's compile-only client instead
    jax.config.update("jax_platforms", "cpu")
    from xformjax.parallel.tpu import TopologyError
    from xformjax.train.aot import AotError, DoesNotFitError, compile_train_step

    config = _load(args.config, args.set)
    print(
        f"compiling the train step of {args.config} for {args.topology} with libtpu "
        "(minutes for a large model; nothing runs on a TPU)…",
        file=sys.stderr,
        flush=True,
    )
    try:
        report = compile_train_step(config, args.topology, args.libtpu)
    except DoesNotFitError as error:
        return _fail(error, 1)
    except (TopologyError, AotError) as error:
        return _fail(error)
    print(report.format())
    if not report.fits:
        return _fail(DoesNotFitError.of(report), 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "aot":
            return _aot(args)
        if args.command == "train":
            return _train(args)
        return _evaluate(args) if args.command == "eval" else _generate(args)
    except CommandError as error:
        return _fail(error)


def _train(args: argparse.Namespace) -> int:
    from xformjax.parallel import initialize_distributed
    from xformjax.train.trainer import NonFiniteLossError, Trainer

    try:
        initialize_distributed(args.distributed)  # before anything touches a device
    except ValueError as error:  # XFORMJAX_DISTRIBUTED set to neither 1 nor 0
        return _fail(error)
    assignments = list(args.set)
    if args.profile is not None:
        if any(item.partition("=")[0].strip() == "train.profile" for item in assignments):
            return _fail("give the profile window once: --profile or --set train.profile")
        # a YAML string: unquoted, YAML would read 2:3 as the base-60 number 123
        assignments.append(f"train.profile={json.dumps(args.profile)}")
    config = _load(args.config, assignments)
    name = pathlib.Path(args.config).stem
    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / name)
    try:
        trainer = Trainer(config, workdir, progress=not args.no_progress)
    except ValueError as error:  # a mesh that does not fit the devices or the batch
        return _fail(error)
    print(f"workdir: {workdir}")
    try:
        final = trainer.run()
    except NonFiniteLossError as error:
        return _fail(error, 1)
    _print_metrics(final)
    if trainer.datasets.is_text:
        print("sample:")
        print(trainer.sample())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    overrides = [f"train.eval_batches={args.batches}"] if args.batches is not None else []
    trainer, step = _restored_trainer(pathlib.Path(args.workdir), overrides)
    print(f"checkpoint: step {step}")
    _print_metrics(trainer.evaluate())
    return 0


#: ``generate``'s sampling flags: (flag, SamplingOptions field, parse)
_SAMPLING_FLAGS = (
    ("--temperature", "temperature", float),
    ("--top-k", "top_k", int),
    ("--top-p", "top_p", float),
    ("--min-p", "min_p", float),
    ("--repetition-penalty", "repetition_penalty", float),
)
_KINDS = {float: "a number", int: "an int"}


def _sampling_options(args: argparse.Namespace):
    """``generate``'s :class:`~xformjax.models.sampling.SamplingOptions` from its flags;
    a bad value is a :class:`CommandError` naming the flag."""
    from xformjax.models.sampling import SamplingOptions

    values = {}
    for flag, field, parse in _SAMPLING_FLAGS:
        text = getattr(args, field)
        if field == "top_k" and text.strip().lower() == "none":
            values[field] = None
            continue
        try:
            values[field] = parse(text)
            SamplingOptions(**{field: values[field]})
        except ValueError as error:  # "SamplingOptions: `field` must be WHAT; got …"
            what = str(error).partition("` must be ")[2].rpartition("; got ")[0]
            what = what or _KINDS[parse]
            raise CommandError(f"{flag} must be {what}; got {text!r}") from None
    return SamplingOptions(**values)


def _continuations(sequences, stop: bytes | None) -> list[str]:
    """Each generated byte sequence as text, cut before the first ``stop`` in it."""
    texts = []
    for sequence in sequences:
        data = bytes(bytearray(int(token) for token in sequence))
        if stop:
            cut = data.find(stop)
            data = data if cut < 0 else data[:cut]
        texts.append(data.decode("utf-8", errors="replace"))
    return texts


def _generate(args: argparse.Namespace) -> int:
    """``xformjax generate``: each ``--prompt`` continued by the run's model (bytes in,
    bytes out). A one-byte ``--stop`` also ends its row's decoding (a stop token); a
    longer one cuts the text after decoding. The stop text is searched in the generated
    text only and left out of the output."""
    import numpy as np

    from xformjax.models.generate import complete

    options = _sampling_options(args)
    seed = None
    if args.seed is not None:
        try:
            seed = int(args.seed)
        except ValueError:
            return _fail(f"--seed must be an int; got {args.seed!r}")
    if any(prompt == "" for prompt in args.prompt):
        return _fail("--prompt must not be empty")
    if args.stop is not None and args.stop == "":
        return _fail("--stop must not be empty")
    trainer, _ = _restored_trainer(pathlib.Path(args.workdir))
    if not trainer.datasets.is_text:
        return _fail("generate needs a model trained on text (data.name=text)")
    try:
        options.check_vocab(trainer.config.model.vocab_size)
    except ValueError as error:
        return _fail(error)
    stop = None if args.stop is None else args.stop.encode()
    prompts = [np.frombuffer(prompt.encode(), np.uint8).astype(np.int32) for prompt in args.prompt]
    result = complete(
        trainer.model,
        prompts,
        args.max_new_tokens,
        sampling=options,
        seed=trainer.config.train.seed if seed is None else seed,
        stop_tokens=tuple(stop) if stop is not None and len(stop) == 1 else (),
    )
    texts = _continuations(result.sequences(), stop)
    for index, (prompt, text) in enumerate(zip(args.prompt, texts, strict=True), 1):
        if len(texts) > 1:
            print(f"--- sample {index} ---")
        print(prompt + text)
    return 0


def _print_metrics(metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        print(f"validation {key.replace('_', ' ')}: {value:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
