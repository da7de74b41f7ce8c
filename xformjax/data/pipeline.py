"""grain pipelines: packed byte-level language-model batches and task batches.

Both return a ``grain.IterDataset``; ``iter(dataset)`` gives an iterator whose
``get_state()`` / ``set_state()`` checkpoint the exact position (shuffle order,
packing remainder included), so a resumed run sees the same batches.

Language modelling: documents (``{"text": uint8 bytes}``) are shuffled with a
seed, each followed by :data:`DOCUMENT_END` (byte 0, absent from text files),
concatenated and cut into rows of ``seq_len + 1`` bytes
(``grain.experimental.ConcatThenSplitIterDataset``, which splits a document that does
not fit into pieces, each starting at position 0 in its row). ``inputs`` are the first
``seq_len``, ``targets`` the last ``seq_len``; ``segment_ids`` (1, 2, … per document in
the row, 0 for padding) and ``positions`` (restarting at 0 with each document) describe
the inputs, as MaxText's packed batches do, so the model keeps the documents apart
(:mod:`xformjax.nn.packing`); ``mask`` is 1 where the target is a real byte of the
input's own document: a padding target, or the first byte of the next document after a
``DOCUMENT_END``, is not trained on.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

DOCUMENT_END = 0


def read_options(batch_size: int) -> grain.ReadOptions:
    """One prefetch thread holding two batches' worth of examples.

    grain's default (16 threads, 500 examples) scans its whole buffer on every
    example it hands out; with examples this cheap to make, that polling cost about
    25 ms per batch of 32 on 2 cores, more host time than a small model's training
    step."""
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size)


def _document_tokens(example: dict[str, Any]) -> dict[str, np.ndarray]:
    text = np.asarray(example["text"], np.int32)
    return {"tokens": np.concatenate([text, np.array([DOCUMENT_END], np.int32)])}


def _shift(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens, segments = example["tokens"], example["tokens_segment_ids"]
    same_document = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segments[:-1],
        "positions": example["tokens_positions"][:-1],
        "mask": same_document.astype(np.float32),
    }


def lm_dataset(
    source,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
) -> grain.IterDataset:
    """Packed ``[batch_size, seq_len]`` byte batches from a source of documents."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be ≥ 1; got {seq_len}, {batch_size}")
    dataset = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        dataset = dataset.shuffle()
    if repeat:
        dataset = dataset.repeat(None)
    dataset = dataset.map(_document_tokens).to_iter_dataset(read_options(batch_size))
    dataset = grain.experimental.ConcatThenSplitIterDataset(
        dataset, length_struct={"tokens": seq_len + 1}
    )
    return dataset.map(_shift).batch(batch_size, drop_remainder=True)


def task_dataset(
    task, *, batch_size: int, seed: int = 0, shuffle: bool = True, repeat: bool = True
) -> grain.IterDataset:
    """``[batch_size, L]`` batches of a synthetic task (see :mod:`xformjax.data.tasks`)."""
    dataset = grain.MapDataset.source(task).seed(seed)
    if shuffle:
        dataset = dataset.shuffle()
    if repeat:
        dataset = dataset.repeat(None)
    return dataset.to_iter_dataset(read_options(batch_size)).batch(batch_size, drop_remainder=True)
