"""``delta_rule`` and ``delta_product``: the delta-rule family in one pair of ops.

DeltaNet, gated DeltaNet (``g``), per-channel gated (``gk``, KDA), negative
eigenvalues (β in (1, 2]; β ∈ [0, 2]) and DeltaProduct (``num_householder`` sub-steps),
in parallel, chunked and recurrent forms::

    S'  = exp(g_t) · diag(exp(gk_t)) · S_{t-1}
    S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ                S: [K, V]
    o_t = scale · S_tᵀ q_t

Where each form lives:

* ``chunk.py``: the WY/UT rule per chunk, run by the shared chunk engine
  (``xformjax.ops.common.chunk_scan``); ``inverse.py``: the blocked triangular
  inverse ``(I + A)⁻¹`` and its VJP; ``chunk_backward.py``: the hand-written
  backward for scalar gates;
* the parallel form is the chunk form with one chunk over the whole sequence;
* ``recurrent.py``: the token-by-token update (decoding), run by
  ``xformjax.ops.common.token_scan``;
* DeltaProduct (this module): the delta rule over ``T·n`` rows.

Gates, packing and input checks are shared with linear attention
(``xformjax.ops.common.gates``, ``xformjax.ops.linear_attention.validate``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# `kernels/` is installed as xformjax.kernels by [tool.setuptools.package-dir], a mapping
# pyright cannot see.
from xformjax import kernels  # pyright: ignore[reportAttributeAccessIssue]
from xformjax.ops import common
from xformjax.ops.common.gates import combine
from xformjax.ops.common.validation import Backend, Mode
from xformjax.ops.delta_rule.chunk import delta_rule_chunk
from xformjax.ops.delta_rule.recurrent import delta_rule_recurrent
from xformjax.ops.linear_attention import validate

__all__ = ["delta_product", "delta_rule"]


def _check_beta(op: str, beta, q, rows: int) -> None:
    """β: ``[B, T·n, H]`` floating, every value finite and in [0, 2] (see :func:`delta_rule`)."""
    common.check_floating(op, "beta", beta)
    expected = (q.shape[0], rows, q.shape[2])
    if tuple(jnp.shape(beta)) != expected:
        common.fail(
            op,
            f"`beta` must have shape [B, T, H] = {expected} "
            f"(one step size per row of `k`); got {common.shape_str(beta)}",
        )
    common.check_beta_values(op, beta)


def _run(
    op: str,
    q,
    k,
    v,
    beta,
    g,
    gk,
    scale,
    initial_state,
    output_final_state,
    cu_seqlens,
    mode,
    chunk_size,
    backend,
    rows_per_token: int,
):
    common.check_mode(op, mode)
    chunk_size = common.check_chunk_size(op, chunk_size)
    for name, x in (("q", q), ("k", k), ("v", v)):
        common.check_rank(op, name, x, ["B", "T", "H", "K" if name != "v" else "V"])
    validate(
        q,
        k,
        v,
        g,
        gk,
        initial_state,
        cu_seqlens,
        False,
        op=op,
        value_rows=q.shape[1] * rows_per_token,
        scale=scale,
        output_final_state=output_final_state,
    )
    _check_beta(op, beta, q, k.shape[1])
    gap = common.kernel_gap(
        (q, k, v, beta, g, gk, initial_state),
        scale,
        {
            "the per-channel gate `gk`": gk is not None,
            "packed sequences (cu_seqlens)": cu_seqlens is not None,
        },
    )
    if common.resolve_backend(op, backend, gap, has_kernel=True, mode=mode) == "pallas":
        # Chosen by default on an accelerator: a CPU lowering runs XLA, not the interpreter.
        cpu = (
            None
            if backend == "pallas"
            else functools.partial(
                delta_rule,
                scale=scale,
                output_final_state=True,
                chunk_size=chunk_size,
                backend="xla",
            )
        )
        return _run_kernel(
            q, k, v, beta, g, scale, initial_state, output_final_state, rows_per_token, cpu
        )

    return _xla_forms(
        q,
        k,
        v,
        beta,
        g,
        gk,
        initial_state,
        cu_seqlens,
        scale,
        mode=mode,
        chunk_size=chunk_size,
        output_final_state=output_final_state,
        rows_per_token=rows_per_token,
    )


@functools.partial(
    jax.jit, static_argnames=("mode", "chunk_size", "output_final_state", "rows_per_token")
)
def _xla_forms(
    q,
    k,
    v,
    beta,
    g,
    gk,
    initial_state,
    cu_seqlens,
    scale,
    *,
    mode,
    chunk_size,
    output_final_state,
    rows_per_token,
):
    """The XLA forms of checked arguments as one jitted program (an eager call compiles
    the op once instead of dispatching its many small operations one by one; inside a
    user's ``jit`` it is inlined)."""
    segments = None if cu_seqlens is None else common.derive_segments(cu_seqlens, q.shape[1])
    out_dtype = jnp.result_type(q, k, v)
    dtype = common.compute_dtype(q, k, v, beta, g, gk, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.astype(dtype) * jnp.asarray(scale, dtype)
    k, v, beta = k.astype(dtype), v.astype(dtype), beta.astype(dtype)
    init = None if initial_state is None else initial_state.astype(dtype)
    gate = combine(g, gk, q.shape[2], dtype)
    if rows_per_token > 1:
        q, gate, segments = _expand_tokens(q, gate, segments, rows_per_token)

    if mode == "recurrent":
        o, final = delta_rule_recurrent(q, k, v, beta, gate, init, segments)
    else:
        # The parallel form is the UT transform over the whole sequence: one chunk.
        size = chunk_size if mode == "chunk" else common.round_up(k.shape[1], 16)
        o, final = delta_rule_chunk(q, k, v, beta, gate, init, segments, size)
    if rows_per_token > 1:
        o = o[:, rows_per_token - 1 :: rows_per_token]
    return o.astype(out_dtype), (final if output_final_state else None)


def _run_kernel(
    q, k, v, beta, g, scale, initial_state, output_final_state, rows_per_token: int, cpu_fallback
):
    """The Pallas delta-rule kernel; DeltaProduct runs it over the ``T·n`` rows."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if rows_per_token > 1:
        gate = combine(g, None, q.shape[2], jnp.float32)
        q, gate, _ = _expand_tokens(q, gate, None, rows_per_token)
        g = gate.values
    o, final = kernels.delta_rule(
        q, k, v, beta, g=g, scale=scale, initial_state=initial_state, cpu_fallback=cpu_fallback
    )
    if rows_per_token > 1:
        o = o[:, rows_per_token - 1 :: rows_per_token]
    return o, (final if output_final_state else None)


def _expand_tokens(q, gate, segments, n: int):
    """DeltaProduct as a delta rule over T·n rows: the decay on each token's first
    sub-step, the query (read-out) on its last, packing boundaries scaled by n."""
    batch, num_tokens, heads, key_dim = q.shape
    rows = num_tokens * n
    q_rows = jnp.zeros((batch, num_tokens, n, heads, key_dim), q.dtype).at[:, :, -1].set(q)
    q_rows = q_rows.reshape(batch, rows, heads, key_dim)
    values = gate.values
    if gate.kind == "head":
        values = jnp.broadcast_to(values, (batch, num_tokens, heads))
    first_only = jnp.zeros((batch, num_tokens, n) + values.shape[2:], values.dtype)
    values = first_only.at[:, :, 0].set(values).reshape((batch, rows) + values.shape[2:])
    gate = type(gate)("channel" if gate.kind == "channel" else "token", values)
    if segments is not None:
        segments = common.derive_segments(segments.cu_seqlens * n, rows)
    return q_rows, gate, segments


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    g: jax.Array | None = None,
    gk: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    backend: Backend | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The (gated) delta rule.

    For every batch row (or packed sequence) and head::

        S'  = exp(g_t) · diag(exp(gk_t)) · S_{t-1}
        S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ                S: [K, V]
        o_t = scale · S_tᵀ q_t

    Without gates it is DeltaNet; with ``g`` gated DeltaNet; with ``gk`` the
    per-channel gated form (KDA). β in (1, 2] gives the transition
    ``I − β k kᵀ`` a negative eigenvalue (state tracking). ``q`` and ``k`` are
    used as given: L2-normalising them is the layer's job.

    β must be finite and in **[0, 2]**: with a unit-norm ``k`` the transition
    ``I − β k kᵀ`` then has eigenvalues ``1 − β ∈ [−1, 1]`` and never amplifies the
    state. ``β = 0`` is allowed: it is the identity step (no write), which
    :func:`xformjax.ops.mixture_of_memories` uses for the tokens not routed to a
    memory; ``β = 2`` is a reflection. Anything else raises ``ValueError`` (eagerly;
    under ``jit`` with ``xformjax.config`` option ``check_values`` on).

    Args:
      q, k: ``[B, T, H, K]`` (``K ≥ 1``); v: ``[B, T, H, V]``; beta: ``[B, T, H]``
        in [0, 2].
      g, gk, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
        backend: as :func:`xformjax.ops.linear_attention`.
      mode: ``"chunk"`` (WY/UT representation per chunk, linear in T),
        ``"parallel"`` (the UT transform over the whole sequence, quadratic) or
        ``"recurrent"`` (token by token; a decoding step when ``T == 1``).

    Returns:
      ``(o [B, T, H, V], final_state [N, H, K, V] or None)``.

    Raises:
      ValueError: a malformed argument (shapes, β outside [0, 2], a positive or
        non-finite gate, ``scale`` ≤ 0 …), named in the message; TypeError: an
        argument of the wrong type.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from xformjax import ops
      >>> k = jax.nn.standardize(jnp.ones((1, 50, 2, 8)) + jnp.arange(8), axis=-1) / 8 ** 0.5
      >>> o, s = ops.delta_rule(k, k, k, jnp.full((1, 50, 2), 1.5), output_final_state=True)
      >>> o.shape, s.shape
      ((1, 50, 2, 8), (1, 2, 8, 8))
    """
    return _run(
        "delta_rule",
        q,
        k,
        v,
        beta,
        g,
        gk,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        mode,
        chunk_size,
        backend,
        rows_per_token=1,
    )


def delta_product(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    num_householder: int,
    g: jax.Array | None = None,
    gk: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    backend: Backend | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """DeltaProduct: ``n = num_householder`` delta steps per token.

    ``k``, ``v`` and ``beta`` carry ``T·n`` rows, token-major (row ``t·n + j`` is
    sub-step j of token t). Per token: decay once by ``exp(g_t)·diag(exp(gk_t))``,
    apply the n delta steps in order, then read out with ``q_t``. Computed as
    the delta rule over the ``T·n`` rows (exact, and linear in T for the chunk
    form); a ``[H]`` gate is then expanded per row. ``cu_seqlens`` counts tokens.
    Other arguments (and the β rule: finite and in [0, 2]) as :func:`delta_rule`;
    ``n = 1`` is :func:`delta_rule`. ``num_householder`` must be an int ≥ 1
    (``TypeError`` for another type, ``ValueError`` below 1).
    """
    op = "delta_product"
    num_householder = common.check_positive_int(op, "num_householder", num_householder)
    for name, x in (("q", q), ("k", k)):
        common.check_rank(op, name, x, ["B", "T", "H", "K"])
    if k.shape[1] != q.shape[1] * num_householder:
        common.fail(
            op,
            f"`k` must have T·n = {q.shape[1]}·{num_householder} = "
            f"{q.shape[1] * num_householder} rows (token-major sub-steps); got "
            f"`k` {common.shape_str(k)} for `q` {common.shape_str(q)}",
        )
    return _run(
        op,
        q,
        k,
        v,
        beta,
        g,
        gk,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        mode,
        chunk_size,
        backend,
        rows_per_token=num_householder,
    )
