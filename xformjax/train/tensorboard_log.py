"""TensorBoard event files of a run: the scalars of every metrics record.

:class:`TensorBoardLog` writes each record the trainer logs (the lines of
``metrics.jsonl``) as scalars ``SPLIT/NAME`` at the record's step — ``train/loss``,
``train/mfu``, ``validation/bits_per_byte`` — into ``WORKDIR/tensorboard/`` with
tensorboardX (as MaxText does; no TensorFlow needed). ``tensorboard --logdir
WORKDIR/tensorboard`` shows them. Values that are ``None`` (MFU on a CPU) are left
out.

On resume from a checkpoint at step ``S`` the event files of the earlier run(s) are
rewritten without their events after ``S`` (as ``metrics.jsonl`` drops its lines
after ``S``), then a new event file takes the steps from ``S + 1`` on: TensorBoard
reads every file of the directory as one run, so each step appears once, even when
the interrupted run had logged past its last checkpoint. (Left alone, TensorBoard
would plot both copies of those steps; tensorboardX's ``purge_step`` asks it to hide
the old ones, which not every reader honours.) A record cut short by a crash ends
that file's events.

:func:`read_scalars` reads the files back (the record framing and the ``Event``
protocol buffer that tensorboardX ships): ``{tag: [(step, value), ...]}``.
"""

from __future__ import annotations

import os
import pathlib
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

#: What TensorBoard looks for in the name of an event file.
EVENT_FILE_MARK = "tfevents"
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _masked_crc(data: bytes) -> int:
    from tensorboardX.record_writer import masked_crc32c

    return masked_crc32c(data)


def _event_class() -> Any:
    """The ``Event`` protocol buffer (generated code: its names are made at import)."""
    from tensorboardX.proto.event_pb2 import Event  # pyright: ignore[reportAttributeAccessIssue]

    return Event


def event_files(logdir: str | os.PathLike) -> list[pathlib.Path]:
    """The event files under ``logdir``, in the order TensorBoard reads them (by name:
    the creation time comes first)."""
    directory = pathlib.Path(logdir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if EVENT_FILE_MARK in p.name and p.is_file())


def _frames(data: bytes, *, check_bodies: bool = True) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each record's body in an event file: ``length (u64),
    crc(length), body, crc(body)``, little-endian. Stops at a record cut short or
    failing a checksum; ``check_bodies=False`` checks the body of the last record only
    (where a crash cuts a file: the pure-Python CRC-32C costs ~0.3 µs a byte)."""
    offset = 0
    while offset + _LENGTH.size + _CRC.size <= len(data):
        header = data[offset : offset + _LENGTH.size]
        (length,) = _LENGTH.unpack(header)
        (header_crc,) = _CRC.unpack_from(data, offset + _LENGTH.size)
        start = offset + _LENGTH.size + _CRC.size
        end = start + length
        if header_crc != _masked_crc(header) or end + _CRC.size > len(data):
            return
        last = end + _CRC.size == len(data)
        if (check_bodies or last) and _CRC.unpack_from(data, end)[0] != _masked_crc(
            data[start:end]
        ):
            return
        yield start, end
        offset = end + _CRC.size


def read_events(path: str | os.PathLike) -> list[Any]:
    """The ``Event`` protocol buffers of one event file."""
    Event = _event_class()

    data = pathlib.Path(path).read_bytes()
    return [Event.FromString(data[start:end]) for start, end in _frames(data)]


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``logdir``: ``{tag: [(step, value), ...]}`` in file order."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(logdir):
        for event in read_events(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.tensor.float_val:
                    number = float(value.tensor.float_val[0])
                else:
                    continue
                scalars.setdefault(value.tag, []).append((int(event.step), number))
    return scalars


def drop_events_after(logdir: str | os.PathLike, step: int) -> None:
    """Rewrite the event files under ``logdir`` without their summaries after ``step``
    (and without a damaged tail); each file is replaced atomically, the records kept
    copied byte for byte."""
    Event = _event_class()

    framing = _LENGTH.size + _CRC.size
    for path in event_files(logdir):
        data = path.read_bytes()
        frames = list(_frames(data, check_bodies=False))
        keep = []
        for start, end in frames:
            event = Event.FromString(data[start:end])
            if not (event.HasField("summary") and event.step > step):
                keep.append(data[start - framing : end + _CRC.size])
        valid = frames[-1][1] + _CRC.size if frames else 0
        if len(keep) == len(frames) and valid == len(data):
            continue  # nothing after `step` and no damaged tail
        temporary = path.with_name(f".rewrite-{uuid.uuid4().hex}.tmp")  # not an event file name
        temporary.write_bytes(b"".join(keep))
        os.replace(temporary, path)


class TensorBoardLog:
    """Scalars of the metrics records under ``logdir`` (see the module docstring).

    ``start_step``: the step the run resumes from (0 for a new run): later events of
    earlier runs are dropped first. Only the chief process (``enabled``) writes; a
    disabled log touches nothing and needs no tensorboardX."""

    def __init__(self, logdir: str | os.PathLike, *, start_step: int = 0, enabled: bool = True):
        self.logdir, self.enabled = pathlib.Path(logdir), enabled
        self._writer = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.logdir.mkdir(parents=True, exist_ok=True)
        drop_events_after(self.logdir, start_step)
        # tensorboardX names a file by the second it was opened and the host; the
        # suffix keeps a restart within the same second from overwriting a file
        suffix = f".{time.time_ns()}"
        self._writer = SummaryWriter(str(self.logdir), flush_secs=10, filename_suffix=suffix)

    def write(self, record: dict[str, Any]) -> None:
        """``record``'s numbers as ``SPLIT/NAME`` scalars at ``record["step"]``."""
        if self._writer is None:
            return
        split, step = record.get("split", "train"), int(record["step"])
        for name, value in record.items():
            if name in ("step", "split") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"{split}/{name}", float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (the log writes nothing more)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
