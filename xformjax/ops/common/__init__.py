"""Machinery every op shares, and nothing that belongs to one family.

* :mod:`.validation`: argument checks, dtypes, backend choice and packing
  (``Segments``); its names are re-exported here, so ``from xformjax.ops import
  common; common.fail(...)`` reads as before.
* :mod:`.value_checks`: value checks (a log-gate ≤ 0, β in [0, 2] …) that run eagerly
  and, with ``xformjax.config`` option ``check_values`` on, under ``jit``;
  ``check_values`` and ``check_finite`` are re-exported here.
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
    BETA_RANGE,
    KERNEL_DTYPES,
    LOG_GATE,
    MODES,
    Backend,
    Mode,
    Segments,
    check_beta_values,
    check_bool,
    check_chunk_size,
    check_dim,
    check_floating,
    check_key_dim,
    check_log_gate,
    check_mode,
    check_nonnegative,
    check_optional_positive_int,
    check_positive_int,
    check_rank,
    check_scalar,
    check_scale,
    check_unit_interval,
    compiling_for,
    compute_dtype,
    derive_segments,
    fail,
    fail_type,
    is_concrete,
    kernel_gap,
    make_segments,
    resolve_backend,
    round_up,
    shape_str,
    target_platform,
    warn_once,
)
from xformjax.ops.common.value_checks import check_finite, check_values

__all__ = [
    "ACCELERATORS",
    "BACKENDS",
    "BETA_RANGE",
    "KERNEL_DTYPES",
    "LOG_GATE",
    "MODES",
    "_WARNED",
    "Backend",
    "Mode",
    "Segments",
    "check_beta_values",
    "check_bool",
    "check_chunk_size",
    "check_dim",
    "check_finite",
    "check_floating",
    "check_key_dim",
    "check_log_gate",
    "check_mode",
    "check_nonnegative",
    "check_optional_positive_int",
    "check_positive_int",
    "check_rank",
    "check_scalar",
    "check_scale",
    "check_unit_interval",
    "check_values",
    "compiling_for",
    "compute_dtype",
    "derive_segments",
    "fail",
    "fail_type",
    "is_concrete",
    "kernel_gap",
    "make_segments",
    "resolve_backend",
    "round_up",
    "shape_str",
    "target_platform",
    "warn_once",
]
