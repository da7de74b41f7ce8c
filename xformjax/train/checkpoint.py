"""Checkpoints with orbax's ``CheckpointManager``: async, keep-N, atomic.

A checkpoint holds the model's state, the optimiser's state (step count
included), the run's RNG key and the data iterator's state (JSON), so a run
restarted from it sees exactly the batches it would have seen.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


class Checkpointer:
    """Saves and restores ``(model, optimizer, rng, data state)`` under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int, every: int):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(pathlib.Path(directory).resolve(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        rng: jax.Array,
        data_state: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start an async save at ``step`` (if the interval says so, or ``force``).

        Nothing is gathered on the steps the interval skips (this runs every step)."""
        if not force and not self.manager.should_save(step):
            return False
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model)),
            optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
            rng=ocp.args.JaxRandomKeySave(rng),
            data=ocp.args.JsonSave(data_state),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(
        self, model: nnx.Module, optimizer: nnx.Optimizer, step: int | None = None
    ) -> tuple[int, jax.Array, dict[str, Any]]:
        """Load ``step`` (the latest if ``None``) into ``model`` and ``optimizer``;
        returns ``(step, rng, data_state)``."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(abstract(nnx.state(model))),
                optimizer=ocp.args.StandardRestore(abstract(nnx.state(optimizer))),
                rng=ocp.args.JaxRandomKeyRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        return step, restored["rng"], restored["data"]

    def restore_model(self, model: nnx.Module, step: int | None = None) -> int:
        """Load only the model's weights (evaluation, generation)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model))
        restored = self.manager.restore(
            step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract))
        )
        nnx.update(model, restored["model"])
        return step

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
