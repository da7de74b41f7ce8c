"""Data: synthetic tasks, text corpora as TFDS ``array_record`` datasets, grain
pipelines with checkpointable iterators.

    >>> from xformjax import data
    >>> task = data.Parity(seed=0, max_length=16)
    >>> batch = next(iter(data.task_dataset(task, batch_size=4)))
    >>> batch["inputs"].shape, batch["targets"].shape, batch["mask"].shape
    ((4, 16), (4, 16), (4, 16))
"""

from xformjax.extras import require_extra

require_extra("train", "xformjax.data")  # before the imports that need it

# ruff: noqa: E402 (the imports below need the extra checked above)
from xformjax.data.corpus import CorpusSpec, prepare_corpus, split_files, stdlib_corpus
from xformjax.data.pipeline import DOCUMENT_END, lm_dataset, task_dataset
from xformjax.data.tasks import (
    MQAR,
    TASKS,
    ListOps,
    ModularArithmetic,
    Parity,
    Task,
    WordProblem,
    evaluate_arithmetic,
    group_elements,
)

__all__ = [
    "DOCUMENT_END",
    "MQAR",
    "TASKS",
    "CorpusSpec",
    "ListOps",
    "ModularArithmetic",
    "Parity",
    "Task",
    "WordProblem",
    "evaluate_arithmetic",
    "group_elements",
    "lm_dataset",
    "prepare_corpus",
    "split_files",
    "stdlib_corpus",
    "task_dataset",
]
