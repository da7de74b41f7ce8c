"""``ops.softmax_attention`` / ``ops.sigmoid_attention`` against the float64 reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops import reference
from tests.ops.helpers import as_jax, assert_close, relative_error, vjp_of
from xformjax import ops

MODES = ("parallel", "chunk", "recurrent")
KINDS = {"softmax": ops.softmax_attention, "sigmoid": ops.sigmoid_attention}


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    q_len: int
    k_len: int
    q_heads: int
    kv_heads: int
    key_dim: int
    value_dim: int
    chunk_size: int = 16
    causal: bool = True
    window: int | None = None
    cu_seqlens: tuple[int, ...] | None = None


CASES = {
    "causal-T63-gqa": Case(2, 63, 63, 4, 2, 7, 10),
    "bidirectional-T100": Case(1, 100, 100, 3, 3, 16, 8, chunk_size=32, causal=False),
    "window-T257": Case(1, 257, 257, 2, 1, 12, 5, chunk_size=64, window=40),
    "bidirectional-window": Case(2, 63, 63, 2, 2, 5, 6, causal=False, window=9),
    "packed-uneven": Case(1, 100, 100, 2, 1, 6, 9, cu_seqlens=(0, 1, 38, 38, 64, 100)),
    "packed-window-bidir": Case(
        1, 100, 100, 2, 2, 6, 4, causal=False, window=7, cu_seqlens=(0, 17, 60, 100)
    ),
    "queries-after-cache": Case(2, 5, 70, 4, 1, 8, 8),
    "decode-T1": Case(2, 1, 63, 4, 2, 16, 16, window=20),
}


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((case.batch, case.q_len, case.q_heads, case.key_dim)),
        "k": rng.standard_normal((case.batch, case.k_len, case.kv_heads, case.key_dim)),
        "v": rng.standard_normal((case.batch, case.k_len, case.kv_heads, case.value_dim)),
    }


def check_against_reference(case: Case, kind: str, mode: str, dtype, tol: float):
    inputs = make_inputs(case)
    d_o = np.random.default_rng(1).standard_normal(
        (case.batch, case.q_len, case.q_heads, case.value_dim)
    )
    o_ref, grads_ref = reference.attention(
        **inputs,
        kind=kind,
        causal=case.causal,
        window=case.window,
        cu_seqlens=case.cu_seqlens,
        d_o=d_o,
    )
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens, jnp.int32)

    def fn(floats):
        return KINDS[kind](
            **floats,
            causal=case.causal,
            window=case.window,
            cu_seqlens=cu,
            mode=mode,
            chunk_size=case.chunk_size,
        )[0]

    o, (grads,) = vjp_of(fn, (as_jax(inputs, dtype),), jnp.asarray(d_o, dtype))
    assert o.dtype == dtype
    assert_close(o, o_ref, tol, "o")
    for name in inputs:
        assert_close(grads[name], grads_ref[name], tol, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_float64_matches_reference(x64, mode, kind, case):
    check_against_reference(CASES[case], kind, mode, jnp.float64, 1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_reference(mode, kind):
    check_against_reference(CASES["window-T257"], kind, mode, jnp.float32, 1e-4)
    check_against_reference(CASES["packed-uneven"], kind, mode, jnp.float32, 1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs_give_bfloat16_outputs(mode):
    case = CASES["causal-T63-gqa"]
    inputs = make_inputs(case)
    o_ref, _ = reference.attention(**inputs)
    o, _ = ops.softmax_attention(**as_jax(inputs, jnp.bfloat16), mode=mode, chunk_size=16)
    assert o.dtype == jnp.bfloat16
    assert relative_error(o, o_ref) <= 1e-2


def test_sigmoid_bias_defaults_to_minus_log_length(x64):
    case = CASES["causal-T63-gqa"]
    inputs = as_jax(make_inputs(case))
    default, _ = ops.sigmoid_attention(**inputs)
    explicit, _ = ops.sigmoid_attention(**inputs, bias=-float(np.log(case.k_len)))
    other, _ = ops.sigmoid_attention(**inputs, bias=0.0)
    assert relative_error(default, explicit) <= 1e-12
    assert relative_error(other, explicit) > 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["window-T257", "queries-after-cache"])
def test_sigmoid_bias_per_query_matches_reference(x64, mode, case):
    case = CASES[case]
    inputs = make_inputs(case)
    bias = 1.0 - np.log(np.arange(case.k_len - case.q_len, case.k_len) + 1.0)
    d_o = np.random.default_rng(1).standard_normal(
        (case.batch, case.q_len, case.q_heads, case.value_dim)
    )
    o_ref, grads_ref = reference.attention(
        **inputs, kind="sigmoid", window=case.window, bias=bias, d_o=d_o
    )

    def fn(floats):
        return ops.sigmoid_attention(
            **floats,
            window=case.window,
            bias=jnp.asarray(bias),
            mode=mode,
            chunk_size=case.chunk_size,
        )[0]

    o, (grads,) = vjp_of(fn, (as_jax(inputs),), jnp.asarray(d_o))
    assert_close(o, o_ref, 1e-9, "o")
    for name in inputs:
        assert_close(grads[name], grads_ref[name], 1e-9, f"d{name}")


def test_sigmoid_bias_of_the_wrong_shape_or_type_is_rejected():
    inputs = as_jax(make_inputs(CASES["causal-T63-gqa"]), jnp.float32)
    with pytest.raises(ValueError, match=r"shape \[Tq\] = \[63\]; got shape \[5\]"):
        ops.sigmoid_attention(**inputs, bias=jnp.zeros(5))
    with pytest.raises(TypeError, match="`bias` must be None, a number or an array"):
        ops.sigmoid_attention(**inputs, bias="x")


def test_decoding_against_a_growing_cache_matches_the_full_forward(x64):
    case = CASES["causal-T63-gqa"]
    inputs = as_jax(make_inputs(case))
    full, _ = ops.softmax_attention(**inputs, window=16, mode="chunk", chunk_size=16)
    for t in (0, 1, 30, 62):
        step, _ = ops.softmax_attention(
            inputs["q"][:, t : t + 1],
            inputs["k"][:, : t + 1],
            inputs["v"][:, : t + 1],
            window=16,
            mode="recurrent",
        )
        assert relative_error(step, full[:, t : t + 1]) <= 1e-12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ("parallel", "recurrent"))
def test_partly_filled_cache_equals_the_trimmed_cache(x64, kind, mode):
    """A fixed-capacity cache filled up to ``kv_length`` (garbage beyond it, and a
    traced length) gives the same output and gradients as the cache cut to that length."""
    case = CASES["queries-after-cache"]
    inputs = as_jax(make_inputs(case))
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    used = 40
    fn = KINDS[kind]
    trimmed, _ = fn(q, k[:, :used], v[:, :used], window=25, mode=mode)
    garbage = 1e3 * jnp.ones_like(k[:, used:])

    def padded(q, k_used, v_used, length):
        k_full = jnp.concatenate([k_used, garbage], 1)
        v_full = jnp.concatenate([v_used, garbage], 1)
        return fn(q, k_full, v_full, window=25, mode=mode, kv_length=length)[0]

    out = jax.jit(padded)(q, k[:, :used], v[:, :used], used)
    assert relative_error(out, trimmed) <= 1e-12
    grads = jax.grad(lambda *a: jnp.sum(padded(*a, used) ** 2), (0, 1, 2))(
        q, k[:, :used], v[:, :used]
    )
    fn_trim = lambda q, k, v: jnp.sum(fn(q, k, v, window=25, mode=mode)[0] ** 2)
    expected = jax.grad(fn_trim, (0, 1, 2))(q, k[:, :used], v[:, :used])
    for got, want in zip(grads, expected):
        assert relative_error(got, want) <= 1e-12


def test_kv_length_errors():
    inputs = as_jax(make_inputs(CASES["queries-after-cache"]), jnp.float32)
    with pytest.raises(ValueError, match="kv_length.*mode='parallel'"):
        ops.softmax_attention(**inputs, kv_length=10, mode="chunk")
    with pytest.raises(ValueError, match=r"kv_length`=3 must lie in \[Tq, Tk\] = \[5, 70\]"):
        ops.softmax_attention(**inputs, kv_length=3, mode="parallel")


# --- packed documents: segment_ids [B, Tk] ---

# (length, id) of each document per row; ids need not be ordered, only distinct
PACKED_ROWS = (((7, 4), (20, 1), (13, 2)), ((30, 0), (10, 5)))


def _packed_ids() -> jax.Array:
    return jnp.asarray(
        [np.concatenate([np.full(n, i) for n, i in row]) for row in PACKED_ROWS], jnp.int32
    )


def _row_documents():
    for b, row in enumerate(PACKED_ROWS):
        start = 0
        for n, _ in row:
            yield b, start, start + n
            start += n


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("kind", "window"), [("softmax", 9), ("sigmoid", None)])
def test_segment_ids_equal_each_document_alone(x64, kind, window, mode):
    """Each document of a packed row (grouped-query heads, a window, sigmoid's default
    bias counting the document's keys) gets the outputs and gradients of the float64
    reference run on it alone."""
    inputs = make_inputs(Case(2, 40, 40, 4, 2, 6, 5))
    d_o = np.random.default_rng(1).standard_normal(inputs["q"].shape[:3] + (5,))
    ids = _packed_ids()

    def fn(x):
        return KINDS[kind](**x, window=window, mode=mode, chunk_size=16, segment_ids=ids)[0]

    o, (grads,) = vjp_of(fn, (as_jax(inputs),), jnp.asarray(d_o))
    for b, start, end in _row_documents():
        part = {name: a[b : b + 1, start:end] for name, a in inputs.items()}
        o_ref, grads_ref = reference.attention(
            **part, kind=kind, window=window, d_o=d_o[b : b + 1, start:end]
        )
        assert_close(o[b : b + 1, start:end], o_ref, 1e-12, f"o [{b}, {start}:{end}]")
        for name in inputs:
            got = grads[name][b : b + 1, start:end]
            assert_close(got, grads_ref[name], 1e-12, f"d{name} [{b}, {start}:{end}]")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ("parallel", "recurrent"))
def test_segment_ids_in_a_partly_filled_cache(x64, kind, mode):
    """Queries at the end of a partly filled cache attend only to cached keys of their
    own document (the cache remembers each key's document)."""
    inputs = as_jax(make_inputs(Case(1, 3, 48, 2, 1, 6, 5)))
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    ids = jnp.asarray([[1] * 12 + [2] * 18 + [0] * 18], jnp.int32)  # 30 keys filled
    out = jax.jit(
        lambda length: KINDS[kind](q, k, v, mode=mode, kv_length=length, segment_ids=ids)[0]
    )(30)
    alone, _ = KINDS[kind](q, k[:, 12:30], v[:, 12:30], mode=mode)
    assert relative_error(out, alone) <= 1e-12


def test_segment_ids_errors():
    inputs = as_jax(make_inputs(CASES["causal-T63-gqa"]), jnp.float32)
    with pytest.raises(TypeError, match="`segment_ids` must be an integer array"):
        ops.softmax_attention(**inputs, segment_ids=jnp.zeros((2, 63)))
    with pytest.raises(ValueError, match="segment_ids"):
        ops.softmax_attention(**inputs, segment_ids=jnp.zeros((2, 62), jnp.int32))
    with pytest.raises(ValueError, match="either `segment_ids` or `cu_seqlens`"):
        ops.sigmoid_attention(
            **as_jax(make_inputs(CASES["packed-uneven"]), jnp.float32),
            cu_seqlens=jnp.asarray([0, 50, 100]),
            segment_ids=jnp.zeros((1, 100), jnp.int32),
        )
