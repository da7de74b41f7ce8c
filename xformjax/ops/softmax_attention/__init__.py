"""``softmax_attention`` and ``sigmoid_attention``: causal or bidirectional,
sliding-window, grouped-query, packed; parallel, blockwise and decoding forms.

For every batch row and query head, over the keys ``j`` visible from query ``i``
(``M_ij``: same document — ``cu_seqlens`` sequence or ``segment_ids`` —, ``j ≤ i``
if causal, inside the window)::

    softmax:  o_i = Σ_j softmax_j(scale · q_i·k_j) v_j
    sigmoid:  o_i = Σ_j σ(scale · q_i·k_j + b_i) v_j

Where each form lives:

* ``masking.py``: which keys a query sees (``AttentionMask``) and sigmoid
  attention's default bias ``b_i``;
* ``parallel.py``: the masked T×T scores (quadratic);
* ``chunk.py``: the blockwise (flash-attention) form with its own backward,
  O(T·C) memory;
* ``recurrent.py``: one query at a time against a KV cache (decoding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xformjax.ops import common
from xformjax.ops.common.validation import Backend, Mode
from xformjax.ops.softmax_attention.chunk import attention_chunk
from xformjax.ops.softmax_attention.masking import (
    AttentionMask,
    query_ids,
    sequence_ids,
    sigmoid_bias,
)
from xformjax.ops.softmax_attention.parallel import attention_parallel
from xformjax.ops.softmax_attention.recurrent import attention_recurrent

__all__ = ["AttentionMask", "sigmoid_attention", "softmax_attention"]

_FORMS = {"parallel": attention_parallel, "recurrent": attention_recurrent}


def _check_segment_ids(op, segment_ids, cu_seqlens, batch: int, num_keys: int):
    """``segment_ids``: ``None`` or an integer array ``[B, Tk]`` (not with ``cu_seqlens``)."""
    if segment_ids is None:
        return None
    if cu_seqlens is not None:
        common.fail(op, "pass either `segment_ids` or `cu_seqlens`, not both")
    if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        got = getattr(segment_ids, "dtype", type(segment_ids).__name__)
        common.fail_type(op, f"`segment_ids` must be an integer array [B, Tk]; got {got}")
    common.check_rank(op, "segment_ids", segment_ids, ["B", "Tk"])
    common.check_dim(op, "segment_ids", segment_ids, 0, batch, "B of `q`")
    common.check_dim(op, "segment_ids", segment_ids, 1, num_keys, "Tk of `k`")
    return jnp.asarray(segment_ids, jnp.int32)


def _validate(op, q, k, v, causal, window, cu_seqlens):
    common.check_rank(op, "q", q, ["B", "Tq", "Hq", "D"])
    common.check_rank(op, "k", k, ["B", "Tk", "Hkv", "D"])
    common.check_rank(op, "v", v, ["B", "Tk", "Hkv", "V"])
    for name, x in (("q", q), ("k", k), ("v", v)):
        common.check_floating(op, name, x)
    batch, num_queries, q_heads, dim = q.shape
    num_keys, kv_heads = k.shape[1], k.shape[2]
    if num_queries == 0 or num_keys == 0:
        common.fail(
            op,
            f"T=0 is not allowed: `q` has shape {common.shape_str(q)} and `k` "
            f"{common.shape_str(k)}",
        )
    common.check_key_dim(op, "q", q, label="D")
    common.check_dim(op, "k", k, 0, batch, f"B of `q` {common.shape_str(q)}")
    common.check_dim(op, "k", k, 3, dim, f"D of `q` {common.shape_str(q)}")
    for axis, what in ((0, "B"), (1, "Tk"), (2, "Hkv")):
        common.check_dim(op, "v", v, axis, k.shape[axis], f"{what} of `k` {common.shape_str(k)}")
    if q_heads % kv_heads:
        common.fail(
            op,
            f"query heads Hq={q_heads} (`q` {common.shape_str(q)}) must be a "
            f"multiple of key/value heads Hkv={kv_heads} (`k` {common.shape_str(k)})",
        )
    if num_queries > num_keys:
        common.fail(
            op,
            f"`q` has more tokens (Tq={num_queries}) than `k` (Tk={num_keys}); "
            "queries occupy the last Tq key positions",
        )
    common.check_bool(op, "causal", causal)
    common.check_optional_positive_int(op, "window", window)
    segments = common.make_segments(op, cu_seqlens, batch, num_keys)
    if segments is not None and num_queries != num_keys:
        common.fail(
            op,
            f"packed sequences need Tq == Tk; got `q` {common.shape_str(q)} and "
            f"`k` {common.shape_str(k)}",
        )
    return segments


def _check_kv_length(op, kv_length, mode, cu_seqlens, num_queries, num_keys):
    if kv_length is None:
        return num_keys - num_queries
    if mode == "chunk":
        common.fail(
            op,
            "`kv_length` (a partly filled cache) needs mode='parallel' or "
            "'recurrent'; got mode='chunk'",
        )
    if cu_seqlens is not None:
        common.fail(op, "`kv_length` cannot be combined with `cu_seqlens`")
    if isinstance(kv_length, (jax.Array, np.ndarray)):
        if not jnp.issubdtype(kv_length.dtype, jnp.integer) or kv_length.ndim:
            common.fail_type(
                op,
                f"`kv_length` must be an int or a 0-d integer array; got an array of "
                f"dtype {kv_length.dtype} and shape {common.shape_str(kv_length)}",
            )
    elif isinstance(kv_length, (bool, np.bool_)) or not isinstance(kv_length, (int, np.integer)):
        common.fail_type(
            op, f"`kv_length` must be an int or a 0-d integer array; got {kv_length!r}"
        )
    if common.is_concrete(kv_length):
        length = int(kv_length)
        if not num_queries <= length <= num_keys:
            common.fail(
                op, f"`kv_length`={length} must lie in [Tq, Tk] = [{num_queries}, {num_keys}]"
            )
    else:
        common.check_values(
            op,
            "kv_length",
            kv_length,
            lambda n, xp: (n >= num_queries) & (n <= num_keys),
            f"in [Tq, Tk] = [{num_queries}, {num_keys}]",
        )
    return jnp.asarray(kv_length, jnp.int32) - num_queries


def _check_bias(op, bias, batch: int, num_queries: int):
    """Sigmoid attention's ``bias``: ``None``, a number, or an array ``[Tq]`` or
    ``[B, Tq]`` (one per query); returned as given (a Python number, or a jax array)."""
    if bias is None:
        return None
    what = "None, a number or an array [Tq]"  # or [B, Tq]: the shape check says so
    if isinstance(bias, (jax.Array, np.ndarray)):
        if not jnp.issubdtype(bias.dtype, jnp.number):
            common.fail_type(op, f"`bias` must be {what}; got an array of dtype {bias.dtype}")
    elif isinstance(bias, (bool, np.bool_)) or not isinstance(
        bias, (int, float, np.integer, np.floating)
    ):
        common.fail_type(op, f"`bias` must be {what}; got {bias!r}")
    common.check_finite(op, "bias", bias)
    if not isinstance(bias, (jax.Array, np.ndarray)):
        return float(bias)
    if tuple(jnp.shape(bias)) not in ((), (num_queries,), (batch, num_queries)):
        common.fail(
            op,
            f"`bias` must be a scalar or have shape [B, Tq] = [{batch}, {num_queries}] or "
            f"shape [Tq] = [{num_queries}]; got shape {list(jnp.shape(bias))}",
        )
    return jnp.asarray(bias)


def _attention(
    op,
    kind,
    q,
    k,
    v,
    *,
    causal,
    scale,
    window,
    cu_seqlens,
    mode,
    chunk_size,
    backend,
    bias=None,
    kv_length=None,
    segment_ids=None,
):
    common.check_mode(op, mode)
    chunk_size = common.check_chunk_size(op, chunk_size)
    common.resolve_backend(op, backend)
    segments = _validate(op, q, k, v, causal, window, cu_seqlens)
    segment_ids = _check_segment_ids(op, segment_ids, cu_seqlens, q.shape[0], k.shape[1])
    common.check_scale(op, scale)
    q_offset = _check_kv_length(op, kv_length, mode, cu_seqlens, q.shape[1], k.shape[1])
    if kind == "sigmoid":
        bias = _check_bias(op, bias, q.shape[0], q.shape[1])
    out_dtype = jnp.result_type(q, k, v)
    dtype = common.compute_dtype(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.astype(dtype) * jnp.asarray(scale, dtype)
    k, v = k.astype(dtype), v.astype(dtype)
    num_queries, num_keys = q.shape[1], k.shape[1]
    mask = AttentionMask(causal=causal, window=window, q_offset=q_offset, kv_length=kv_length)
    k_seq = sequence_ids(segments, segment_ids, num_keys)  # [Bs, Tk], Bs = B or 1
    q_seq = query_ids(k_seq, q_offset, num_queries)
    q_bias = (
        sigmoid_bias(segments, segment_ids, q_seq, k_seq, kv_length, bias, dtype)
        if kind == "sigmoid"
        else None
    )
    if mode == "chunk":
        o = attention_chunk(q, k, v, kind, mask, q_seq, k_seq, q_bias, chunk_size)
    else:
        o = _FORMS[mode](q, k, v, kind, mask, q_seq, k_seq, q_bias)
    return o.astype(out_dtype)


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    cu_seqlens: jax.Array | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 128,
    backend: Backend | None = None,
    kv_length: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, None]:
    """Softmax attention ``o_i = Σ_j softmax_j(scale·q_i·k_j) v_j`` over visible keys.

    Args:
      q: ``[B, Tq, Hq, D]``; the queries sit at the last ``Tq`` key positions.
      k: ``[B, Tk, Hkv, D]``, ``v``: ``[B, Tk, Hkv, V]``; ``Hq`` a multiple of
        ``Hkv`` (grouped-query attention).
      causal: attend only to keys at or before the query's position (a bool).
      scale: a finite number > 0 (or a 0-d array; it is a temperature: negate ``q``
        to flip its sign); defaults to ``D ** -0.5``.
      window: if set, a positive int: only keys with ``i − j < window``
        (``|i − j|`` when not causal).
      cu_seqlens: int ``[N+1]`` packed sequences (``B == 1``, ``Tq == Tk``).
      segment_ids: int ``[B, Tk]``, documents packed in each row: the document of
        every key position (any integers; equal ids ⇔ same document). A query, which
        sits at a key position, attends only to keys with its own id (masked before
        the exponential; it always sees itself, so no row is empty). Works in every
        mode, with ``window`` (measured in key positions, so within a document),
        grouped-query heads and ``kv_length`` (a KV cache that remembers each cached
        key's document); not with ``cu_seqlens`` (``B == 1`` only, the older form).
      mode: ``"chunk"`` (blockwise online softmax, O(T·C) memory forward and
        backward), ``"parallel"`` (full Tq×Tk matrix) or ``"recurrent"`` (one
        query at a time against the KV cache: decoding when ``Tq == 1``).
      chunk_size: block size of the chunk form.
      backend: ``None`` or ``"xla"``.
      kv_length: for a fixed-capacity KV cache: only the first ``kv_length`` keys
        are filled and the queries sit at positions ``kv_length − Tq … kv_length − 1``
        (an int or a 0-d integer array, may be traced; in ``[Tq, Tk]``; modes
        ``"parallel"`` and ``"recurrent"``). Sigmoid attention's default bias then
        uses ``n = kv_length`` (with ``segment_ids``: the filled keys of the query's
        document).

    Raises:
      ValueError: a malformed argument (shapes, ``D = 0``, ``scale`` ≤ 0 or not
        finite, ``window`` < 1, bad ``cu_seqlens``, ``segment_ids`` or ``kv_length``;
        ``segment_ids`` with ``cu_seqlens``), named in the
        message; value checks of traced arguments run under ``jit`` only with
        ``xformjax.config`` option ``check_values`` on.
      TypeError: an argument of the wrong type (``causal="yes"``, ``scale="a"``,
        float ``segment_ids``).

    Returns:
      ``(o, None)``: ``o`` is ``[B, Tq, Hq, V]`` in the inputs' dtype, computed in
      ``promote(dtype, float32)``. The second entry keeps the ops' ``(o, state)``
      shape; the KV cache is the caller's to keep.

    Example:
      >>> import jax.numpy as jnp
      >>> from xformjax import ops
      >>> q = jnp.ones((1, 10, 4, 8)); kv = jnp.ones((1, 10, 2, 8))
      >>> o, _ = ops.softmax_attention(q, kv, kv, window=4)
      >>> o.shape
      (1, 10, 4, 8)
    """
    o = _attention(
        "softmax_attention",
        "softmax",
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        window=window,
        cu_seqlens=cu_seqlens,
        mode=mode,
        chunk_size=chunk_size,
        backend=backend,
        kv_length=kv_length,
        segment_ids=segment_ids,
    )
    return o, None


def sigmoid_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: float | jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    cu_seqlens: jax.Array | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 128,
    backend: Backend | None = None,
    kv_length: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, None]:
    """Sigmoid attention ``o_i = Σ_j σ(scale·q_i·k_j + b) v_j`` over visible keys.

    ``b`` defaults to ``−log n``, n the sequence length (``Tk``, or the number of
    keys in the query's own document: its ``cu_seqlens`` sequence, or the keys sharing
    its ``segment_ids``), as in "Theory, Analysis, and Best Practices for Sigmoid
    Self-Attention". ``bias`` may also be a number, or an array ``[Tq]`` or ``[B, Tq]``
    with one bias per query (the ``sigmoid_attn`` layer's default depends on each
    query's position); it must be finite (``ValueError``), and a number or a numeric
    array (``TypeError`` otherwise). Every other argument as :func:`softmax_attention`.
    """
    o = _attention(
        "sigmoid_attention",
        "sigmoid",
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        window=window,
        cu_seqlens=cu_seqlens,
        mode=mode,
        chunk_size=chunk_size,
        backend=backend,
        bias=bias,
        kv_length=kv_length,
        segment_ids=segment_ids,
    )
    return o, None
