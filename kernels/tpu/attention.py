"""The ``custom_vjp`` that scalar-gated linear attention and GLA share on TPUs.

Both are the state recurrence of ``state.py`` followed by a chunk-local output
kernel; their backward is the reverse state recurrence followed by one chunk-local
gradient kernel. Only the chunk-local kernels differ (``chunk.py`` for a scalar
gate, ``gla.py`` per channel), so :func:`state_attention` builds the family from
them::

    forward:   h, final = state.forward(k, v, b, h0);  o = output(q, k, v, h, b)
    backward:  dh, d_h0 = state.backward(q, do, b, d_final)
               dq, dk, dv, db = gradients(q, k, v, h, do, dh, b)

Residuals are the inputs and the entering states ``h [R, N, K, V]`` (input dtype).
Shapes: ``q, k [R, L, K]``, ``v [R, L, V]``, ``b`` the compensated pair ``(hi, lo)``
(``kernels/gates.py``) of float32 ``[R, L, 1]`` or ``[R, L, K]``,
``h0 [R, K, V]`` float32; it returns ``(o [R, L, V]`` in ``v.dtype``, ``final [R, K, V]``
float32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..config import ScanOptions
from . import state
from .common import F32, Tiles

#: ``output(q, k, v, h, b, options) -> o``
Output = Callable[..., jax.Array]
#: ``gradients(q, k, v, h, d_out, dh, b, options) -> (dq, dk, dv, db)``
Gradients = Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


def tiles_of(q: jax.Array, v: jax.Array, options: ScanOptions) -> Tiles:
    """The tiles of one call: the options' chunk, the padded key and value widths."""
    return Tiles(options.chunk_size, q.shape[-1], v.shape[-1])


def state_attention(name: str, output: Output, gradients: Gradients) -> Callable:
    """The family ``(q, k, v, b, h0, options) -> (o, final)`` with its backward (module
    docstring); ``name`` prefixes the state kernels' names."""

    def forward(q, k, v, b, h0, options: ScanOptions):
        tiles = tiles_of(q, v, options)
        h, _, final = state.forward(
            k, v, b, h0, tiles=tiles, interpret=options.interpret, name=name
        )
        return output(q, k, v, h, b, options), final, h

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def attention(q, k, v, b, h0, options: ScanOptions):
        out, final, _ = forward(q, k, v, b, h0, options)
        return out, final

    def fwd(q, k, v, b, h0, options: ScanOptions):
        out, final, h = forward(q, k, v, b, h0, options)
        return (out, final), (q, k, v, b, h)

    def bwd(options: ScanOptions, residuals, cotangents):
        q, k, v, b, h = residuals
        d_out, d_final = cotangents
        d_out = d_out.astype(v.dtype)
        dh, d_h0 = state.backward(
            q,
            d_out,
            b,
            d_final.astype(F32),
            scale=options.scale,
            tiles=tiles_of(q, v, options),
            interpret=options.interpret,
            name=name,
        )
        dq, dk, dv, db = gradients(q, k, v, h, d_out, dh, b, options)
        # b is the compensated pair (hi, lo); lo moves with hi (kernels/gates.py)
        return dq, dk, dv, (db, jnp.zeros_like(b[1])), d_h0

    attention.defvjp(fwd, bwd)
    return attention
