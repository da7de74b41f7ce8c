"""Machinery every op shares, and nothing that belongs to one family.

* :mod:`.validation`: argument checks, dtypes, backend choice and packing
  (``Segments``); its names are re-exported here, so ``from xformjax.ops import
  common; common.fail(...)`` reads as before.
* :mod:`.gates`: the log-decay gate of a matrix state (``LogGate``) in its three
  layouts, used by every form of linear attention and the delta rule.
* The chunk engine of linear attention and the delta rule, by job:
  :mod:`.chunk_layout` (packing, padding, block and head-major layouts),
  :mod:`.chunk_algebra` (log-gate prefix sums, decay masks, state decays, row
  dots), :mod:`.channel_scores` (the per-key-channel gate's intra-chunk scores,
  with their own VJP) and :mod:`.chunk_scan` (the blocked scan, the one
  ``custom_vjp`` scaffold over a family's ``ChunkRule``, final states).
* :mod:`.token_scan`: the recurrent form's token-by-token driver.
"""

from xformjax.ops.common.validation import (
    _WARNED,
    ACCELERATORS,
    BACKENDS,
    KERNEL_DTYPES,
    MODES,
    Backend,
    Mode,
    Segments,
    check_chunk_size,
    check_dim,
    check_floating,
    check_log_gate,
    check_mode,
    check_rank,
    compiling_for,
    compute_dtype,
    fail,
    is_concrete,
    kernel_gap,
    make_segments,
    resolve_backend,
    round_up,
    shape_str,
    target_platform,
    warn_once,
)

__all__ = [
    "ACCELERATORS",
    "BACKENDS",
    "KERNEL_DTYPES",
    "MODES",
    "_WARNED",
    "Backend",
    "Mode",
    "Segments",
    "check_chunk_size",
    "check_dim",
    "check_floating",
    "check_log_gate",
    "check_mode",
    "check_rank",
    "compiling_for",
    "compute_dtype",
    "fail",
    "is_concrete",
    "kernel_gap",
    "make_segments",
    "resolve_backend",
    "round_up",
    "shape_str",
    "target_platform",
    "warn_once",
]
