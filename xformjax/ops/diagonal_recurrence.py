"""The diagonal (element-wise) linear recurrence of Mamba/LRU/HGRN-style models.

    h_t = a_t ⊙ h_{t-1} + b_t          a_t, b_t, h_t: [H, D] per batch row
    o_t = h_t

``a`` is a *signed* transition: values in ``[-1, 1]`` are what "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues" (Grazzi et al. 2025)
asks for, and a negative transition cannot be written as ``exp`` of a log gate.
So, unlike the other ops, the transition enters as a value, not a log decay.
This is safe as long as ``|a_t| ≤ 1`` (checked; the layers produce ``a`` with
``σ`` or ``2σ − 1``): every product
``a_t ⋯ a_s`` the forms build then has magnitude ≤ 1, so nothing overflows on
any length, and a long product underflows to 0, which is its value anyway.

Forms (``mode``):

- ``"recurrent"``: ``lax.scan`` over tokens.
- ``"parallel"``: ``lax.associative_scan`` over the whole sequence with the
  composition ``(a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂)``; ``O(T log T)`` work,
  ``O(log T)`` depth.
- ``"chunk"``: the associative scan inside chunks of ``chunk_size`` tokens, then
  a ``lax.scan`` over chunks carrying ``h``: ``h = A_cum ⊙ h_in + H_local``;
  linear in ``T`` in work and memory.

Shapes: ``a``, ``b`` ``[B, T, H, D]``; ``initial_state`` and the final state
``[B, H, D]`` (``[N, H, D]`` for ``N`` packed sequences, ``cu_seqlens``).
Accumulates in ``promote(dtype, float32)``; float64 stays float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops import common
from xformjax.ops.common.validation import Mode

OP = "diagonal_recurrence"


def _combine(earlier, later):
    """Compose two affine maps ``h ↦ a h + b``: ``earlier`` first."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def _recurrent(a, b, h0):
    def step(h, inputs):
        a_t, b_t = inputs
        h = a_t * h + b_t
        return h, h

    final, hs = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), final


def _parallel(a, b, h0):
    a_cum, h_local = jax.lax.associative_scan(_combine, (a, b), axis=1)
    hs = h_local + a_cum * h0[:, None]
    return hs, hs[:, -1]


def _chunk(a, b, h0, chunk_size: int):
    batch, length = a.shape[:2]
    padded = common.round_up(length, chunk_size)
    if padded != length:  # identity steps (a = 1, b = 0) leave h unchanged
        widths = [(0, 0), (0, padded - length)] + [(0, 0)] * (a.ndim - 2)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths)
    shape = (batch, padded // chunk_size, chunk_size) + a.shape[2:]
    a_cum, h_local = jax.lax.associative_scan(
        _combine, (a.reshape(shape), b.reshape(shape)), axis=2
    )

    def across(h, chunk):
        a_chunk, h_chunk = chunk
        hs = h_chunk + a_chunk * h[:, None]
        return hs[:, -1], hs

    final, hs = jax.lax.scan(across, h0, (jnp.moveaxis(a_cum, 1, 0), jnp.moveaxis(h_local, 1, 0)))
    hs = jnp.moveaxis(hs, 0, 1).reshape((batch, padded) + a.shape[2:])
    return hs[:, :length], final


def diagonal_recurrence(
    a: jax.Array,
    b: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    cu_seqlens: jax.Array | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
    """``h_t = a_t ⊙ h_{t-1} + b_t`` (see the module docstring).

    Args:
      a: ``[B, T, H, D]`` signed transitions, ``|a| ≤ 1`` (checked: ``ValueError``
        at once when concrete, under ``jit`` with ``xformjax.config`` option
        ``check_values`` on).
      b: ``[B, T, H, D]`` inputs.
      initial_state: ``[B, H, D]`` (``[N, H, D]`` with ``cu_seqlens``) or ``None`` (zeros).
      output_final_state: also return ``h_T`` of every sequence.
      cu_seqlens: ``[N+1]`` boundaries of packed sequences (``B`` must be 1); each
        sequence starts from its own initial state.
      mode: ``"chunk"``, ``"parallel"`` or ``"recurrent"``.
      chunk_size: tokens per chunk of the chunk form.

    Returns:
      ``(h [B, T, H, D], final_state or None)`` in ``promote(dtype, float32)``.
    """
    common.check_mode(OP, mode)
    chunk_size = common.check_chunk_size(OP, chunk_size)
    for name, x in (("a", a), ("b", b)):
        common.check_rank(OP, name, x, ["B", "T", "H", "D"])
        common.check_floating(OP, name, x)
    if jnp.shape(a) != jnp.shape(b):
        common.fail(
            OP,
            f"`a` and `b` must have the same shape; got {common.shape_str(a)} "
            f"and {common.shape_str(b)}",
        )
    batch, length, heads, dim = jnp.shape(a)
    common.check_bool(OP, "output_final_state", output_final_state)
    common.check_values(
        OP, "a", a, lambda x, xp: xp.abs(x) <= 1, "finite and in [-1, 1] (|a| <= 1)"
    )
    dtype = common.compute_dtype(a, b, initial_state)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    segments = common.make_segments(OP, cu_seqlens, batch, length)
    states = batch if segments is None else segments.num_sequences
    if initial_state is None:
        initial_state = jnp.zeros((states, heads, dim), dtype)
    common.check_rank(OP, "initial_state", initial_state, ["N" if segments else "B", "H", "D"])
    if tuple(jnp.shape(initial_state)) != (states, heads, dim):
        common.fail(
            OP,
            f"`initial_state` must have shape {(states, heads, dim)}; got "
            f"{common.shape_str(initial_state)}",
        )
    initial_state = jnp.asarray(initial_state, dtype)

    if segments is not None:
        # a sequence's first token reads its own initial state instead of the previous
        # token: fold a_t · h0 into b_t and cut the chain with a_t = 0
        start = segments.is_start[None, :, None, None]
        b = jnp.where(start, b + a * initial_state[segments.ids][None], b)
        a = jnp.where(start, jnp.zeros_like(a), a)
        h0 = jnp.zeros((1, heads, dim), dtype)
    else:
        h0 = initial_state

    if length == 0:
        hs, final = jnp.zeros_like(b), h0
    elif mode == "recurrent":
        hs, final = _recurrent(a, b, h0)
    elif mode == "parallel":
        hs, final = _parallel(a, b, h0)
    else:
        hs, final = _chunk(a, b, h0, chunk_size)
    if not output_final_state:
        return hs, None
    if segments is not None:
        last = jnp.maximum(segments.ends - 1, 0)
        final = jnp.where((segments.lengths > 0)[:, None, None], hs[0, last], initial_state)
    return hs, final
