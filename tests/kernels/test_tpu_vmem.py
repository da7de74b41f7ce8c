"""The TPU kernels fit a chip's scoped VMEM and have the chunk-parallel grid structure.

* Each kernel's VMEM (``vmem_bytes`` beside it: double-buffered blocks padded to
  ``(8, 128)`` tiles, scratch, live float32 temporaries) at the compile gate's shapes —
  ``(K, V)`` ∈ {(128, 128), (128, 256), (256, 256)}, bf16 and float32 — is within the
  scoped VMEM limit of v5e (16 MiB) and v6e (32 MiB).
* Tracing the kernels for TPU (no lowering) gives exactly the stated ``pallas_call``s:
  the state recurrences on a grid ``(B·H, V/128, N)`` with dimension semantics
  ``("parallel", "parallel", "arbitrary")``, every other kernel on ``(B·H, N)`` with
  ``("parallel", "parallel")``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from xformjax import kernels  # pyright: ignore[reportAttributeAccessIssue]
from xformjax.kernels.tpu import chunk, common, gla, state  # pyright: ignore[reportMissingImports]
from xformjax.parallel.tpu import CHIPS, MIB

HEAD_SIZES = ((128, 128), (128, 256), (256, 256))
DTYPES = (jnp.bfloat16, jnp.float32)
CHUNK = kernels.block_config("tpu").chunk_size
CHANNEL_CHUNK = kernels.block_config("tpu").channel_chunk_size


def all_vmem(key_width: int, value_width: int, dtype) -> dict[str, int]:
    """Every TPU kernel's VMEM at one head size and dtype."""
    tiles = common.Tiles(CHUNK, key_width, value_width)
    channel = common.Tiles(CHANNEL_CHUNK, key_width, value_width)
    sizes = {f"chunk.{name}": chunk.vmem_bytes(tiles, dtype, kernel=name) for name in chunk.KERNELS}
    sizes |= {f"gla.{name}": gla.vmem_bytes(channel, dtype, kernel=name) for name in gla.KERNELS}
    for reverse in (False, True):
        for delta in (False, True):
            sizes[f"state.delta={delta}.reverse={reverse}"] = state.vmem_bytes(
                tiles, dtype, delta=delta, reverse=reverse
            )
        sizes[f"state.channel.reverse={reverse}"] = state.vmem_bytes(
            channel, dtype, gate_width=key_width, delta=False, reverse=reverse
        )
    return sizes


def test_tile_accounting_pads_to_whole_tiles():
    assert common.tile_bytes((64, 1), jnp.float32) == 64 * 128 * 4
    assert common.tile_bytes((8, 128), jnp.bfloat16) == 16 * 128 * 2
    assert common.tile_bytes((256, 128), jnp.bfloat16) == 256 * 128 * 2
    block = common.token(64, 256, jnp.float32, lambda r, n: (r, n, 0))
    assert block.bytes == 64 * 256 * 4
    # the state kernel of linear attention, K = V = 256, float32: blocks k, v, b (hi and lo
    # of the compensated pair), h0 in; h, final out (twice each), the scratch tile,
    # 4·C·K + 3·K·BV float32 temporaries
    tiles = common.Tiles(64, 256, 256)
    blocks = 64 * 256 * 4 + 64 * 128 * 4 + 2 * 64 * 128 * 4 + 3 * 256 * 128 * 4
    expected = 2 * blocks + 256 * 128 * 4 + 4 * (4 * 64 * 256 + 3 * 256 * 128)
    assert state.vmem_bytes(tiles, jnp.float32, delta=False, reverse=False) == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("dims", HEAD_SIZES, ids=lambda d: f"K{d[0]}V{d[1]}")
def test_every_kernel_fits_the_scoped_vmem_of_v5e_and_v6e(dims, dtype):
    sizes = all_vmem(dims[0], dims[1], dtype)
    assert len(sizes) == len(chunk.KERNELS) + len(gla.KERNELS) + 6
    limit = min(CHIPS["v5e"].scoped_vmem_bytes, CHIPS["v6e"].scoped_vmem_bytes)
    assert limit == 16 * MIB
    over = {name: size / MIB for name, size in sizes.items() if size > limit}
    assert not over, f"over the 16 MiB scoped VMEM: {over}"
    # the largest kernels still leave room for double-buffering changes
    assert max(sizes.values()) < 8 * MIB


def pallas_calls(fn, *args) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """``(name, grid, dimension semantics)`` of every ``pallas_call`` in ``fn``'s jaxpr."""
    found = []

    def semantics(params) -> tuple[str, ...]:
        compiler = params["compiler_params"]
        if isinstance(compiler, dict):  # keyed by backend in some jax versions
            compiler = next(iter(compiler.values()))
        return tuple(str(s) for s in compiler.dimension_semantics)

    def name(params) -> str:
        if "name" in params:
            return params["name"]
        return params["name_and_src_info"].name

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                params = eqn.params
                found.append((name(params), tuple(params["grid_mapping"].grid), semantics(params)))
                continue
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


B, T, H, K, V = 1, 256, 2, 128, 256
PARALLEL = ("parallel", "parallel")
RECURRENT = ("parallel", "parallel", "arbitrary")


def _spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


SEQ, VAL, GATE = _spec(B, T, H, K), _spec(B, T, H, V), _spec(B, T, H, dtype=jnp.float32)
FAMILIES = {
    "linear_attention": (
        lambda q, k, v, g: kernels.linear_attention(q, k, v, g=g, target="tpu"),
        (SEQ, SEQ, VAL, GATE),
        ["linear_attention_state_fwd", "linear_attention_output_fwd"],
        ["linear_attention_state_bwd", "linear_attention_chunk_bwd"],
    ),
    "delta_rule": (
        lambda q, k, v, beta, g: kernels.delta_rule(q, k, v, beta, g=g, target="tpu"),
        (SEQ, SEQ, VAL, GATE, GATE),
        ["delta_rule_wy", "delta_rule_state_fwd", "delta_rule_output_fwd"],
        [
            "delta_rule_wy",
            "delta_rule_state_fwd",
            "delta_rule_dv_local",
            "delta_rule_state_bwd",
            "delta_rule_chunk_bwd",
        ],
    ),
    "gated_linear_attention": (
        lambda q, k, v, gk: kernels.linear_attention(q, k, v, gk=gk, target="tpu"),
        (SEQ, SEQ, VAL, _spec(B, T, H, K, dtype=jnp.float32)),
        ["gated_linear_attention_state_fwd", "gated_linear_attention_output_fwd"],
        ["gated_linear_attention_state_bwd", "gated_linear_attention_chunk_bwd"],
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_have_the_chunk_parallel_grids(family):
    fn, args, forward, backward = FAMILIES[family]

    def loss(*arrays):
        o, final = fn(*arrays)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final**2)

    fwd_calls = pallas_calls(fn, *args)
    grad_calls = pallas_calls(jax.grad(loss, argnums=tuple(range(len(args)))), *args)
    assert [c[0] for c in fwd_calls] == forward
    assert [c[0] for c in grad_calls] == forward + backward
    rows, chunks = B * H, T // 64
    for call_name, grid, dims in grad_calls:
        if "_state_" in call_name:
            assert grid == (rows, V // 128, chunks) and dims == RECURRENT, call_name
        else:
            assert grid == (rows, chunks) and dims == PARALLEL, call_name
