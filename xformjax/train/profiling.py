"""A ``jax.profiler`` trace of a window of training steps.

``train.profile = "START:END"`` (``xformjax train --profile START:END``) traces the
optimiser steps ``START ≤ step < END`` (steps count from 1, as in ``metrics.jsonl``)
into ``WORKDIR/profile/``: ``jax.profiler.start_trace`` before step ``START`` runs,
``stop_trace`` once step ``END − 1`` has finished (its loss fetched), each step marked
with a ``StepTraceAnnotation``. The trace lands in
``profile/plugins/profile/<time>/<host>.xplane.pb``; ``tensorboard --logdir
WORKDIR/profile`` (with the ``tensorboard-plugin-profile`` / XProf plugin) or
Perfetto shows it. The first steps of a run include compilation, so a window from
step 2 on shows the steady state.

A run resumed inside the window traces from its first step; the steps of a window
that lie beyond ``train.steps`` are not traced. In a multi-process run only the
chief process traces (every host would write ``<host>.xplane.pb`` of the same name
when the processes share one host).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

import jax


def parse_window(text: str, where: str = "train.profile") -> tuple[int, int]:
    """``"START:END"`` → ``(START, END)``, integers with ``1 ≤ START < END``; a
    ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a string 'START:END'; got {text!r}")
    start_text, colon, end_text = text.partition(":")
    try:
        if not colon:
            raise ValueError
        start, end = int(start_text), int(end_text)
    except ValueError:
        hint = (
            " (unquoted in YAML, 2:3 reads as the base-60 number 123: quote it, '2:3')"
            if text.isdigit()
            else ""
        )
        raise ValueError(
            f"{where} must be 'START:END' with integer steps, e.g. '10:15'; got {text!r}{hint}"
        ) from None
    if start < 1 or end <= start:
        raise ValueError(
            f"{where} must be 'START:END' with 1 ≤ START < END (steps count from 1); got {text!r}"
        )
    return start, end


class ProfileWindow:
    """Traces the steps of ``window`` (``(START, END)`` or ``None``: nothing) into
    ``directory``; ``enabled=False`` (a process other than the chief) traces nothing.

    Wrap each step in :meth:`step` and call :meth:`close` when the loop ends (it
    stops a trace that an error interrupted)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        window: tuple[int, int] | None,
        *,
        enabled: bool = True,
    ):
        self.directory = pathlib.Path(directory)
        self.window = window if enabled else None
        self.active = False

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """Run step ``number`` (from 1) inside the trace when it is in the window. The
        block must wait for the step's result (the trainer fetches the loss), so that
        the trace holds the step's device work."""
        if self.window is None:
            yield
            return
        start, end = self.window
        if not self.active and start <= number < end:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True
        if not self.active:
            yield
            return
        with jax.profiler.StepTraceAnnotation("train", step_num=number):
            yield
        if number >= end - 1:
            self.close()

    def close(self) -> None:
        """Stop the trace if one is running (it is written to :attr:`directory`)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
