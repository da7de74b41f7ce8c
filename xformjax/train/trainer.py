"""The training loop: data, model, optimiser, metrics, evaluation, checkpoints.

``Trainer(config, workdir).run()`` trains ``config.train.steps`` optimiser steps:

- batches come from a grain iterator (packed bytes of a text corpus, or a
  synthetic task), ``grad_accum`` micro-batches per step, scanned inside one
  jitted step;
- the loss is the masked mean cross-entropy plus ``aux_loss_weight`` × any
  ``aux_loss`` a layer's state carries (``state.aux_loss``);
- every ``log_every`` steps a JSON line goes to ``WORKDIR/metrics.jsonl`` (step,
  loss, grad norm, learning rate, tokens/s, the model's training FLOPs per token,
  MFU — ``None`` where the device's peak is unknown, as on a CPU — and bits per
  byte for text or accuracy for tasks) and the progress bar updates; every
  ``eval_every`` steps the validation split is scored. With ``train.tensorboard``
  the same records go to ``WORKDIR/tensorboard/`` as TensorBoard scalars
  (:mod:`xformjax.train.tensorboard_log`), and ``train.profile = "START:END"``
  traces those steps with ``jax.profiler`` into ``WORKDIR/profile/``
  (:mod:`xformjax.train.profiling`);
- checkpoints (async, keep-N) hold the model, optimiser, RNG and the data
  iterator's position. A run started in a WORKDIR with a checkpoint resumes from
  it, and ends with the same losses as a run that was never interrupted;
- a non-finite loss stops the run (:class:`NonFiniteLossError` names the step)
  before anything is saved, so the last checkpoint is the last good one;
- everything runs on the mesh ``config.mesh`` (:mod:`xformjax.parallel.mesh`): the
  model and optimiser are created in the shardings their logical-axis names give,
  the train step is ``jax.jit`` with explicit in/out shardings and the state
  donated, batches are split over ``(data, fsdp)`` along B and ``seq`` along T
  (the layers then run LASP-2 / LASP-2H). In a multi-process run every process
  trains and only process 0 writes ``metrics.jsonl``, ``config.yaml``, the
  TensorBoard events and the profile.

The step's pieces are module-level functions that need neither data nor devices —
:func:`data_shape`, :func:`check_divisibility`, :func:`build_state`,
:func:`batch_sharding`, :func:`train_step_fn` and :func:`jit_train_step` — so that
``xformjax aot`` (:mod:`xformjax.train.aot`) compiles the very step ``Trainer`` runs
from shapes alone, for a TPU slice this host does not have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from xformjax import config as library_config
from xformjax import data as data_lib
from xformjax.models import LanguageModel, generate, model_cost
from xformjax.parallel import BATCH_AXES, create_sharded, make_mesh, state_shardings
from xformjax.train.checkpoint import Checkpointer
from xformjax.train.config import ExperimentConfig, config_to_yaml
from xformjax.train.mfu import model_flops_utilization, peak_flops
from xformjax.train.optimizer import learning_rate_schedule, make_optimizer
from xformjax.train.profiling import ProfileWindow, parse_window
from xformjax.train.tensorboard_log import TensorBoardLog

LN2 = math.log(2.0)
#: token ids of byte-level text (one per byte value)
TEXT_VOCAB_SIZE = 256
#: the dtypes of a batch's arrays (what the data pipelines produce)
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "mask": jnp.float32}
#: what packed text batches add: the documents in each row (:mod:`xformjax.nn.packing`)
PACKING_DTYPES = {"segment_ids": jnp.int32, "positions": jnp.int32}


def batch_dtypes(is_text: bool) -> dict[str, Any]:
    """The arrays of a batch and their dtypes: text rows pack documents and carry
    their ``segment_ids`` and ``positions``; a task's rows hold one example each."""
    return {**BATCH_DTYPES, **PACKING_DTYPES} if is_text else dict(BATCH_DTYPES)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the step that produced it."""

    def __init__(self, step: int, last_checkpoint: int | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = (
            "no checkpoint was saved yet"
            if last_checkpoint is None
            else f"the last good checkpoint (step {last_checkpoint}) is kept"
        )
        super().__init__(f"non-finite loss at step {step}; stopping. {kept}")


@dataclasses.dataclass
class Datasets:
    """The run's data: iterators' datasets and what the model must know."""

    train: Any
    validation: Any
    vocab_size: int
    is_text: bool
    sequence_length: int


#: the shuffle seed of a text corpus's validation split (not the run's seed).
VALIDATION_SHUFFLE_SEED = 0


def build_datasets(config: ExperimentConfig) -> Datasets:
    """Train and validation grain datasets for ``config.data``."""
    train, data_config = config.train, config.data
    if data_config.name == "text":
        spec = (
            data_lib.stdlib_corpus()
            if data_config.path is None
            else data_lib.CorpusSpec(
                root=data_config.path,
                pattern=data_config.pattern,
                validation_fraction=data_config.validation_fraction,
                exclude=(),
            )
        )
        if data_config.path is None:
            spec = dataclasses.replace(spec, validation_fraction=data_config.validation_fraction)
        sources = data_lib.prepare_corpus(spec, data_config.data_dir)
        if len(sources["validation"]) == 0:
            raise ValueError(
                f"the corpus under {spec.root!r} has no validation file; raise "
                "data.validation_fraction or add files"
            )
        make = lambda source, seed: data_lib.lm_dataset(
            source, seq_len=train.seq_len, batch_size=train.batch_size, seed=seed
        )
        # validation is shuffled too, so that a few batches sample many files rather
        # than the first one or two, in one fixed order whatever the training seed: runs
        # with different seeds are scored on the same bytes
        return Datasets(
            make(sources["train"], train.seed),
            make(sources["validation"], VALIDATION_SHUFFLE_SEED),
            TEXT_VOCAB_SIZE,
            True,
            train.seq_len,
        )
    task_cls = data_lib.TASKS[data_config.name]
    task = task_cls(seed=train.seed, **data_config.options)
    validation_task = task_cls(**{**dataclasses.asdict(task), "seed": train.seed + 1})
    make = lambda t, shuffle: data_lib.task_dataset(
        t, batch_size=train.batch_size, seed=train.seed, shuffle=shuffle
    )
    return Datasets(
        make(task, True), make(validation_task, False), task.vocab_size, False, task.length
    )


def data_shape(config: ExperimentConfig) -> tuple[int, int]:
    """``(vocab_size, sequence_length)`` of ``config.data`` without preparing the data:
    bytes and ``train.seq_len`` for text, the task's own for a synthetic task."""
    if config.data.name == "text":
        return TEXT_VOCAB_SIZE, config.train.seq_len
    task = data_lib.TASKS[config.data.name](seed=config.train.seed, **config.data.options)
    return task.vocab_size, task.length


def check_divisibility(mesh_shape: dict[str, int], batch_size: int, sequence_length: int) -> None:
    """Raise ``ValueError`` unless the batch divides over ``data × fsdp`` and the
    sequence over ``seq`` (the split :func:`batch_sharding` makes)."""
    batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
    if batch_size % batch_shards:
        raise ValueError(
            f"train.batch_size={batch_size} must divide over mesh.data × mesh.fsdp = {batch_shards}"
        )
    if sequence_length % mesh_shape["seq"]:
        raise ValueError(
            f"the sequence length {sequence_length} must divide over mesh.seq = {mesh_shape['seq']}"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[grad_accum, B, T]`` batches: B split over ``(data, fsdp)``, T over ``seq``."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, "seq"))


def build_model(config: ExperimentConfig, vocab_size: int) -> LanguageModel:
    model_config = config.model
    if model_config.vocab_size != vocab_size:
        model_config = dataclasses.replace(model_config, vocab_size=vocab_size)
    return LanguageModel(model_config, rngs=nnx.Rngs(config.train.seed))


def loss_and_metrics(
    model: LanguageModel, batch: dict[str, jax.Array], aux_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked mean cross-entropy (+ auxiliary losses) and accuracy of one batch.

    A packed batch (with ``segment_ids`` and ``positions``) keeps its documents apart;
    its ``mask`` leaves out padding and targets in the next document."""
    logits, states = model(
        batch["inputs"], segment_ids=batch.get("segment_ids"), positions=batch.get("positions")
    )
    log_probs = jax.nn.log_softmax(logits, -1)
    targets = batch["targets"].astype(jnp.int32)
    mask = batch["mask"].astype(jnp.float32)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    count = jnp.maximum(jnp.sum(mask), 1.0)
    cross_entropy = jnp.sum(nll * mask) / count
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    accuracy = jnp.sum(correct * mask) / count
    losses = (getattr(state, "aux_loss", None) for state in states)
    # (summed: under scan_layers a state is stacked over the rounds)
    aux = sum((jnp.sum(loss) for loss in losses if loss is not None), jnp.zeros(()))
    loss = cross_entropy + aux_weight * aux
    return loss, {"cross_entropy": cross_entropy, "accuracy": accuracy, "aux_loss": aux}


def build_state(config: ExperimentConfig, vocab_size: int) -> tuple[LanguageModel, nnx.Optimizer]:
    """The model and its optimiser (what the train step updates); run it inside
    :func:`~xformjax.parallel.create_sharded`, or ``nnx.eval_shape`` for its shapes."""
    model = build_model(config, vocab_size)
    return model, nnx.Optimizer(model, make_optimizer(config.train), wrt=nnx.Param)


def train_step_fn(graphdef: nnx.GraphDef, aux_weight: float, state: nnx.State, batches):
    """One optimiser step: ``state`` (model and optimiser, split by ``graphdef``) and
    ``[grad_accum, B, T]`` batches → ``(new state, metrics)``. The micro-batches are
    scanned, their gradients averaged, then the optimiser applied once."""
    model, optimizer = nnx.merge(graphdef, state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(params, rest, batch):
        module = nnx.merge(graphdef, params, rest)
        loss, metrics = loss_and_metrics(module, batch, aux_weight)
        # non-parameter state the forward updated (σReparam's power iteration)
        return loss, (metrics, nnx.state(module, nnx.Not(nnx.Param)))

    def micro(carry, batch):
        grads, totals, rest = carry
        (loss, (metrics, rest)), micro_grads = jax.value_and_grad(loss_of, has_aux=True)(
            params, rest, batch
        )
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        totals = jax.tree.map(jnp.add, totals, {"loss": loss, **metrics})
        return (grads, totals, rest), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    totals = {k: jnp.zeros(()) for k in ("loss", "cross_entropy", "accuracy", "aux_loss")}
    (grads, totals, rest), _ = jax.lax.scan(micro, (zeros, totals, rest), batches)
    nnx.update(model, rest)
    count = batches["inputs"].shape[0]
    grads = jax.tree.map(lambda g: g / count, grads)
    metrics = {k: v / count for k, v in totals.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics


def jit_train_step(
    graphdef: nnx.GraphDef, state_sharding: Any, mesh: Mesh, aux_weight: float
) -> Callable:
    """:func:`train_step_fn` jitted with explicit shardings: the state in
    ``state_sharding`` (its logical-axis placement), donated; batches as
    :func:`batch_sharding`; metrics replicated. ``xformjax train`` runs it;
    ``xformjax aot`` compiles it for a TPU slice."""
    return jax.jit(
        functools.partial(train_step_fn, graphdef, aux_weight),
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; on resume drops lines after the step.
    Only the chief process (``enabled``) writes in a multi-process run."""

    def __init__(self, path: pathlib.Path, *, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


class Trainer:
    """One run in ``workdir`` (see the module docstring)."""

    def __init__(
        self, config: ExperimentConfig, workdir: str | pathlib.Path, *, progress: bool = True
    ):
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.is_chief = jax.process_index() == 0  # writes logs; every process trains
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.progress = progress and self.is_chief
        self.datasets = build_datasets(config)
        self.mesh = make_mesh(config.mesh.shape)
        check_divisibility(
            dict(zip(self.mesh.axis_names, self.mesh.axis_sizes)),
            config.train.batch_size,
            self.datasets.sequence_length,
        )
        vocab_size = self.datasets.vocab_size
        # parameters and optimiser states are created in their shardings
        self.model, self.optimizer = create_sharded(
            lambda: build_state(config, vocab_size), self.mesh
        )
        self.schedule = learning_rate_schedule(config.train)
        # nothing in training draws from it yet (no dropout); it is checkpointed so
        # that a stochastic addition stays resumable
        self.rng = jax.random.key(config.train.seed)
        self.checkpointer = Checkpointer(
            self.workdir / "checkpoints",
            keep=config.train.keep_checkpoints,
            every=config.train.checkpoint_every,
        )
        self.metrics = MetricsLog(self.workdir / "metrics.jsonl", enabled=self.is_chief)
        self.board: TensorBoardLog | None = None  # opened by `run` at its first step
        # MFU: the model's training FLOPs per token (3 forward passes: forward and a
        # backward of twice its cost) against the mesh devices' dense bf16 peak
        self.flops_per_token = model_cost(
            self.model, self.datasets.sequence_length
        ).train_flops_per_token
        self.device_kind = str(self.mesh.devices.flat[0].device_kind)
        self.peak_flops = peak_flops(self.device_kind)
        self._live = None
        self._compile_steps()

    # -- set-up ---------------------------------------------------------------------------
    def _compile_steps(self) -> None:
        """The jitted steps, with explicit shardings: the state (model and optimiser)
        as its logical-axis rules place it, donated to the train step; batches split
        over ``(data, fsdp)`` along B and over ``seq`` along T; metrics replicated."""
        mesh = self.mesh
        self.graphdef, state = nnx.split((self.model, self.optimizer))
        self.state_sharding = state_shardings(state, mesh)
        model_sharding = state_shardings(nnx.state(self.model), mesh)
        self.model_graphdef = nnx.graphdef(self.model)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = batch_sharding(mesh)
        eval_batch = NamedSharding(mesh, PartitionSpec(BATCH_AXES, "seq"))
        aux_weight = self.config.train.aux_loss_weight
        self._step_fn = functools.partial(train_step_fn, self.graphdef, aux_weight)
        # With xformjax.config's check_values on, the steps check their values (tokens,
        # gates) in the compiled program and raise on a failure.
        self._train_step = library_config.checked_if_on(
            jit_train_step(self.graphdef, self.state_sharding, mesh, aux_weight)
        )
        self._eval_step = library_config.checked_if_on(
            jax.jit(
                self._eval_fn, in_shardings=(model_sharding, eval_batch), out_shardings=replicated
            )
        )

    def _place(self, batches: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
        """Stack micro-batches into ``[accum, B, T]`` global arrays (each process
        supplies the blocks its devices hold; every process reads the same batch)."""
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        sharding = self.batch_sharding
        return {
            k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in stacked.items()
        }

    def train_step(self, batches: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """One optimiser step on ``[grad_accum, B, T]`` batches (placed by the mesh).

        The model and optimiser are updated in place. Their variables are looked up
        once (:meth:`_live_state`) rather than by a walk of the module graph every
        step, which would cost as much host time as a small model's step."""
        live, variables = self._live_state()
        with jax.set_mesh(self.mesh):
            state, metrics = self._train_step(live, batches)
        values = jax.tree.leaves(state)
        if len(values) != len(variables):  # pragma: no cover - a variable was added
            raise RuntimeError("the model's variables changed during training")
        for variable, value in zip(variables, values):
            variable.set_value(value)
        return metrics

    def _live_state(self) -> tuple[nnx.State, list[nnx.Variable]]:
        """``nnx.state((model, optimizer))`` and its variables (the live ones: writing
        a variable's value updates the model), computed on first use."""
        if self._live is None:
            state = nnx.state((self.model, self.optimizer))
            variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
            self._live = state, variables
        return self._live

    # -- jitted steps ----------------------------------------------------------------------
    def _eval_fn(self, model_state, batch):
        model = nnx.merge(self.model_graphdef, model_state)
        _, metrics = loss_and_metrics(model, batch, 0.0)
        return metrics

    # -- evaluation, sampling ------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean validation metrics over ``eval_batches`` fixed batches."""
        iterator = iter(self.datasets.validation)
        totals: dict[str, float] = {}
        for _ in range(self.config.train.eval_batches):
            batch = {k: v[0] for k, v in self._place([next(iterator)]).items()}
            with jax.set_mesh(self.mesh):
                metrics = self._eval_step(nnx.state(self.model), batch)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        means = {k: v / self.config.train.eval_batches for k, v in totals.items()}
        result = {"loss": means["cross_entropy"]}
        if self.datasets.is_text:
            result["bits_per_byte"] = means["cross_entropy"] / LN2
        else:
            result["accuracy"] = means["accuracy"]
        return result

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """Text generated from ``prompt`` (bytes in, bytes out; text corpora only)."""
        prompt = self.config.train.sample_prompt if prompt is None else prompt
        count = self.config.train.sample_tokens if max_new_tokens is None else max_new_tokens
        tokens = np.frombuffer(prompt.encode(), np.uint8).astype(np.int32)[None]
        new = generate(
            self.model,
            jnp.asarray(tokens),
            count,
            temperature=0.8,
            top_k=40,
            seed=self.config.train.seed,
        )
        return prompt + bytes(np.asarray(new[0], np.uint8)).decode("utf-8", errors="replace")

    # -- the loop -------------------------------------------------------------------------
    def restore_or_start(self) -> tuple[int, Any]:
        """Resume from the latest checkpoint if there is one; returns the step and
        the positioned training iterator."""
        iterator = iter(self.datasets.train)
        latest = self.checkpointer.latest_step()
        if latest is None:
            if self.is_chief:
                (self.workdir / "config.yaml").write_text(config_to_yaml(self.config))
            return 0, iterator
        step, self.rng, data_state = self.checkpointer.restore(self.model, self.optimizer)
        self._live = None  # the restore may have replaced variables
        iterator.set_state(data_state)
        self.metrics.truncate_after(step)
        return step, iterator

    def _log(self, record: dict[str, Any]) -> None:
        """One record to ``metrics.jsonl`` and, if open, the TensorBoard events."""
        self.metrics.write(record)
        if self.board is not None:
            self.board.write(record)

    def run(self) -> dict[str, Any]:
        """Train to ``config.train.steps``; returns the final validation metrics."""
        train = self.config.train
        step, iterator = self.restore_or_start()
        self.board = board = TensorBoardLog(
            self.workdir / "tensorboard",
            start_step=step,
            enabled=self.is_chief and train.tensorboard,
        )
        profile = ProfileWindow(
            self.workdir / "profile",
            None if train.profile is None else parse_window(train.profile),
            enabled=self.is_chief,
        )
        bar = tqdm(
            total=train.steps,
            initial=step,
            disable=not self.progress,
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )
        tokens_per_step = train.batch_size * train.grad_accum * self.datasets.sequence_length
        last_time, last_step = time.perf_counter(), step
        try:
            while step < train.steps:
                with profile.step(step + 1):  # traced when in train.profile's window
                    batch = self._place([next(iterator) for _ in range(train.grad_accum)])
                    metrics = self.train_step(batch)
                    loss = float(metrics["loss"])  # waits for the step
                step += 1
                if not math.isfinite(loss):
                    self.checkpointer.wait()
                    raise NonFiniteLossError(step, self.checkpointer.latest_step())
                bar.update(1)
                if step % train.log_every == 0 or step == train.steps:
                    now = time.perf_counter()
                    record = self._train_record(
                        step, metrics, tokens_per_step * (step - last_step) / (now - last_time)
                    )
                    self._log(record)
                    mfu = record["mfu"]
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        lr=f"{record['learning_rate']:.2e}",
                        tok_s=f"{record['tokens_per_second']:,.0f}",
                        mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%",
                    )
                    last_time, last_step = now, step
                if step % train.eval_every == 0 and step != train.steps:
                    self._log({"step": step, "split": "validation", **self.evaluate()})
                self.checkpointer.save(
                    step,
                    self.model,
                    self.optimizer,
                    self.rng,
                    iterator.get_state(),
                    force=step == train.steps,
                )
        except BaseException:
            board.close()  # what was logged stays readable
            raise
        finally:
            bar.close()
            profile.close()  # a trace cut short by an error is still written
            self.checkpointer.wait()
        final = self.evaluate()
        self._log({"step": step, "split": "validation", **final})
        board.close()
        self.checkpointer.close()
        return final

    def _train_record(self, step: int, metrics, tokens_per_second: float) -> dict[str, Any]:
        record = {
            "step": step,
            "split": "train",
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "learning_rate": float(np.asarray(self.schedule(step - 1))),
            "tokens_per_second": tokens_per_second,
            "model_flops_per_token": self.flops_per_token,
            "mfu": model_flops_utilization(
                self.flops_per_token, tokens_per_second, self.peak_flops, self.mesh.devices.size
            ),
        }
        if self.datasets.is_text:
            record["bits_per_byte"] = float(metrics["cross_entropy"]) / LN2
        else:
            record["accuracy"] = float(metrics["accuracy"])
        if float(metrics["aux_loss"]):
            record["aux_loss"] = float(metrics["aux_loss"])
        return record
