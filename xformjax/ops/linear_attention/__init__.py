"""``linear_attention``: the diagonal-transition family in one op.

Plain linear attention, its normalised form, per-head constant decays
(RetNet, lightning attention), per-token scalar gates (Mamba2-style) and
per-key-channel gates (GLA), in parallel, chunked and recurrent forms::

    S_t = exp(g_t) · diag(exp(gk_t)) · S_{t-1} + k_t v_tᵀ      S: [K, V]
    o_t = scale · S_tᵀ q_t

Where each form lives:

* ``parallel.py``: the masked T×T decay matrix (quadratic; short sequences, checks);
* ``chunk.py``: the per-chunk update rule, run by the shared chunk engine
  (``xformjax.ops.common.chunk_scan``: packing layout, log-gate prefix sums,
  decay masks, the blocked scan, final states); ``chunk_backward.py``: its
  hand-written backward for scalar gates;
* ``recurrent.py``: the token-by-token update (decoding), run by
  ``xformjax.ops.common.token_scan``;
* the gate layouts (``LogGate``): ``xformjax.ops.common.gates``; the Pallas
  kernels: ``xformjax.kernels``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# `kernels/` is installed as xformjax.kernels by [tool.setuptools.package-dir], a mapping
# pyright cannot see.
from xformjax import kernels  # pyright: ignore[reportAttributeAccessIssue]
from xformjax.ops import common
from xformjax.ops.common.gates import LogGate, combine
from xformjax.ops.common.validation import Backend, Mode
from xformjax.ops.linear_attention.chunk import linear_attention_chunk
from xformjax.ops.linear_attention.parallel import linear_attention_parallel
from xformjax.ops.linear_attention.recurrent import linear_attention_recurrent

__all__ = ["NORMALIZER_EPS", "LogGate", "linear_attention", "validate"]

OP = "linear_attention"
NORMALIZER_EPS = 1e-6


def validate(
    q,
    k,
    v,
    g,
    gk,
    initial_state,
    cu_seqlens,
    normalize: bool,
    op: str = OP,
    value_rows: int | None = None,
    scale=None,
    output_final_state: bool = False,
):
    """Check the linear-attention family's common inputs; return the packing (or None).

    Shapes, dtypes and types always; values (gates finite and ≤ 0, ``scale`` finite
    and > 0, ``cu_seqlens`` boundaries) at once when concrete, and under ``jit`` with
    ``xformjax.config`` option ``check_values`` on. ``value_rows`` is the T of ``k``
    and ``v`` when it differs from ``q``'s (DeltaProduct).
    """
    common.check_bool(op, "normalize", normalize)
    common.check_bool(op, "output_final_state", output_final_state)
    common.check_scale(op, scale)
    for name, x in (("q", q), ("k", k), ("v", v)):
        common.check_rank(op, name, x, ["B", "T", "H", "K" if name != "v" else "V"])
        common.check_floating(op, name, x)
    batch, num_tokens, heads, key_dim = q.shape
    if num_tokens == 0:
        common.fail(
            op, f"`q` has T=0 tokens (shape {common.shape_str(q)}); at least one token is needed"
        )
    common.check_key_dim(op, "q", q)
    rows = num_tokens if value_rows is None else value_rows
    expected_k = (batch, rows, heads, key_dim)
    for axis, what in ((0, "B"), (1, "T" if value_rows is None else "T·n"), (2, "H"), (3, "K")):
        common.check_dim(op, "k", k, axis, expected_k[axis], f"{what} of `q` {common.shape_str(q)}")
    for axis, what in ((0, "B"), (1, "T" if value_rows is None else "T·n"), (2, "H")):
        common.check_dim(op, "v", v, axis, expected_k[axis], f"{what} of `q` {common.shape_str(q)}")
    if g is not None:
        common.check_floating(op, "g", g)
        if jnp.ndim(g) == 1:
            common.check_dim(op, "g", g, 0, heads, "H of `q`")
        elif jnp.ndim(g) == 3:
            for axis, what in ((0, "B"), (1, "T"), (2, "H")):
                common.check_dim(op, "g", g, axis, q.shape[axis], f"{what} of `q`")
        else:
            common.fail(
                op,
                f"`g` must be [H] or [B, T, H] = [{heads}] or "
                f"{(batch, num_tokens, heads)}; got shape {common.shape_str(g)}",
            )
        common.check_log_gate(op, "g", g)
    if gk is not None:
        common.check_floating(op, "gk", gk)
        common.check_rank(op, "gk", gk, ["B", "T", "H", "K"])
        for axis in range(4):
            common.check_dim(
                op, "gk", gk, axis, q.shape[axis], f"dimension {axis} of `q` {common.shape_str(q)}"
            )
        common.check_log_gate(op, "gk", gk)
    segments = common.make_segments(op, cu_seqlens, batch, num_tokens)
    if initial_state is not None:
        common.check_floating(op, "initial_state", initial_state)
        common.check_rank(op, "initial_state", initial_state, ["N", "H", "K", "V"])
        rows = batch if segments is None else segments.num_sequences
        value_dim = v.shape[3] + (1 if normalize else 0)
        expected = (rows, heads, key_dim, value_dim)
        if tuple(initial_state.shape) != expected:
            where = "B" if segments is None else "the number of sequences in `cu_seqlens`"
            extra = " (V+1: the last column is the normaliser z)" if normalize else ""
            common.fail(
                op,
                f"`initial_state` must have shape [N, H, K, V]{extra} = {expected} "
                f"with N = {where}; got {common.shape_str(initial_state)}",
            )
    return segments


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    g: jax.Array | None = None,
    gk: jax.Array | None = None,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    backend: Backend | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated linear attention.

    For every batch row (or packed sequence) and head::

        S_t = exp(g_t) · diag(exp(gk_t)) · S_{t-1} + k_t v_tᵀ      S: [K, V]
        o_t = scale · S_tᵀ q_t

    With ``normalize=True`` a normaliser ``z_t`` follows the same recurrence with
    ``v`` replaced by 1 and ``o_t = (scale·S_tᵀq_t) / (scale·z_tᵀq_t + 1e-6)``;
    the state then carries ``z`` as an extra last value column (``[.., K, V+1]``).

    Args:
      q, k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: natural-log decay (≤ 0), ``[B, T, H]`` per step, or ``[H]`` constant
        per head (RetNet, lightning attention; never broadcast over B and T).
      gk: per-key-channel natural-log decay (≤ 0), ``[B, T, H, K]`` (GLA).
        ``g`` and ``gk`` together multiply.
      scale: a finite number > 0 (or a 0-d array); defaults to ``K ** -0.5``.
      normalize: use the denominator form (a bool).
      initial_state: ``[N, H, K, V]`` (``V+1`` when normalising); N = B, or
        the number of packed sequences.
      output_final_state: also return the final state(s) ``[N, H, K, V]``.
      cu_seqlens: int ``[N+1]`` boundaries of packed sequences (``B == 1``); no
        state crosses a boundary.
      mode: ``"chunk"`` (linear in T), ``"parallel"`` (T×T) or ``"recurrent"``
        (token by token; one decoding step when ``T == 1``).
      chunk_size: tile length of the chunk form; changes nothing but rounding.
      backend: ``None`` (the Pallas kernel on GPU/TPU, XLA on CPU), ``"xla"`` or
        ``"pallas"`` (the kernel; interpret mode on CPU). The kernel runs the
        chunk form with its own tile (``chunk_size`` is then ignored); what it
        does not cover (``normalize``, ``cu_seqlens``, dtypes other than float32
        and bfloat16, K or V above 256 — beyond the sm_90 compile gate — and
        other modes) runs in XLA with a one-time warning.

    Raises:
      ValueError: a malformed argument (shapes, ``K = 0``, ``T = 0``, a gate that is
        positive or not finite, ``scale`` ≤ 0 or not finite, bad ``cu_seqlens``);
        the message names the argument, what was expected and what was given. Value
        checks need concrete values: under ``jit`` they run only with
        ``xformjax.config.update("check_values", True)`` (see :mod:`xformjax.config`).
      TypeError: an argument of the wrong type (``normalize="no"``, ``scale="a"``).

    Returns:
      ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in the inputs' dtype;
      ``final_state`` is in the accumulation dtype (``promote(dtype, float32)``)
      or ``None`` unless ``output_final_state``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from xformjax import ops
      >>> q = k = v = jnp.ones((1, 100, 2, 16))
      >>> g = jnp.log(jnp.full((2,), 0.9))  # RetNet-style per-head decay
      >>> o, state = ops.linear_attention(q, k, v, g=g, output_final_state=True)
      >>> o.shape, state.shape
      ((1, 100, 2, 16), (1, 2, 16, 16))
    """
    common.check_mode(OP, mode)
    chunk_size = common.check_chunk_size(OP, chunk_size)
    validate(
        q,
        k,
        v,
        g,
        gk,
        initial_state,
        cu_seqlens,
        normalize,
        scale=scale,
        output_final_state=output_final_state,
    )
    gap = common.kernel_gap(
        (q, k, v, g, gk, initial_state),
        scale,
        {"normalize=True": normalize, "packed sequences (cu_seqlens)": cu_seqlens is not None},
    )
    if common.resolve_backend(OP, backend, gap, has_kernel=True, mode=mode) == "pallas":
        # Chosen by default on an accelerator: a CPU lowering of the same program
        # runs XLA, not the interpreter.
        cpu = (
            None
            if backend == "pallas"
            else functools.partial(
                linear_attention,
                scale=scale,
                output_final_state=True,
                chunk_size=chunk_size,
                backend="xla",
            )
        )
        o, final = kernels.linear_attention(
            q, k, v, g=g, gk=gk, scale=scale, initial_state=initial_state, cpu_fallback=cpu
        )
        return o, (final if output_final_state else None)

    return _xla_forms(
        q,
        k,
        v,
        g,
        gk,
        initial_state,
        cu_seqlens,
        scale,
        normalize=normalize,
        mode=mode,
        chunk_size=chunk_size,
        output_final_state=output_final_state,
    )


@functools.partial(
    jax.jit, static_argnames=("normalize", "mode", "chunk_size", "output_final_state")
)
def _xla_forms(
    q,
    k,
    v,
    g,
    gk,
    initial_state,
    cu_seqlens,
    scale,
    *,
    normalize,
    mode,
    chunk_size,
    output_final_state,
):
    """The XLA forms of checked arguments, as one jitted program: an eager call then
    compiles the op once instead of dispatching its hundreds of small operations one
    by one (3× faster on a CPU); inside a user's ``jit`` it is inlined."""
    segments = None if cu_seqlens is None else common.derive_segments(cu_seqlens, q.shape[1])
    out_dtype = jnp.result_type(q, k, v)
    dtype = common.compute_dtype(q, k, v, g, gk, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q = q.astype(dtype) * jnp.asarray(scale, dtype)
    k, v = k.astype(dtype), v.astype(dtype)
    if normalize:
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), dtype)], axis=-1)
    gate = combine(g, gk, q.shape[2], dtype)
    init = None if initial_state is None else initial_state.astype(dtype)

    if mode == "parallel":
        o, final = linear_attention_parallel(q, k, v, gate, init, segments)
    elif mode == "recurrent":
        o, final = linear_attention_recurrent(q, k, v, gate, init, segments)
    else:
        o, final = linear_attention_chunk(q, k, v, gate, init, segments, chunk_size)

    if normalize:
        o = o[..., :-1] / (o[..., -1:] + NORMALIZER_EPS)
    return o.astype(out_dtype), (final if output_final_state else None)
