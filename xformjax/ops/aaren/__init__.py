"""``aaren``: softmax attention with a time-constant query as a prefix scan
("Attention as an RNN", Feng et al. 2024).

With one query ``q`` per (batch row, head) the scores ``s_i = scale · q·k_i`` are
per-token scalars, and causal softmax attention::

    o_t = Σ_{i≤t} exp(s_i − m_t) v_i / Σ_{i≤t} exp(s_i − m_t),    m_t = max_{i≤t} s_i

is the read-out ``u_t / w_t`` of the running summary ``(m_t, u_t, w_t)``, which
is updated with the associative operator of :mod:`xformjax.ops.aaren.state`.
So the many-to-many output can be computed as a parallel prefix scan, in chunks,
or as an RNN that stores three small numbers per head instead of a KV cache.
Packed documents (``segment_ids``) restart the summary where each one begins, in
every form (a segmented scan, :func:`~xformjax.ops.aaren.state.combine_segmented`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from xformjax.ops import common
from xformjax.ops.aaren.forms import aaren_chunk, aaren_parallel, aaren_recurrent
from xformjax.ops.aaren.state import AarenState, combine, empty_state
from xformjax.ops.common.validation import Backend, Mode

__all__ = ["AarenState", "aaren", "combine", "empty_state"]

OP = "aaren"


def _validate_sequences(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        common.check_floating(OP, name, x)
    common.check_rank(OP, "k", k, ["B", "T", "H", "K"])
    common.check_rank(OP, "v", v, ["B", "T", "H", "V"])
    batch, length, heads, key_dim = k.shape
    if length == 0:
        common.fail(
            OP, f"`k` has T=0 tokens (shape {common.shape_str(k)}); at least one token is needed"
        )
    common.check_key_dim(OP, "k", k)
    for axis, what in ((0, "B"), (1, "T"), (2, "H")):
        common.check_dim(OP, "v", v, axis, k.shape[axis], f"{what} of `k` {common.shape_str(k)}")
    layouts = {
        2: ("[H, K]", (heads, key_dim)),
        3: ("[B, H, K]", (batch, heads, key_dim)),
        4: ("[B, T, H, K]", (batch, length, heads, key_dim)),
    }
    if jnp.ndim(q) not in layouts:
        common.fail(
            OP,
            "`q` must be [H, K] or [B, H, K] (one query per head, constant over "
            "time) or [B, T, H, K] (the query scoring each token); got shape "
            f"{common.shape_str(q)}",
        )
    layout, expected = layouts[jnp.ndim(q)]
    if tuple(jnp.shape(q)) != expected:
        common.fail(
            OP,
            f"`q` must have shape {layout} = {expected} to match `k` "
            f"{common.shape_str(k)}; got {common.shape_str(q)}",
        )


def _validate_state(initial_state, batch: int, heads: int, value_dim: int) -> AarenState | None:
    if initial_state is None:
        return None
    if not isinstance(initial_state, Sequence) or len(initial_state) != 3:
        common.fail(
            OP,
            "`initial_state` must be an AarenState (max [B, H], numerator "
            f"[B, H, V], denominator [B, H]); got {type(initial_state).__name__}",
        )
    state = AarenState(*initial_state)
    expected = {
        "max": (batch, heads),
        "numerator": (batch, heads, value_dim),
        "denominator": (batch, heads),
    }
    for name, x in zip(AarenState._fields, state):
        common.check_floating(OP, f"initial_state.{name}", x)
        if tuple(jnp.shape(x)) != expected[name]:
            common.fail(
                OP,
                f"`initial_state.{name}` must have shape {expected[name]} "
                f"(B, H{', V' if name == 'numerator' else ''} of `k`/`v`); "
                f"got {common.shape_str(x)}",
            )
    return state


def _document_starts(segment_ids, batch: int, length: int) -> jax.Array | None:
    """bool ``[B, T]``: the token's id differs from the previous token's (never token 0)."""
    if segment_ids is None:
        return None
    if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        got = getattr(segment_ids, "dtype", type(segment_ids).__name__)
        common.fail_type(OP, f"`segment_ids` must be an integer array [B, T]; got {got}")
    common.check_rank(OP, "segment_ids", segment_ids, ["B", "T"])
    common.check_dim(OP, "segment_ids", segment_ids, 0, batch, "B of `k`")
    common.check_dim(OP, "segment_ids", segment_ids, 1, length, "T of `k`")
    ids = jnp.asarray(segment_ids)
    return jnp.concatenate([jnp.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """``s [B, T, H]``: each token's key against its query (``q`` pre-scaled)."""
    if q.ndim == 2:
        return jnp.einsum("hk,bthk->bth", q, k)
    if q.ndim == 3:
        return jnp.einsum("bhk,bthk->bth", q, k)
    return jnp.einsum("bthk,bthk->bth", q, k)


def aaren(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    initial_state: AarenState | Sequence[jax.Array] | None = None,
    output_final_state: bool = False,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    backend: Backend | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, AarenState | None]:
    """Aaren: causal softmax attention of a time-constant query, as an RNN.

    For every batch row and head, with scores ``s_i = scale · q·k_i``::

        m_t = max(m_{t-1}, s_t)
        u_t = u_{t-1} · exp(m_{t-1} − m_t) + v_t · exp(s_t − m_t)       [V]
        w_t = w_{t-1} · exp(m_{t-1} − m_t) +       exp(s_t − m_t)
        o_t = u_t / w_t = Σ_{i≤t} softmax_i(s) v_i

    starting from ``initial_state`` (the empty summary ``(−inf, 0, 0)`` by default).
    This equals :func:`xformjax.ops.softmax_attention` (causal) with the query
    repeated at every position, at O(V) memory per head instead of a KV cache.

    Args:
      q: the query, ``[H, K]`` (shared by the batch, e.g. a learned parameter) or
        ``[B, H, K]``: the same at every step, as in the paper. ``[B, T, H, K]``
        is accepted too and then token ``i``'s score is ``scale · q_i·k_i`` (its
        key against the query at its own position); with a query that varies
        over time this is *not* causal attention of ``q_t`` (that needs the KV
        cache), but it is exact, and identical to the shared-query case when
        ``q`` is constant along T.
      k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      scale: multiplies the scores: a finite number > 0 (or a 0-d array);
        defaults to ``K ** -0.5``.
      initial_state: an :class:`AarenState` (or a 3-sequence) ``(max [B, H],
        numerator [B, H, V], denominator [B, H])`` from an earlier call: two
        halves with the state equal the whole sequence.
      output_final_state: return the summary after the last token.
      mode: ``"chunk"`` (prefix scans inside chunks of ``chunk_size`` tokens, the
        carry threaded across chunks: linear in T), ``"parallel"`` (one prefix
        scan over all T tokens) or ``"recurrent"`` (token by token; a decoding
        step when ``T == 1``).
      chunk_size: tokens per chunk of the chunk form (any positive int).
      backend: ``None`` or ``"xla"`` (no Pallas kernel for this op).
      segment_ids: int ``[B, T]``, documents packed in each row: where the id changes
        (``t > 0``) a document begins and the summary restarts from empty, so each
        document gets exactly the outputs it gets alone. Token 0 continues
        ``initial_state``; the final state is that of the last document.

    Returns:
      ``(o [B, T, H, V] in the inputs' dtype, final AarenState or None)``; the
      arithmetic and the state are in ``promote(input dtype, float32)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from xformjax import ops
      >>> q = jnp.ones((2, 8)); kv = jnp.ones((1, 5, 2, 8))
      >>> o, state = ops.aaren(q, kv, kv, output_final_state=True)
      >>> o.shape, state.numerator.shape
      ((1, 5, 2, 8), (1, 2, 8))
    """
    common.check_mode(OP, mode)
    chunk_size = common.check_chunk_size(OP, chunk_size)
    common.resolve_backend(OP, backend)
    common.check_bool(OP, "output_final_state", output_final_state)
    common.check_scale(OP, scale)
    _validate_sequences(q, k, v)
    batch, _, heads, key_dim = k.shape
    value_dim = v.shape[-1]
    initial = _validate_state(initial_state, batch, heads, value_dim)
    starts = _document_starts(segment_ids, batch, k.shape[1])

    out_dtype = jnp.result_type(q, k, v)
    dtype = common.compute_dtype(q, k, v, *(() if initial is None else initial))
    scale = key_dim**-0.5 if scale is None else scale
    scores = _scores(q.astype(dtype) * jnp.asarray(scale, dtype), k.astype(dtype))
    v = v.astype(dtype)
    initial = (
        empty_state(batch, heads, value_dim, dtype)
        if initial is None
        else AarenState(*(x.astype(dtype) for x in initial))
    )

    if starts is not None:
        starts = jnp.broadcast_to(starts[:, :, None], scores.shape)
    o, final = _run_form(scores, v, initial, starts, mode=mode, chunk_size=chunk_size)
    return o.astype(out_dtype), (final if output_final_state else None)


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size"))
def _run_form(
    scores: jax.Array,
    v: jax.Array,
    initial: AarenState,
    starts: jax.Array | None,
    *,
    mode: Mode,
    chunk_size: int,
) -> tuple[jax.Array, AarenState]:
    """The requested form, compiled as one unit: the scans are many small operations,
    slow to dispatch one by one when the op is called outside ``jit``."""
    if mode == "recurrent":
        return aaren_recurrent(scores, v, initial, starts)
    if mode == "parallel":
        return aaren_parallel(scores, v, initial, starts)
    return aaren_chunk(scores, v, initial, chunk_size, starts)
