"""Documents packed into rows stay apart: for every mixer, a row holding several
documents gives each document the outputs and gradients it gets alone.

Row 0 packs three documents and three padding tokens, row 1 three documents; with
``chunk_size`` 8 the documents begin and end inside chunks. The packed call gets
``segment_ids`` (positions derived), each document alone is a fresh call; outputs,
the parameters' gradients and the input's gradient (of a random linear function of
the real tokens' outputs) must agree to 1e-5 in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.test_mixers import BASE, VARIANTS
from tests.ops.helpers import assert_close
from xformjax import nn
from xformjax.nn.packing import Packing, derived_positions, make_packing

LENGTH = 32
# document lengths per row; the rest is padding (id 0). Three lengths in all: the alone
# runs are batched by length (three programs, not five).
ROWS = ((9, 14, 6), (14, 9, 9))
TOL = 1e-5

# One variant per registered mixer, and the options that change what a reset must
# clear (conv caches, MALA's running sums, a normaliser, TransNormer's two layers,
# the Titans variants, MoM's memories).
PACKED_VARIANTS = (
    "attn",
    "attn-gqa-window",
    "sigmoid_attn",
    "linear_attn-elu",
    "linear_attn-elu-normalized",
    "linear_attn-mala",
    "linear_attn-short-conv",
    "transnormer-diag",
    "transnormer-norm",
    "lightning",
    "retnet",
    "gla",
    "gla-short-conv",
    "lightnet",
    "deltanet",
    "gated_deltanet",
    "deltaproduct",
    "diag_rnn-negative-eigenvalues",
    "aaren",
    "mom",
    "mom-private-negeig-noconv",
    "titans-mal",
    "titans-mag",
    "titans-mac",
    "atlas",
)


def segment_ids(rows=ROWS, length: int = LENGTH) -> np.ndarray:
    ids = np.zeros((len(rows), length), np.int32)
    for b, lengths in enumerate(rows):
        start = 0
        for index, size in enumerate(lengths):
            ids[b, start : start + size] = index + 1
            start += size
    return ids


def documents(rows=ROWS):
    """``(row, start, end)`` of every document."""
    for b, lengths in enumerate(rows):
        start = 0
        for size in lengths:
            yield b, start, start + size
            start += size


def build(variant: str, dtype: str = "float32") -> nn.Mixer:
    name, overrides, layer_index, num_layers = VARIANTS[variant]
    config = dataclasses.replace(BASE, chunk_size=8, dtype=dtype, param_dtype=dtype, **overrides)
    return nn.MIXERS[name](config, layer_index=layer_index, num_layers=num_layers, rngs=nnx.Rngs(0))


def test_every_registered_mixer_is_checked_packed():
    assert {VARIANTS[v][0] for v in PACKED_VARIANTS} == set(nn.MIXERS)


# ATLAS is checked in float64: its own float32 error is about TOL (alone, float32 against
# float64: outputs 1.4e-6, the γ gate bias's gradient 3.2e-5 — Muon's Newton–Schulz
# iterations amplify rounding and that gradient sums terms of both signs), so two float32
# runs of one document, packed and alone (other shapes, other rounding), differ by as
# much. In float64 packed equals alone to 2e-14: the layout is exact, checked to 1e-12.
FLOAT64 = {"atlas": 1e-12}


# The neural-memory layers run their chunk form over a compact buffer when every row's
# documents fit it (ROWS do: Titans-MAG and -MAC check that branch); a row of many
# documents (row 0 of MANY_DOCUMENTS: 7 slots of 8 tokens, the compact buffer has 6) takes
# the full one, which Titans-MAL and ATLAS check (the memory op is MAG's).
MANY_DOCUMENTS = ((9, 9, 6, 6), (14, 9, 6))
FULL_BUFFER = ("titans-mal", "atlas")


@pytest.mark.parametrize("variant", PACKED_VARIANTS)
def test_packed_documents_equal_each_document_alone(variant):
    check_in_its_precision(variant, MANY_DOCUMENTS if variant in FULL_BUFFER else ROWS)


def test_many_documents_need_the_full_buffer_and_rows_fit_the_compact_one():
    from xformjax.ops.neural_memory.layout import compact_slots, document_layout, used_rows

    for rows, fits in ((ROWS, True), (MANY_DOCUMENTS, False)):
        ids = jnp.asarray(segment_ids(rows))
        starts = Packing(ids, derived_positions(ids)).starts
        layout = document_layout(starts, ids > 0, 8, continuing=False)
        assert (int(used_rows(layout, 8)) <= compact_slots(LENGTH, 8) * 8) == fits, rows


def check_in_its_precision(variant: str, rows) -> None:
    if variant in FLOAT64:
        with jax.enable_x64(True):
            check_packed_documents_equal_each_document_alone(
                variant, "float64", FLOAT64[variant], rows
            )
    else:
        check_packed_documents_equal_each_document_alone(variant, "float32", TOL, rows)


def check_packed_documents_equal_each_document_alone(
    variant: str, dtype: str, tol: float, rows=ROWS
):
    layer = build(variant, dtype)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (len(rows), LENGTH, BASE.d_model), dtype)
    ids = jnp.asarray(segment_ids(rows))
    weight = jax.random.normal(keys[1], x.shape, dtype) * (ids > 0)[..., None]

    def packed(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x, segment_ids=ids)
        return jnp.sum(y * weight), y

    def alone(params, x):
        """Each document as a fresh sequence; documents of one length share a batch."""
        model = nnx.merge(graphdef, params, rest)
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for doc in documents(rows):
            by_length.setdefault(doc[2] - doc[1], []).append(doc)
        total, outputs = 0.0, {}
        for docs in by_length.values():
            y, _ = model(jnp.concatenate([x[b : b + 1, start:end] for b, start, end in docs]))
            w = jnp.concatenate([weight[b : b + 1, start:end] for b, start, end in docs])
            total = total + jnp.sum(y * w)
            outputs.update({doc: y[i : i + 1] for i, doc in enumerate(docs)})
        return total, [outputs[doc] for doc in documents(rows)]

    run = jax.jit(
        lambda p, x: (
            jax.value_and_grad(packed, (0, 1), has_aux=True)(p, x),
            jax.value_and_grad(alone, (0, 1), has_aux=True)(p, x),
        )
    )
    ((_, y_packed), grads_packed), ((_, ys_alone), grads_alone) = run(params, x)
    for (b, start, end), y_alone in zip(documents(rows), ys_alone, strict=True):
        assert_close(
            y_packed[b : b + 1, start:end],
            y_alone,
            tol,
            f"{variant}: document [{b}, {start}:{end}]",
        )
    assert_close(grads_packed[1], grads_alone[1], tol, f"{variant}: input gradient")
    flat_packed = dict(jax.tree_util.tree_leaves_with_path(grads_packed[0]))
    for path, g_alone in jax.tree_util.tree_leaves_with_path(grads_alone[0]):
        name = jax.tree_util.keystr(path)
        assert_close(flat_packed[path], g_alone, tol, f"{variant}: gradient of {name}")


def test_the_packing_is_derived_from_segment_ids():
    ids = jnp.asarray([[1, 1, 2, 2, 2, 0], [3, 3, 3, 1, 1, 1]])
    packing = make_packing("test", ids, None, 2, 6)
    assert isinstance(packing, Packing)
    np.testing.assert_array_equal(packing.starts, [[0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(packing.positions, [[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2]])
    np.testing.assert_array_equal(packing.document_index, [[0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1]])
    # tokens before the first beginning continue the state's position
    np.testing.assert_array_equal(
        derived_positions(ids, 5), [[5, 6, 0, 1, 2, 0], [5, 6, 7, 0, 1, 2]]
    )
    assert make_packing("test", None, None, 2, 6) is None


@pytest.mark.parametrize(
    ("segment_ids", "positions", "error", "match"),
    [
        (np.ones((2, 5), np.float32), None, TypeError, "segment_ids. must be an integer array"),
        (np.ones((2, 4), np.int32), None, ValueError, r"\[B, T\] = \[2, 5\]"),
        (-np.ones((2, 5), np.int32), None, ValueError, "must be ≥ 0"),
        (None, np.ones((1, 5), np.int32), ValueError, "positions. must be"),
    ],
)
def test_bad_packing_is_a_clear_error(segment_ids, positions, error, match):
    layer = build("gla")
    x = jnp.zeros((2, 5, BASE.d_model))
    with pytest.raises(error, match=match):
        layer(x, segment_ids=segment_ids, positions=positions)


# --- the matrix-memory and diagonal families: every form, and a call with a state -----

# one per code path: a running sum (MALA), the block attention, a positional encoding
# with a head gate, the per-channel gate, the running log-sum-exp, the delta rule with
# its convolutions (DeltaProduct's recurrent form is the same op), the diagonal RNN
MATRIX_MEMORY_MODE_VARIANTS = (
    "linear_attn-mala",
    "linear_attn-short-conv",
    "transnormer-diag",
    "lightning",
    "gla",
    "gla-short-conv",
    "lightnet",
    "gated_deltanet",
    "diag_rnn-negative-eigenvalues",
)


@pytest.mark.parametrize("variant", MATRIX_MEMORY_MODE_VARIANTS)
def test_matrix_memory_and_diagonal_families_keep_documents_apart_in_every_form(variant):
    """The other forms (recurrent, parallel) keep packed documents apart as the chunk
    form does (which the test above compares with each document alone), and a call
    with a state continues its first document and starts the next ones empty: the rows
    are split after 4 tokens, the rest given with the state and the segment ids."""
    layer = build(variant)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(2), (len(ROWS), LENGTH, BASE.d_model))
    ids = jnp.asarray(segment_ids())
    split = 4

    def run(params, x):
        model = nnx.merge(graphdef, params, rest)
        forms = {mode: model(x, segment_ids=ids, mode=mode)[0] for mode in model.modes}
        _, state = model(x[:, :split])
        continued, _ = model(x[:, split:], state=state, segment_ids=ids[:, split:])
        return forms, continued

    forms, continued = jax.jit(run)(params, x)
    real = np.asarray(segment_ids()) > 0
    for mode, y in forms.items():
        what = f"{variant}: {mode} against chunk form, real tokens"
        assert np.all(np.isfinite(np.asarray(y))), f"{variant} ({mode}): NaN or inf"
        assert_close(np.asarray(y)[real], np.asarray(forms["chunk"])[real], TOL, what)
    assert_close(
        np.asarray(continued)[real[:, split:]],
        np.asarray(forms["chunk"])[:, split:][real[:, split:]],
        TOL,
        f"{variant}: continued from a state",
    )


# --- attention family (attn, sigmoid_attn, aaren): the other modes, decoding, and the
# sliding window of Titans MAG ---------------------------------------------------------

ATTENTION_VARIANTS = ("attn-gqa-window", "sigmoid_attn", "aaren")


def _pure(layer: nn.Mixer):
    """``(call, params)``: ``call(params, x, **kwargs)`` runs the layer functionally."""
    graphdef, params = nnx.split(layer)
    return (lambda p, x, **kwargs: nnx.merge(graphdef, p)(x, **kwargs)), params


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_attention_family_modes_isolate_documents(variant, mode):
    call, params = _pure(build(variant))
    x = jax.random.normal(jax.random.key(1), (len(ROWS), LENGTH, BASE.d_model))
    ids = jnp.asarray(segment_ids())

    @jax.jit
    def run(params, x):
        packed = call(params, x, mode=mode, segment_ids=ids)[0]
        return packed, [call(params, x[b : b + 1, s:e], mode=mode)[0] for b, s, e in documents()]

    y, alone = run(params, x)
    assert bool(jnp.all(jnp.isfinite(y))), f"{variant}: NaN or inf with padding"
    for (b, start, end), y_alone in zip(documents(), alone, strict=True):
        assert_close(
            y[b : b + 1, start:end], y_alone, TOL, f"{variant} {mode} [{b}, {start}:{end}]"
        )


PROMPTS = (5, 9, 3)  # prompt lengths, left-padded to the longest
DECODE_STEPS = 2


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_attention_family_decodes_left_padded_prompts(variant):
    """A batch of left-padded prompts (padding id 0, the prompt id 1) prefilled into an
    empty state (a call with a state and segment ids), then decoded token by token with
    the state: every row equals its prompt run alone, then decoded alone."""
    layer = build(variant)
    call, params = _pure(layer)
    width = max(PROMPTS)
    keys = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(keys[0], (len(PROMPTS), width, BASE.d_model))
    steps = jax.random.normal(keys[1], (len(PROMPTS), DECODE_STEPS, BASE.d_model))
    pad = np.array([width - n for n in PROMPTS])
    ids = jnp.asarray((np.arange(width)[None] >= pad[:, None]).astype(np.int32))
    positions = jnp.asarray(np.maximum(np.arange(width)[None] - pad[:, None], 0))
    empty = layer.init_state(len(PROMPTS), width + DECODE_STEPS)

    @jax.jit
    def run(params, x, steps):
        y, state = call(params, x, state=empty, segment_ids=ids, positions=positions)
        decoded = []
        for step in range(DECODE_STEPS):
            y_step, state = call(
                params,
                steps[:, step : step + 1],
                state=state,
                segment_ids=jnp.ones((len(PROMPTS), 1), jnp.int32),
                positions=jnp.asarray(np.array(PROMPTS)[:, None] + step, jnp.int32),
            )
            decoded.append(y_step)
        alone = []
        for b, n in enumerate(PROMPTS):
            y_alone, state_alone = call(params, x[b : b + 1, width - n :])
            pieces = [y_alone]
            for step in range(DECODE_STEPS):
                y_step, state_alone = call(
                    params, steps[b : b + 1, step : step + 1], state=state_alone
                )
                pieces.append(y_step)
            alone.append(jnp.concatenate(pieces, 1))
        return jnp.concatenate([y] + decoded, 1), alone

    y, alone = run(params, x, steps)
    assert bool(jnp.all(jnp.isfinite(y))), f"{variant}: NaN or inf"
    for b, n in enumerate(PROMPTS):
        assert_close(y[b : b + 1, width - n :], alone[b], TOL, f"{variant}: prompt {b}")


def test_sliding_window_attention_keeps_documents_apart():
    """``sliding_window_attention`` (Titans MAG's attention) with ``segment_ids``: each
    document sees the persistent keys and its own window only; a second call with the
    cache and its ids continues the documents (row 1's second begins at the call)."""
    from xformjax.nn.sliding_attention import sliding_window_attention

    window, heads, dim, persistent = 6, 2, 4, 3
    keys = jax.random.split(jax.random.key(5), 5)
    q, k, v = (jax.random.normal(keys[i], (2, LENGTH, heads, dim)) for i in range(3))
    pk, pv = (jax.random.normal(keys[3 + i], (persistent, heads, dim)) for i in range(2))
    ids = jnp.asarray(segment_ids())
    empty = jnp.zeros((2, window - 1, heads, dim))

    def attend(q, k, v, cache_k=empty, cache_v=empty, cached=0, **packing):
        batch = q.shape[0]
        return sliding_window_attention(
            q,
            k,
            v,
            window=window,
            cache_k=cache_k[:batch],
            cache_v=cache_v[:batch],
            cached=cached,
            persistent_k=pk,
            persistent_v=pv,
            **packing,
        )

    @jax.jit
    def run(q, k, v):
        split = 14
        first, cache_k, cache_v = attend(
            q[:, :split], k[:, :split], v[:, :split], segment_ids=ids[:, :split]
        )
        second, _, _ = attend(
            q[:, split:],
            k[:, split:],
            v[:, split:],
            cache_k,
            cache_v,
            window - 1,
            segment_ids=ids[:, split:],
            cache_segment_ids=ids[:, split - window + 1 : split],
        )
        alone = [
            attend(q[b : b + 1, s:e], k[b : b + 1, s:e], v[b : b + 1, s:e])[0]
            for b, s, e in documents()
        ]
        return jnp.concatenate([first, second], 1), alone

    y, alone = run(q, k, v)
    for (b, start, end), y_alone in zip(documents(), alone, strict=True):
        assert_close(y[b : b + 1, start:end], y_alone, TOL, f"sliding window [{b}, {start}:{end}]")


# --- Mixture-of-Memories, Titans and ATLAS: every form, and a packed call continued ----

MEMORY_VARIANTS = ("mom", "titans-mag", "titans-mac", "atlas")  # MAL: MAG's memory


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_memory_families_keep_documents_apart_in_every_form_and_across_calls(variant):
    """The other forms (parallel, recurrent; chunk: the test above) of MoM, Titans and
    ATLAS keep packed documents apart with padding finite; and a packed row cut in two
    calls (the second with the state and segment ids; row 0 cuts its second document,
    row 1 its first, at different in-document positions) equals the one call."""
    layer = build(variant)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(2), (len(ROWS), LENGTH, BASE.d_model))
    ids = jnp.asarray(segment_ids())
    positions = derived_positions(ids)
    split = 13

    def run(params, x):
        model = nnx.merge(graphdef, params, rest)
        forms = {}
        for mode in layer.modes:
            y, _ = model(x, mode=mode, segment_ids=ids)
            alone = (
                []
                if mode == "chunk"
                else [model(x[b : b + 1, s:e], mode=mode)[0] for b, s, e in documents()]
            )
            forms[mode] = (y, alone)
        first, state = model(x[:, :split], segment_ids=ids[:, :split])
        then, _ = model(
            x[:, split:], state=state, segment_ids=ids[:, split:], positions=positions[:, split:]
        )
        return forms, jnp.concatenate([first, then], axis=1)

    forms, twice = jax.jit(run)(params, x)
    for mode, (y, alone) in forms.items():
        assert bool(jnp.all(jnp.isfinite(y))), f"{variant} ({mode}): a non-finite output"
        for (b, start, end), y_alone in zip(documents(), alone, strict=False):
            where = f"{variant} ({mode}): document [{b}, {start}:{end}]"
            assert_close(y[b : b + 1, start:end], y_alone, TOL, where)
    real = (ids > 0)[..., None]
    assert_close(twice * real, forms["chunk"][0] * real, TOL, f"{variant}: two calls")
