"""LASP-2 on 8 host devices equals the single-device op: outputs, final states and
gradients on meshes (seq=8), (data=2, seq=4) and (fsdp=2, seq=2, tensor=2); one
all-gather forward and one reduce-scatter backward, of a size independent of T, and
no collective-permute in the compiled program."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tests.ops.helpers import assert_close
from xformjax import ops
from xformjax.parallel import make_mesh, sequence_parallel

B, T, H, K, V = 2, 64, 2, 8, 6

# Eight shards along T (the fold over many earlier shards), and every axis at once
# (batch split over fsdp, heads over tensor, T over seq). A data×seq mesh adds
# nothing these two do not exercise: data and fsdp are both batch axes here.
MESHES = {
    "seq8": {"seq": 8},
    "fsdp2-seq2-tensor2": {"fsdp": 2, "seq": 2, "tensor": 2},
}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"seq": 4})


def _inputs(seed=0, rows=1):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = normal(B, T * rows, H, K)
    return {
        "q": normal(B, T, H, K),
        "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        "v": normal(B, T * rows, H, V),
        "g": jnp.asarray(np.log(rng.uniform(0.8, 1.0, (B, T, H))), jnp.float32),
        "gk": jnp.asarray(np.log(rng.uniform(0.9, 1.0, (B, T, H, K))), jnp.float32),
        "beta": jnp.asarray(rng.uniform(0.05, 1.95, (B, T * rows, H)), jnp.float32),
        "init": normal(B, H, K, V),
    }


CASES = {
    "linear": (ops.linear_attention, ("q", "k", "v"), {}),
    "linear-g": (ops.linear_attention, ("q", "k", "v", "g"), {}),
    "linear-g-head": (ops.linear_attention, ("q", "k", "v"), {"head_gate": True}),
    "linear-gk-normalize": (ops.linear_attention, ("q", "k", "v", "g", "gk"), {"normalize": True}),
    "delta": (ops.delta_rule, ("q", "k", "v", "beta"), {}),
    "gated-delta": (ops.delta_rule, ("q", "k", "v", "beta", "g"), {}),
    "kda": (ops.delta_rule, ("q", "k", "v", "beta", "gk"), {}),
    "deltaproduct": (ops.delta_product, ("q", "k", "v", "beta", "g"), {"num_householder": 2}),
}


def _call(fn, case, inputs, with_init):
    _op, names, options = CASES[case]
    options = dict(options)
    kwargs = {n: inputs[n] for n in names if n not in ("q", "k", "v", "beta")}
    if options.pop("head_gate", False):
        kwargs["g"] = jnp.log(jnp.array([0.9, 0.99]))
    if options.get("normalize") and with_init:
        init = jnp.concatenate([inputs["init"], jnp.abs(inputs["init"][..., :1])], -1)
    else:
        init = inputs["init"]
    positional = [inputs["q"], inputs["k"], inputs["v"]]
    if options.get("normalize"):  # positive features: a well-conditioned normaliser
        positional[:2] = [jnp.abs(x) + 0.1 for x in positional[:2]]
    if "beta" in names:
        positional.append(inputs["beta"])
    return fn(
        *positional,
        **kwargs,
        **options,
        initial_state=init if with_init else None,
        output_final_state=True,
        chunk_size=16,
    )


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_the_single_device_op(case, mesh_name):
    op = CASES[case][0]
    rows = CASES[case][2].get("num_householder", 1)
    inputs = _inputs(rows=rows)
    parallel = sequence_parallel(op, make_mesh(MESHES[mesh_name]))
    for with_init in (False, True):
        o_ref, s_ref = _call(op, case, inputs, with_init)
        # called at once, inside the loop: the lambda sees this iteration's with_init
        o, s = jax.jit(lambda x: _call(parallel, case, x, with_init))(inputs)  # noqa: B023
        assert_close(o, o_ref, 1e-5, f"{case} o")
        assert_close(s, s_ref, 1e-5, f"{case} final state")

    cotangent = jax.random.normal(jax.random.key(1), o_ref.shape)

    def loss(fn):
        def value(x):
            o, s = _call(fn, case, x, True)
            return jnp.sum(o * cotangent) + jnp.sum(jnp.sin(s))

        return value

    grads_ref = jax.grad(loss(op))(inputs)
    grads = jax.jit(jax.grad(loss(parallel)))(inputs)
    _, names, _ = CASES[case]
    for name in list(names) + ["init"]:
        if name == "g" and CASES[case][2].get("head_gate"):
            continue
        assert_close(grads[name], grads_ref[name], 1e-5, f"{case} d{name}")


def _collectives(jaxpr_text: str) -> dict[str, int]:
    names = ("all_gather", "reduce_scatter", "psum_scatter", "psum", "all_to_all", "ppermute")
    counts = {}
    for name in names:
        counts[name] = len(
            [
                line
                for line in jaxpr_text.splitlines()
                if f" {name}[" in line or f"= {name}" in line or line.strip().startswith(f"{name}[")
            ]
        )
    return {k: v for k, v in counts.items() if v}


@pytest.mark.parametrize("case", ["linear-g", "gated-delta"])
def test_one_collective_each_way_and_volume_independent_of_length(mesh, case):
    op = CASES[case][0]
    parallel = sequence_parallel(op, mesh)
    inputs = _inputs()
    forward = str(jax.make_jaxpr(lambda x: _call(parallel, case, x, True))(inputs))
    assert _collectives(forward) == {"all_gather": 1}, _collectives(forward)

    def loss(x):
        o, s = _call(parallel, case, x, True)
        return jnp.sum(o) + jnp.sum(s)

    backward = str(jax.make_jaxpr(jax.grad(loss))(inputs))
    # the forward's all-gather, its transpose (one reduce-scatter of the pairs'
    # cotangents) and the sum of the replicated initial state's gradient
    assert _collectives(backward) == {"all_gather": 1, "reduce_scatter": 1, "psum": 1}

    shapes = []
    for length in (64, 256):
        rng_inputs = {**inputs}
        for name in ("q", "k", "v", "g", "beta"):
            rng_inputs[name] = jnp.concatenate([inputs[name]] * (length // T), axis=1)
        jaxpr = jax.make_jaxpr(lambda x: _call(parallel, case, x, True))(rng_inputs)
        gathers = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "all_gather"]
        shapes.append(gathers[0].outvars[0].aval.shape)
    assert shapes[0] == shapes[1]


def _hlo_collectives(case: str, length: int) -> list[str]:
    """The collective instructions of the compiled forward on (fsdp=2, seq=2,
    tensor=2), with its inputs laid out as a sharded training step has them."""
    mesh = make_mesh(MESHES["fsdp2-seq2-tensor2"])
    parallel = sequence_parallel(CASES[case][0], mesh)
    split = NamedSharding(mesh, PartitionSpec("fsdp", "seq", "tensor"))
    state = NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    rows = CASES[case][2].get("num_householder", 1)
    inputs = {
        name: jax.ShapeDtypeStruct(
            (B, value.shape[1] // T * length) + value.shape[2:], value.dtype, sharding=split
        )
        for name, value in _inputs(rows=rows).items()
        if name != "init"
    }
    inputs["init"] = jax.ShapeDtypeStruct((B, H, K, V), jnp.float32, sharding=state)
    compiled = jax.jit(lambda x: _call(parallel, case, x, True)).lower(inputs).compile()
    kinds = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return [
        line.strip()
        for line in compiled.as_text().splitlines()
        if any(f" {kind}(" in line or f" {kind}-start(" in line for kind in kinds)
    ]


def _result_elements(instruction: str) -> int:
    """Elements of an HLO instruction's result (``%x = f32[2,1,1,112]{...} op(...)``)."""
    dims = re.search(r"= \w+\[([\d,]*)\]", instruction).group(1)
    return int(np.prod([int(d) for d in dims.split(",") if d]))


#: numbers per (batch, head) in one shard's packed pair: transition + contribution
PAIR_SIZE = {
    "linear": K * V,
    "linear-g": 1 + K * V,
    "linear-gk-normalize": K + K * (V + 1),
    "gated-delta": K * K + K * V,
    "deltaproduct": K * K + K * V,
}


@pytest.mark.parametrize("case", PAIR_SIZE)
def test_compiled_forward_gathers_a_length_independent_volume(case):
    volumes = []
    for length in (T, 4 * T):
        collectives = _hlo_collectives(case, length)
        assert not [c for c in collectives if "collective-permute" in c], collectives
        gathers = [c for c in collectives if "all-gather" in c]
        assert len(gathers) == 1, collectives  # one all-gather, nothing else
        assert len(collectives) == 1, collectives
        volumes.append(sum(_result_elements(c) for c in gathers))
    assert volumes[0] == volumes[1], volumes
    # the pairs of the 2 seq shards, each [B/2, H/2, PAIR_SIZE]: plain linear attention
    # sends no transition, a scalar gate one number, a delta rule K × K
    assert volumes[0] == 2 * (B // 2) * (H // 2) * PAIR_SIZE[case]


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            if hasattr(param, "eqns"):
                yield from _all_eqns(param)
            elif hasattr(getattr(param, "jaxpr", None), "eqns"):
                yield from _all_eqns(param.jaxpr)


def test_errors(mesh):
    parallel = sequence_parallel(ops.linear_attention, mesh)
    x = jnp.ones((1, 30, 1, 4))
    with pytest.raises(ValueError, match="T=30 must be divisible by the 'seq' axis size 4"):
        parallel(x, x, x)
    with pytest.raises(ValueError, match="cu_seqlens"):
        parallel(x[:, :28], x[:, :28], x[:, :28], cu_seqlens=jnp.array([0, 10, 28]))
    with pytest.raises(ValueError, match="no axis 'sequence'"):
        sequence_parallel(ops.delta_rule, mesh, axis="sequence")
    with pytest.raises(ValueError, match="supports ops.linear_attention"):
        sequence_parallel(jnp.sum, mesh)


@pytest.mark.parametrize("name", ["gated_deltanet", "gla", "retnet", "attn", "sigmoid_attn"])
def test_layers_switch_to_sequence_parallelism_under_a_seq_mesh(name):
    from flax import nnx

    from xformjax import nn

    config = nn.MixerConfig(
        d_model=32,
        num_heads=2,
        chunk_size=16,
        max_seq_len=64,
        window=20 if name == "attn" else None,
    )
    layer = nn.MIXERS[name](config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 64, 32))

    def loss(module, x):
        y, state = module(x)
        cached = getattr(state, "memory", getattr(state, "k", None))
        return jnp.sum(y * jnp.cos(x)) + jnp.sum(cached)

    collective = "ppermute" if name == "attn" else "all_gather"  # attn: a window halo
    value_ref, grads_ref = nnx.jit(nnx.value_and_grad(loss))(layer, x)
    assert collective not in str(jax.make_jaxpr(lambda x: layer(x))(x))
    mesh = jax.make_mesh(
        (4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4]
    )
    with jax.set_mesh(mesh):
        assert collective in str(jax.make_jaxpr(lambda x: layer(x))(x))
        value, grads = nnx.jit(nnx.value_and_grad(loss))(layer, x)
        # T not divisible by the axis: the layer falls back to the local op
        y_odd, _ = layer(x[:, :63])
    assert float(value) == pytest.approx(float(value_ref), rel=1e-5)
    for (path, got), (_, want) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_ref)):
        assert_close(got, want, 1e-4, f"{name} d{'/'.join(map(str, path))}")
    assert_close(y_odd, layer(x[:, :63])[0], 1e-6, "fallback")
