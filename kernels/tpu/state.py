"""The state recurrence over chunks on TPUs, the only sequential kernels (forward, backward).

Chunk ``n`` (``C`` tokens), ``b`` the chunk-local cumulative log decay (scalar
``[C, 1]`` or per key channel ``[C, K]``; zeros without a gate; as its compensated
pair ``(b, lo)``, ``kernels/gates.py``: ``b_last − b`` is ``common.gap``), ``D = e^{b_last}``
(a scalar, or ``diag`` over the ``K`` rows), ``h_n`` the state entering it::

    forward:   v_n = u − w h_n (delta rule; linear attention: v_n = v)
               h_{n+1} = D h_n + (k ⊙ e^{b_last − b})ᵀ v_n
    backward:  G_{N−1} = d_final;  dv_n = dv_local + (k ⊙ e^{b_last − b}) G_n (delta rule)
               G_{n−1} = D G_n + scale (q ⊙ e^{b})ᵀ do  [− wᵀ dv_n]

Grid ``(R, V/BV, N)``, dimension semantics ``("parallel", "parallel", "arbitrary")``:
each program owns a float32 ``[K, BV]`` state tile in a VMEM scratch and steps it
once per chunk (the backward visits the chunks in reverse); both TensorCores of a
megacore chip share the ``R·V/BV`` independent tiles. Every columns tile of the
state is independent (``v_n``'s columns need only the same columns of ``h_n``), so
nothing is exchanged between tiles.

Outputs: the state entering every chunk ``h [R, N, K, V]`` (forward) or the
cotangent of the state leaving every chunk ``dh [R, N, K, V]`` (backward), in the
inputs' dtype; the delta rule's pseudo-values ``v_n [R, L, V]`` (forward); the final
state / the initial state's cotangent ``[R, K, V]`` float32.

VMEM (``vmem_bytes``; ``c`` = the inputs' item size, ``K, V`` padded, ``BV`` = 128,
``G`` = 1 for a scalar gate, ``K`` per channel; tiles rounded to ``(8·4/c, 128)``)::

    2·[C·K·c (k or q) + C·BV·c (v/u or do) + 2·C·max(G,128)·4 (b and lo)
       + delta: C·K·c (w) + C·BV·c (v_n out, or dv_local in) + C·K·c (k, backward)
       + K·BV·4 (h0 / d_final) + K·BV·c (h / dh out) + K·BV·4 (final)]
    + K·BV·4 (scratch) + temporaries 4·C·K·4 + 3·K·BV·4 (+ K·K·4 per channel)

e.g. 2.1 MiB at K = V = 256, float32, delta rule — far below the 16 MiB scoped limit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import common
from .common import F32, Tiles, mm

NAME = "state"


def _gate(b: jax.Array, lo: jax.Array):
    """``(D, weights to the chunk end, e^{b})`` of a chunk's compensated pair ``(b, lo)``:
    ``D`` broadcasts over the ``[K, BV]`` state (a ``[1, 1]`` scalar gate or a ``[K, 1]``
    per-channel column)."""
    b_last = common.last_row(b)
    decay_last = jnp.exp(b_last)
    if b.shape[1] > 1:
        decay_last = common.row_to_column(decay_last)
    to_end = jnp.exp(common.gap(b_last, common.last_row(lo), b, lo))
    return decay_last, to_end, jnp.exp(b)


def _forward_kernel(*all_refs: Any, delta: bool, has_init: bool, num_chunks: int):
    k_ref, values_ref, b_ref, lo_ref, *refs = all_refs
    w_ref = refs.pop(0) if delta else None
    init_ref = refs.pop(0) if has_init else None
    h_ref = refs.pop(0)
    v_new_ref = refs.pop(0) if delta else None
    final_ref, state_ref = refs
    n = pl.program_id(2)
    dtype = k_ref.dtype

    @pl.when(n == 0)
    def _():
        if init_ref is not None:
            state_ref[...] = init_ref[...]
        else:
            state_ref[...] = jnp.zeros(state_ref.shape, F32)

    state = state_ref[...]
    h_ref[...] = state.astype(h_ref.dtype)
    values = values_ref[...].astype(F32)
    if w_ref is not None and v_new_ref is not None:
        values = values - mm(w_ref[...], state, dtype)
        v_new_ref[...] = values.astype(v_new_ref.dtype)
    decay_last, to_end = _gate(b_ref[...], lo_ref[...])[:2]
    k = k_ref[...].astype(F32) * to_end
    state = decay_last * state + mm(k, values, dtype, trans_a=True)
    state_ref[...] = state

    @pl.when(n == num_chunks - 1)
    def _():
        final_ref[...] = state


def _backward_kernel(*all_refs: Any, delta: bool, has_final: bool, scale: float, num_chunks: int):
    q_ref, do_ref, b_ref, lo_ref, *refs = all_refs
    k_ref, w_ref, dv_local_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if delta else (None,) * 3
    final_ref = refs.pop(0) if has_final else None
    dh_ref, d_init_ref, grad_ref = refs
    i = pl.program_id(2)
    dtype = q_ref.dtype

    @pl.when(i == 0)
    def _():
        if final_ref is not None:
            grad_ref[...] = final_ref[...]
        else:
            grad_ref[...] = jnp.zeros(grad_ref.shape, F32)

    grad = grad_ref[...]
    dh_ref[...] = grad.astype(dh_ref.dtype)
    decay_last, to_end, e_b = _gate(b_ref[...], lo_ref[...])
    q = q_ref[...].astype(F32) * e_b
    new = decay_last * grad + scale * mm(q, do_ref[...], dtype, trans_a=True)
    if k_ref is not None and w_ref is not None and dv_local_ref is not None:
        k = k_ref[...].astype(F32) * to_end
        d_values = dv_local_ref[...].astype(F32) + mm(k, grad, dtype)
        new = new - mm(w_ref[...], d_values, dtype, trans_a=True)
    grad_ref[...] = new

    @pl.when(i == num_chunks - 1)
    def _():
        d_init_ref[...] = new


def _blocks(tiles: Tiles, dtype, gate_width: int, num_chunks: int, *, reverse: bool, delta: bool):
    """``(inputs, outputs)`` blocks in the kernels' argument order (initial state and
    ``d_final`` always listed: they may be absent)."""
    c, kw, bv = tiles.chunk_size, tiles.key_width, tiles.bv

    def chunk(n):
        return num_chunks - 1 - n if reverse else n

    keys = common.token(c, kw, dtype, lambda r, j, n: (r, chunk(n), 0))
    values = common.token(c, bv, dtype, lambda r, j, n: (r, chunk(n), j))
    gate = common.token(c, gate_width, F32, lambda r, j, n: (r, chunk(n), 0))
    states = common.chunk_state(kw, bv, dtype, lambda r, j, n: (r, chunk(n), 0, j))
    edge = common.state(kw, bv, lambda r, j, n: (r, 0, j))
    if not reverse:
        inputs = [keys, values, gate, gate] + ([keys] if delta else []) + [edge]
        outputs = [states] + ([values] if delta else []) + [edge]
    else:
        values_in = [keys, keys, common.token(c, bv, F32, values.index)] if delta else []
        inputs = [keys, values, gate, gate] + values_in + [edge]
        outputs = [states, edge]
    return inputs, outputs


def vmem_bytes(tiles: Tiles, dtype, *, gate_width: int = 1, delta: bool, reverse: bool) -> int:
    """The VMEM of one state kernel (module docstring)."""
    inputs, outputs = _blocks(tiles, dtype, gate_width, 1, reverse=reverse, delta=delta)
    c, kw, bv = tiles.chunk_size, tiles.key_width, tiles.bv
    temporaries = 4 * (4 * c * kw + 3 * kw * bv + (kw * kw if gate_width > 1 else 0))
    return common.vmem_bytes(inputs + outputs, [(kw, bv)], temporaries)


def forward(
    k: jax.Array,
    values: jax.Array,
    b: tuple[jax.Array, jax.Array],
    h0: jax.Array | None,
    *,
    w: jax.Array | None = None,
    tiles: Tiles,
    interpret: bool,
    name: str,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """``(h [R, N, K, V]`` in ``k.dtype``, the pseudo-values ``v_n [R, L, V]`` (with ``w``,
    the delta rule, else ``None``), ``final [R, K, V]`` float32)``.

    ``k [R, L, K]``, ``values`` (``v``, or the delta rule's ``u``) ``[R, L, V]`` and ``w``
    ``[R, L, K]`` in one dtype; ``b`` the pair ``(hi, lo)`` of float32 ``[R, L, 1 or K]``;
    ``h0 [R, K, V]`` float32."""
    rows, length, key_width = k.shape
    value_width = values.shape[-1]
    num_chunks = length // tiles.chunk_size
    delta = w is not None
    ins, outs = _blocks(tiles, k.dtype, b[0].shape[-1], num_chunks, reverse=False, delta=delta)
    arrays = [k, values, *b] + ([w] if delta else [])
    inputs = list(zip(arrays, ins[: len(arrays)]))
    if h0 is not None:
        inputs.append((h0, ins[-1]))
    shapes: list[tuple[int, ...]] = [(rows, num_chunks, key_width, value_width)]
    if delta:
        shapes.append(values.shape)
    shapes.append((rows, key_width, value_width))
    results = common.call(
        lambda *refs: _forward_kernel(
            *refs, delta=delta, has_init=h0 is not None, num_chunks=num_chunks
        ),
        inputs,
        list(zip(shapes, outs)),
        grid=(rows, value_width // tiles.bv, num_chunks),
        semantics=common.RECURRENT,
        scratch=[(key_width, tiles.bv)],
        interpret=interpret,
        name=f"{name}_state_fwd",
    )
    return results[0], (results[1] if delta else None), results[-1]


def backward(
    q: jax.Array,
    do: jax.Array,
    b: tuple[jax.Array, jax.Array],
    d_final: jax.Array | None,
    *,
    scale: float,
    k: jax.Array | None = None,
    w: jax.Array | None = None,
    dv_local: jax.Array | None = None,
    tiles: Tiles,
    interpret: bool,
    name: str,
) -> tuple[jax.Array, jax.Array]:
    """``(dh [R, N, K, V]`` in ``q.dtype`` — the cotangent of the state leaving each chunk —,
    ``d_h0 [R, K, V]`` float32)``.

    ``q [R, L, K]``, ``do [R, L, V]`` in one dtype, ``b`` as :func:`forward`, ``d_final``
    ``[R, K, V]`` float32; the delta rule also gives ``k, w [R, L, K]`` and
    ``dv_local = scale (q kᵀ ⊙ Γ)ᵀ do`` ``[R, L, V]`` float32."""
    rows, length, key_width = q.shape
    value_width = do.shape[-1]
    num_chunks = length // tiles.chunk_size
    delta = w is not None
    ins, outs = _blocks(tiles, q.dtype, b[0].shape[-1], num_chunks, reverse=True, delta=delta)
    arrays = [q, do, *b]
    if delta:
        assert k is not None and dv_local is not None
        arrays += [k, w, dv_local]
    inputs = list(zip(arrays, ins[: len(arrays)]))
    if d_final is not None:
        inputs.append((d_final, ins[-1]))
    shapes = [(rows, num_chunks, key_width, value_width), (rows, key_width, value_width)]
    dh, d_h0 = common.call(
        lambda *refs: _backward_kernel(
            *refs,
            delta=delta,
            has_final=d_final is not None,
            scale=float(scale),
            num_chunks=num_chunks,
        ),
        inputs,
        list(zip(shapes, outs)),
        grid=(rows, value_width // tiles.bv, num_chunks),
        semantics=common.RECURRENT,
        scratch=[(key_width, tiles.bv)],
        interpret=interpret,
        name=f"{name}_state_bwd",
    )
    return dh, d_h0
