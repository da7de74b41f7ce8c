"""Train a small language model on a synthetic task and score it: the loop every
reproduction in ``experiments/`` shares.

A :class:`Run` names a model (:class:`~xformjax.models.LMConfig`), the training
settings (:class:`~xformjax.train.config.TrainConfig`: steps, batch size,
learning-rate schedule, seed), the task it trains on and the tasks it is tested on.
:func:`train_and_score` trains it with the library's loss and optimiser
(:func:`~xformjax.train.trainer.loss_and_metrics`,
:func:`~xformjax.train.optimizer.make_optimizer`) and returns, per test task, the
accuracy at every position (``nan`` where nothing is scored), so one test set of
length-256 parity strings gives the accuracy at every prefix length 1…256.

:class:`ResultStore` keeps finished runs in a JSON-lines file keyed by the run's
name, so an interrupted experiment starts again where it stopped. Every record
carries what reproduces it: the model, training, task and stopping settings
(``config``), the seed, the steps run, the wall time and the machine.

A run with :class:`Stopping` trains until its validation accuracy plateaus (Zoology's
protocol: no gain of ``min_delta`` over ``patience`` validations, or the ``target``
reached), with ``train.steps`` as the cap; the record keeps the validation curve.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments.bench.ops import machine
from xformjax.data import Task, task_dataset
from xformjax.models import LanguageModel, LMConfig
from xformjax.nn import MixerConfig
from xformjax.train.config import TrainConfig
from xformjax.train.optimizer import make_optimizer
from xformjax.train.trainer import loss_and_metrics

#: examples scored per test task
TEST_EXAMPLES = 256


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named model: a layer pattern and mixer options on top of ``base``."""

    label: str
    layer_pattern: str
    mixer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config(self, base: LMConfig, vocab_size: int) -> LMConfig:
        mixer = dataclasses.replace(base.mixer, **self.mixer)
        return dataclasses.replace(
            base, layer_pattern=self.layer_pattern, mixer=mixer, vocab_size=vocab_size
        )


def small_lm(
    d_model: int = 64, num_layers: int = 2, num_heads: int = 2, chunk_size: int = 32, **mixer
) -> LMConfig:
    """The experiments' model size: a few layers of width ``d_model``."""
    return LMConfig(
        num_layers=num_layers,
        mixer=MixerConfig(
            d_model=d_model, num_heads=num_heads, chunk_size=chunk_size, max_seq_len=1024, **mixer
        ),
    )


@dataclasses.dataclass(frozen=True)
class Stopping:
    """Train until the accuracy on ``validation`` plateaus.

    Every ``every`` steps the model is scored on ``examples`` examples of
    ``validation``; training stops when that accuracy reaches ``target``, or — from
    step ``min_steps`` on, so that a late phase transition (induction heads form after
    a long flat stretch) is not cut short — when ``patience`` validations in a row did
    not beat the best one by more than ``min_delta`` (the run's ``train.steps`` is the
    cap either way)."""

    validation: Task
    every: int = 100
    patience: int = 5
    min_delta: float = 0.005
    target: float = 0.995
    examples: int = 256
    min_steps: int = 0

    def __post_init__(self):
        for name in ("every", "patience", "examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"Stopping: `{name}` must be ≥ 1; got {getattr(self, name)}")
        if not 0 < self.target <= 1 or self.min_delta < 0:
            raise ValueError(
                f"Stopping: `target` must lie in (0, 1] and `min_delta` be ≥ 0; got "
                f"{self.target}, {self.min_delta}"
            )


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run and what it is tested on (``stopping``: train until the
    validation accuracy plateaus, ``train.steps`` the cap)."""

    name: str
    model: LMConfig
    train: TrainConfig
    task: Task
    tests: dict[str, Task]
    stopping: Stopping | None = None


def batches(task: Task, batch_size: int):
    """Consecutive examples of ``task`` (0, 1, 2, …) in batches: the library's task
    pipeline, unshuffled, so every model of an experiment sees the same data."""
    return iter(task_dataset(task, batch_size=batch_size, shuffle=False))


@nnx.jit
def _correct(model, batch):
    """Per position: correct predictions and scored examples in ``batch``."""
    logits, _ = model(batch["inputs"])
    hit = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(hit * batch["mask"], 0), jnp.sum(batch["mask"], 0)


def scored_accuracy(model: LanguageModel, task: Task, examples: int, batch_size: int) -> float:
    """Accuracy over every scored token of ``examples`` examples of ``task``."""
    accuracy, counts = position_accuracy(model, task, examples, batch_size)
    return float(np.sum(np.nan_to_num(accuracy) * counts) / max(1.0, float(np.sum(counts))))


def position_accuracy(
    model: LanguageModel, task: Task, examples: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy at every position over ``examples`` examples of ``task`` (``nan``
    where no example is scored), and how many examples are scored there."""

    hits, counts = np.zeros(task.length), np.zeros(task.length)
    stream = batches(task, batch_size)
    for _ in range(max(1, examples // batch_size)):
        h, c = _correct(model, next(stream))
        hits, counts = hits + np.asarray(h), counts + np.asarray(c)
    return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan), counts


def train_and_score(run: Run, *, progress: bool = True) -> dict[str, Any]:
    """Train ``run`` and score it on its tests (see the module docstring)."""
    config = run.model
    if config.vocab_size != run.task.vocab_size:
        config = dataclasses.replace(config, vocab_size=run.task.vocab_size)
    model = LanguageModel(config, rngs=nnx.Rngs(run.train.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(run.train), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        (loss, metrics), grads = nnx.value_and_grad(loss_and_metrics, has_aux=True)(
            model, batch, run.train.aux_loss_weight
        )
        optimizer.update(model, grads)
        return loss, metrics["accuracy"]

    started = time.perf_counter()
    stream = batches(run.task, run.train.batch_size)
    losses, accuracies = [], []
    bar = tqdm(
        range(run.train.steps),
        desc=run.name,
        unit="step",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    stopping = run.stopping
    curve: list[tuple[int, float]] = []  # (step, validation accuracy)
    best, since_best, stopped = -1.0, 0, "cap"
    for _ in bar:
        loss, accuracy = step(model, optimizer, next(stream))
        losses.append(loss)
        accuracies.append(accuracy)
        if len(losses) % 50 == 0:
            if not np.isfinite(float(loss)):
                stopped = "diverged"
                break  # diverged: the record says so (``finite`` False)
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(accuracy):.2f}")
        if stopping is not None and len(losses) % stopping.every == 0:
            score = scored_accuracy(
                model, stopping.validation, stopping.examples, run.train.batch_size
            )
            curve.append((len(losses), round(score, 4)))
            if score > best + stopping.min_delta:
                best, since_best = score, 0
            else:
                since_best += 1
            if score >= stopping.target:
                stopped = "target"
                break
            if since_best >= stopping.patience and len(losses) >= stopping.min_steps:
                stopped = "plateau"
                break
    tail = max(1, len(losses) // 10)
    train_loss = float(np.mean(jax.device_get(losses[-tail:])))
    train_accuracy = float(np.mean(jax.device_get(accuracies[-tail:])))
    train_seconds = time.perf_counter() - started
    tests = {
        label: position_accuracy(model, task, TEST_EXAMPLES, run.train.batch_size)
        for label, task in run.tests.items()
    }
    return {
        "name": run.name,
        "seed": run.train.seed,
        "config": run_config(run),
        "machine": machine(),
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "finite": bool(np.isfinite(train_loss)),
        "train_seconds": round(train_seconds, 1),
        "steps": len(losses),
        "stopped": stopped,
        "validation": curve,
        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "tests": {
            label: [None if np.isnan(a) else round(float(a), 4) for a in acc]
            for label, (acc, _) in tests.items()
        },
        "counts": {label: [int(c) for c in counts] for label, (_, counts) in tests.items()},
    }


def plain(value: Any) -> Any:
    """A dataclass (a config, a task) as plain JSON values (dtypes and the like as
    their names)."""
    return json.loads(json.dumps(dataclasses.asdict(value), default=str))


def run_config(run: Run) -> dict[str, Any]:
    """The settings that reproduce ``run``, as plain JSON values: the model, the
    training settings, the training and test tasks, and the stopping rule."""
    return {
        "model": plain(run.model),
        "train": plain(run.train),
        "task": {"kind": type(run.task).__name__, **plain(run.task)},
        "tests": {
            label: {"kind": type(task).__name__, **plain(task)} for label, task in run.tests.items()
        },
        "stopping": None if run.stopping is None else plain(run.stopping),
    }


class ResultStore:
    """Finished runs, one JSON object per line in ``path``, keyed by ``name``."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.results: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.results[record["name"]] = record

    def __contains__(self, name: str) -> bool:
        return name in self.results

    def add(self, record: dict[str, Any]) -> None:
        self.results[record["name"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def run_all(
    runs: Sequence[Run],
    store: ResultStore,
    *,
    progress: bool = True,
    describe: Callable[[Run], dict[str, Any]] = lambda run: {},
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Every run not yet in ``store`` (an interrupted experiment resumes), with a
    progress bar over runs; returns the records of all ``runs``.

    ``workers > 1`` trains that many runs at once, each in a process of its own pinned
    to one core (:func:`parallel_records`): on the 2-core VM two runs at once finish
    about 1.4× sooner than one after the other. Each record then says ``workers``, as
    its ``train_seconds`` is one core's time beside another run."""
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    todo = [run for run in runs if run.name not in store]
    workers = min(workers, len(todo), len(os.sched_getaffinity(0)))
    bar = tqdm(
        total=len(todo),
        desc="runs",
        unit="run",
        disable=not progress or not todo,
        dynamic_ncols=True,
    )
    if workers > 1:
        finished = parallel_records(todo, workers)
    else:
        finished = ((run, train_and_score(run, progress=progress)) for run in todo)
    for run, record in finished:
        extra = {"workers": workers} if workers > 1 else {}
        store.add({**record, **extra, **describe(run)})
        bar.set_postfix_str(run.name)
        bar.update()
    bar.close()
    return [store.results[run.name] for run in runs]


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    """``--workers N``: the runs trained at once (:func:`run_all`)."""
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs trained at once, each pinned to a core of its own (default 1; 2 on the "
        "2-core VM finishes about 1.4× sooner; records then say `workers`)",
    )


def parallel_records(runs: Sequence[Run], workers: int) -> Iterator[tuple[Run, dict[str, Any]]]:
    """``(run, record)`` as each of ``runs`` finishes, trained by ``workers`` spawned
    processes, each pinned to a core of its own (all its threads, so that XLA's CPU
    thread pool stays on it). A run that raises stops the rest (those finished are
    already yielded) and raises here."""
    context = multiprocessing.get_context("spawn")
    cores = context.Queue()
    for core in sorted(os.sched_getaffinity(0))[:workers]:
        cores.put(core)
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_pin_to_a_core, initargs=(cores,)
    ) as pool:
        futures = {pool.submit(_train_quietly, run): run for run in runs}
        try:
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()


def _pin_to_a_core(cores) -> None:
    """A worker's initializer: take a core from ``cores`` and pin every thread of
    this process to it (threads started later inherit it)."""
    core = cores.get()
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), {core})


def _train_quietly(run: Run) -> dict[str, Any]:
    return train_and_score(run, progress=False)


def mean_over(accuracy: Sequence[float | None], positions: range) -> float:
    """Mean accuracy over 1-based ``positions`` (unscored ones skipped)."""
    values = [
        accuracy[p - 1] for p in positions if p - 1 < len(accuracy) and accuracy[p - 1] is not None
    ]
    return float(np.mean(values)) if values else float("nan")


def overall_accuracy(record: dict[str, Any], label: str) -> float:
    """Accuracy over every scored token of test ``label`` (positions weighted by how
    many examples are scored there)."""
    accuracy, counts = record["tests"][label], record["counts"][label]
    total = sum(counts)
    return sum((a or 0.0) * c for a, c in zip(accuracy, counts)) / total if total else float("nan")
