"""Parallelism: LASP-2 sequence parallelism (:func:`sequence_parallel`)."""

from xformjax.parallel.lasp import sequence_parallel

__all__ = ["sequence_parallel"]
