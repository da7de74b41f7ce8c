"""The TPU kernels' ``pallas_call`` driver: one sequential chunked scan per (batch·head) row.

A *chunked scan* walks the chunks of each (batch·head) row in order (or in
reverse, for a backward pass) and carries one float32 ``[K, V]`` matrix::

    for n in chunks:                       # reversed when reverse=True
        outs_n, carry = step(tokens_n, per_chunk_n, carry)

* ``tokens``: arrays ``[R, L, D_i]`` (``L`` = chunks·C), read as ``[C, D_i]`` tiles;
* ``per_chunk``: arrays ``[R, N, K, V]``, read as the chunk's ``[K, V]``;
* ``carry0``: ``[R, K, V]``, the carry entering the first visited chunk.

It returns the token outputs ``[R, L, D_o]`` (in the given dtypes), the carry
*entering* every chunk ``[R, N, K, V]`` when ``save_entering`` (the forward
pass saves these boundary states for the backward), and the final carry
``[R, K, V]``.

Mosaic runs it as a grid ``(R, N)`` with the chunk axis ``"arbitrary"``
(sequential); BlockSpecs stream ``[C, D]`` tiles and the carry lives in a VMEM
scratch that persists across the chunk axis. (GPUs run the chunk-parallel
decomposition of ``kernels/gpu/`` instead: a program per row walking every
chunk with the whole state on chip does not fit an H100's shared memory at
K = V = 128, and leaves most SMs idle.)

``interpret=True`` runs it with Pallas' TPU interpreter on the CPU
(``pltpu.InterpretParams()``, which also checks TPU semantics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .config import Target

F32 = jnp.float32
Step = Callable[[list, list, jax.Array], tuple[list, jax.Array]]


def chunk_scan(
    step: Step,
    tokens: Sequence[jax.Array],
    per_chunk: Sequence[jax.Array],
    carry0: jax.Array,
    *,
    chunk_size: int,
    out_dims: Sequence[int],
    out_dtypes: Sequence[jnp.dtype],
    save_entering: bool,
    reverse: bool,
    target: Target,
    interpret: bool,
    name: str,
):
    """Run ``step`` over every chunk of every row; see the module docstring."""
    rows, length = tokens[0].shape[:2]
    if length % chunk_size:
        raise ValueError(f"{name}: length {length} is not a multiple of the chunk {chunk_size}")
    num_chunks = length // chunk_size
    state_shape = carry0.shape[1:]
    out_shapes = [
        jax.ShapeDtypeStruct((rows, length, dim), dtype) for dim, dtype in zip(out_dims, out_dtypes)
    ]
    out_shapes.append(jax.ShapeDtypeStruct((rows,) + state_shape, F32))
    if save_entering:
        out_shapes.append(jax.ShapeDtypeStruct((rows, num_chunks) + state_shape, F32))
    if target != "tpu":
        raise ValueError(f"{name}: the sequential driver is the TPU kernels'; got {target!r}")
    results = _tpu_call(
        step,
        tokens,
        per_chunk,
        carry0,
        out_shapes,
        chunk_size=chunk_size,
        num_chunks=num_chunks,
        save_entering=save_entering,
        reverse=reverse,
        interpret=interpret,
        name=name,
    )
    num_out = len(out_dims)
    token_outs, final = list(results[:num_out]), results[num_out]
    entering = results[num_out + 1] if save_entering else None
    return token_outs, entering, final


def _split_refs(refs, num_tokens, num_chunk, num_outs, save_entering):
    token_refs = refs[:num_tokens]
    chunk_refs = refs[num_tokens : num_tokens + num_chunk]
    carry0_ref = refs[num_tokens + num_chunk]
    rest = refs[num_tokens + num_chunk + 1 :]
    out_refs, final_ref = rest[:num_outs], rest[num_outs]
    entering_ref = rest[num_outs + 1] if save_entering else None
    scratch = rest[num_outs + 1 + int(save_entering) :]
    return token_refs, chunk_refs, carry0_ref, out_refs, final_ref, entering_ref, scratch


def _specs(token_spec, chunk_spec, row_spec, tokens, per_chunk, token_outs, save_entering):
    """BlockSpecs in the driver's argument order: token tiles, per-chunk states, the
    initial carry; outputs: token tiles, the final carry, the entering states."""
    in_specs = [token_spec(x.shape[2]) for x in tokens] + [chunk_spec] * len(per_chunk) + [row_spec]
    out_specs = [token_spec(x.shape[2]) for x in token_outs] + [row_spec]
    if save_entering:
        out_specs.append(chunk_spec)
    return in_specs, out_specs


def _tpu_call(
    step,
    tokens,
    per_chunk,
    carry0,
    out_shapes,
    *,
    chunk_size,
    num_chunks,
    save_entering,
    reverse,
    interpret,
    name,
):
    num_outs = len(out_shapes) - 1 - int(save_entering)
    last = num_chunks - 1

    def chunk_index(n):
        return last - n if reverse else n

    def kernel(*refs):
        (token_refs, chunk_refs, carry0_ref, out_refs, final_ref, entering_ref, (carry_ref,)) = (
            _split_refs(refs, len(tokens), len(per_chunk), num_outs, save_entering)
        )
        n = pl.program_id(1)

        @pl.when(n == 0)
        def _():
            carry_ref[...] = carry0_ref[...].astype(F32)

        carry = carry_ref[...]
        if save_entering:
            assert entering_ref is not None  # _split_refs gives it whenever save_entering
            entering_ref[...] = carry
        outs, new_carry = step([r[...] for r in token_refs], [r[...] for r in chunk_refs], carry)
        for ref, value in zip(out_refs, outs):
            ref[...] = value.astype(ref.dtype)
        carry_ref[...] = new_carry

        @pl.when(n == last)
        def _():
            final_ref[...] = new_carry

    state_shape = carry0.shape[1:]
    token_spec = lambda dim: pl.BlockSpec(
        (None, chunk_size, dim), lambda r, n: (r, chunk_index(n), 0)
    )
    chunk_spec = pl.BlockSpec((None, None) + state_shape, lambda r, n: (r, chunk_index(n), 0, 0))
    row_spec = pl.BlockSpec((None,) + state_shape, lambda r, n: (r, 0, 0))
    in_specs, out_specs = _specs(
        token_spec, chunk_spec, row_spec, tokens, per_chunk, out_shapes[:num_outs], save_entering
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=(carry0.shape[0], num_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(state_shape, F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )(*tokens, *per_chunk, carry0)
