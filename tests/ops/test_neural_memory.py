"""``ops.neural_memory`` (Titans / ATLAS) against an independent float64 numpy
reference: token by token, with the gradient of the MLP loss back-propagated by hand."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.helpers import assert_close
from xformjax.ops.neural_memory import neural_memory

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# ----------------------------------------------------------------------------- reference


def silu(z):
    return z / (1 + np.exp(-z))


def silu_grad(z):
    s = 1 / (1 + np.exp(-z))
    return s * (1 + z * (1 - s))


def mlp(weights, x):
    h = x
    for index, w in enumerate(weights):
        z = h @ w
        h = silu(z) if index < len(weights) - 1 else z
    return h


def loss_gradient(weights, k, v):
    """∇_W ½‖M_W(k) − v‖² by back-propagation through the MLP (one token)."""
    hs, zs, h = [], [], k
    for index, w in enumerate(weights):
        hs.append(h)
        z = h @ w
        zs.append(z)
        h = silu(z) if index < len(weights) - 1 else z
    delta = h - v
    grads = [None] * len(weights)
    for index in reversed(range(len(weights))):
        grads[index] = np.outer(hs[index], delta)
        if index > 0:
            delta = (weights[index] @ delta) * silu_grad(zs[index - 1])
    return grads


def newton_schulz(x, steps):
    a, b, c = NS_COEFFICIENTS
    flip = x.shape[0] > x.shape[1]
    if flip:
        x = x.T
    x = x / np.sqrt(np.sum(x * x) + 1e-14)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if flip else x


def reference(
    inputs,
    memory,
    *,
    omega_window,
    optimizer,
    chunk_size=None,
    ns_steps=5,
    state=None,
    max_surprise_norm=None,
):
    """Titans/ATLAS per sequence and head. ``chunk_size=None``: exact token-by-token
    rule; otherwise gradients inside each chunk at the chunk-start weights.
    ``max_surprise_norm``: scale each token's surprise (all layers) down to this norm.

    ``state``: per (b, h) dict of weights, momentum and the window list (or None).
    Returns ``(o [B, T, H, V], states)``."""
    q, k, v, lr, mom, decay, gamma = (
        np.asarray(inputs[n], np.float64)
        for n in ("q", "k", "v", "lr", "momentum", "decay", "gamma")
    )
    batch, length, heads, _ = q.shape
    o = np.zeros(v.shape)
    states = {}
    for b, h in itertools.product(range(batch), range(heads)):
        if state is None:
            weights = [np.asarray(w[h], np.float64).copy() for w in memory]
            moments = [np.zeros_like(w) for w in weights]
            window = []  # (k, v, gamma) of earlier tokens
        else:
            weights, moments, window = (list(x) for x in state[b, h])
        chunk_weights = [w.copy() for w in weights]
        for t in range(length):
            if chunk_size is not None and t % chunk_size == 0:
                chunk_weights = [w.copy() for w in weights]
            at = weights if chunk_size is None else chunk_weights
            tokens = (window + [(k[b, t, h], v[b, t, h], gamma[b, t, h])])[-omega_window:]
            u = [np.zeros_like(w) for w in weights]
            for k_i, v_i, g_i in tokens:
                for l, g in enumerate(loss_gradient(at, k_i, v_i)):
                    u[l] += g_i * g
            norm = np.sqrt(sum(np.sum(x * x) for x in u))
            if max_surprise_norm is not None and norm > max_surprise_norm:
                u = [x * (max_surprise_norm / norm) for x in u]
            for l in range(len(weights)):
                if optimizer == "momentum":
                    moments[l] = mom[b, t, h] * moments[l] - lr[b, t, h] * u[l]
                    step = moments[l]
                else:
                    moments[l] = mom[b, t, h] * moments[l] - u[l]
                    step = lr[b, t, h] * newton_schulz(moments[l], ns_steps)
                weights[l] = (1 - decay[b, t, h]) * weights[l] + step
            o[b, t, h] = mlp(weights, q[b, t, h])
            window = (
                (window + [(k[b, t, h], v[b, t, h], gamma[b, t, h])])[-(omega_window - 1) :]
                if omega_window > 1
                else []
            )
        states[b, h] = (weights, moments, window)
    return o, states


# ----------------------------------------------------------------------------- inputs


def make_inputs(batch=2, length=37, heads=2, key_dim=4, value_dim=4, depth=2, seed=0):
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    inputs = {
        "q": unit((batch, length, heads, key_dim)),
        "k": unit((batch, length, heads, key_dim)),
        "v": rng.standard_normal((batch, length, heads, value_dim)),
        "lr": rng.uniform(0.0, 0.3, (batch, length, heads)),
        "momentum": rng.uniform(0.0, 0.9, (batch, length, heads)),
        "decay": rng.uniform(0.0, 0.1, (batch, length, heads)),
        "gamma": rng.uniform(0.2, 1.0, (batch, length, heads)),
    }
    dims = [key_dim] + [2 * key_dim] * (depth - 1) + [value_dim]
    memory = [
        rng.standard_normal((heads, dims[i], dims[i + 1])) / np.sqrt(dims[i]) for i in range(depth)
    ]
    return inputs, memory


def run(inputs, memory, **kwargs):
    """The op under one ``jax.jit`` (eager dispatch of its scans is slow)."""
    x = {name: jnp.asarray(value) for name, value in inputs.items()}
    memory = [jnp.asarray(w) for w in memory]
    if "state_position" in kwargs:  # concrete, to check its validation
        return _run(x, memory, **kwargs)
    static = {key: value for key, value in kwargs.items() if key != "initial_state"}
    jitted = jax.jit(lambda x, memory, state: _run(x, memory, initial_state=state, **static))
    return jitted(x, memory, kwargs.get("initial_state"))


def _run(x, memory, **kwargs):
    return neural_memory(
        x["q"],
        x["k"],
        x["v"],
        x["lr"],
        x["momentum"],
        x["decay"],
        [jnp.asarray(w) for w in memory],
        omega_weights=x["gamma"],
        **kwargs,
    )


def slice_time(inputs, start, stop):
    return {name: value[:, start:stop] for name, value in inputs.items()}


def reference_state_as_op(states, batch, heads, depth, omega_window):
    """Convert the reference's per-(b, h) states into the op's state dict (for checks)."""
    out = {}
    for l in range(depth):
        out[f"weight_{l}"] = np.stack(
            [np.stack([states[b, h][0][l] for h in range(heads)]) for b in range(batch)]
        )
        out[f"momentum_{l}"] = np.stack(
            [np.stack([states[b, h][1][l] for h in range(heads)]) for b in range(batch)]
        )
    if omega_window > 1:

        def window(b, h, part):
            items = [item[part] for item in states[b, h][2]]
            return np.stack(items)

        for part, key in ((0, "window_k"), (1, "window_v"), (2, "window_gamma")):
            out[key] = np.stack(
                [np.stack([window(b, h, part) for h in range(heads)]) for b in range(batch)]
            )
    return out


# ----------------------------------------------------------------------------- tests

CASES = [
    (depth, omega, optimizer)
    for depth in (1, 2)
    for omega in (1, 3)
    for optimizer in ("momentum", "muon")
]


@pytest.mark.parametrize("depth,omega,optimizer", CASES)
@pytest.mark.parametrize("length", [1, 37])
def test_recurrent_matches_reference_and_chunk_size_one_is_exact(
    x64, depth, omega, optimizer, length
):
    inputs, memory = make_inputs(length=length, depth=depth, seed=depth + 10 * omega)
    o_ref, states = reference(inputs, memory, omega_window=omega, optimizer=optimizer)
    o, final = run(
        inputs,
        memory,
        omega_window=omega,
        optimizer=optimizer,
        mode="recurrent",
        output_final_state=True,
    )
    assert o.dtype == jnp.float64
    assert_close(o, o_ref, 1e-9, "recurrent o")
    expected = reference_state_as_op(states, 2, 2, depth, omega)
    if length >= omega - 1:  # the reference window is full: compare it too
        for key, value in expected.items():
            assert_close(final[key], value, 1e-9, f"final {key}")
    o_chunk, final_chunk = run(
        inputs,
        memory,
        omega_window=omega,
        optimizer=optimizer,
        mode="chunk",
        chunk_size=1,
        output_final_state=True,
    )
    assert_close(o_chunk, o, 1e-12, "chunk_size=1 vs recurrent")
    for key in final:
        assert_close(final_chunk[key], final[key], 1e-12, f"chunk_size=1 state {key}")


@pytest.mark.parametrize(
    "depth,omega,optimizer", [(2, 1, "momentum"), (2, 3, "muon"), (1, 3, "momentum")]
)
def test_chunk_form_matches_the_chunked_reference(x64, depth, omega, optimizer):
    inputs, memory = make_inputs(depth=depth, seed=3)
    o_ref, _ = reference(inputs, memory, omega_window=omega, optimizer=optimizer, chunk_size=8)
    o, _ = run(inputs, memory, omega_window=omega, optimizer=optimizer, mode="chunk", chunk_size=8)
    assert_close(o, o_ref, 1e-9, "chunk (C=8) vs chunked reference")
    o_exact, _ = reference(inputs, memory, omega_window=omega, optimizer=optimizer)
    assert np.linalg.norm(np.asarray(o) - o_exact) > 1e-6  # C > 1 is an approximation


@pytest.mark.parametrize("mode,split", [("recurrent", 13), ("chunk", 16)])
def test_two_halves_with_the_state_equal_the_whole(x64, mode, split):
    inputs, memory = make_inputs(depth=2, seed=5)
    kwargs = dict(
        omega_window=3, optimizer="muon", mode=mode, chunk_size=8, output_final_state=True
    )
    whole, final = run(inputs, memory, **kwargs)
    first, state = run(slice_time(inputs, 0, split), memory, **kwargs)
    second, final_2 = run(slice_time(inputs, split, 37), memory, initial_state=state, **kwargs)
    assert_close(jnp.concatenate([first, second], 1), whole, 1e-12, f"{mode} halves")
    for key in final:
        assert_close(final_2[key], final[key], 1e-12, f"{mode} state {key}")


def test_state_position_returns_the_boundary_state(x64):
    inputs, memory = make_inputs(depth=1, seed=6)
    _, at_16 = run(
        slice_time(inputs, 0, 16), memory, mode="chunk", chunk_size=8, output_final_state=True
    )
    _, chosen = jax.jit(
        lambda p: run(
            inputs, memory, mode="chunk", chunk_size=8, output_final_state=True, state_position=p
        )
    )(16)
    for key in at_16:
        assert_close(chosen[key], at_16[key], 1e-12, key)


def test_float32_and_bfloat16_accumulate_in_float32():
    """float32 inputs: the output within 1e-6 of the float64 reference (measured 1.3e-7 to
    2e-7 over three seeds). bfloat16 inputs accumulate in float32 and round once at the
    end: the bfloat16 output is the float64 reference (of the rounded inputs) rounded to
    bfloat16, element for element (measured: every element equal; a few may differ by
    one ulp where the reference lies next to a rounding boundary). The float32 gradient
    values are checked in ``test_neural_memory_gradients.py``."""
    inputs, memory = make_inputs(depth=2, length=21, seed=7)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = {name: jnp.asarray(value, dtype) for name, value in inputs.items()}
        weights = [jnp.asarray(w, dtype) for w in memory]
        o, _ = run(x, weights)
        assert o.dtype == dtype
        expected, _ = reference(
            {name: np.asarray(value, np.float64) for name, value in x.items()},
            [np.asarray(w, np.float64) for w in weights],
            omega_window=1,
            optimizer="momentum",
            chunk_size=16,
        )
        if dtype == jnp.float32:
            assert_close(o, expected, 1e-6, "float32 o")
        else:
            rounded = np.asarray(jnp.asarray(expected, jnp.bfloat16), np.float64)
            assert np.mean(np.asarray(o, np.float64) != rounded) <= 0.02


@pytest.mark.parametrize("depth,omega,optimizer", [(2, 1, "momentum"), (1, 3, "muon")])
@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_surprise_clip_matches_the_reference(x64, depth, omega, optimizer, mode):
    inputs, memory = make_inputs(depth=depth, seed=11)
    chunk_size = None if mode == "recurrent" else 8
    kwargs = dict(omega_window=omega, optimizer=optimizer)
    o_ref, states = reference(
        inputs, memory, chunk_size=chunk_size, max_surprise_norm=0.4, **kwargs
    )
    o, final = run(
        inputs,
        memory,
        mode=mode,
        chunk_size=chunk_size or 16,
        max_surprise_norm=0.4,
        output_final_state=True,
        **kwargs,
    )
    assert_close(o, o_ref, 1e-9, f"{mode} with the clip")
    for key, value in reference_state_as_op(states, 2, 2, depth, omega).items():
        assert_close(final[key], value, 1e-9, f"{mode} state {key} with the clip")
    unclipped, _ = reference(inputs, memory, chunk_size=chunk_size, **kwargs)
    assert np.linalg.norm(o_ref - unclipped) > 1e-3 * np.linalg.norm(unclipped)  # it bites


def test_surprise_clip_gradient_matches_finite_differences(x64):
    """The clip's derivative (the scale depends on ‖u‖) against central differences of
    the float64 reference, along a random direction of every input."""
    inputs, memory = make_inputs(batch=1, length=11, heads=1, depth=2, seed=12)
    rng = np.random.default_rng(0)
    names = ("q", "k", "v", "lr", "momentum", "decay")
    direction = {name: rng.standard_normal(inputs[name].shape) for name in names}
    direction_memory = [rng.standard_normal(w.shape) for w in memory]
    kwargs = dict(omega_window=1, optimizer="momentum", max_surprise_norm=0.3)

    def reference_loss(step):
        moved = {**inputs, **{n: inputs[n] + step * direction[n] for n in names}}
        weights = [w + step * d for w, d in zip(memory, direction_memory)]
        o, _ = reference(moved, weights, chunk_size=4, **kwargs)
        return np.sum(np.sin(o))

    step = 1e-5
    expected = (reference_loss(step) - reference_loss(-step)) / (2 * step)

    def loss(x, weights):
        o, _ = neural_memory(
            x["q"],
            x["k"],
            x["v"],
            x["lr"],
            x["momentum"],
            x["decay"],
            weights,
            omega_weights=x["gamma"],
            mode="chunk",
            chunk_size=4,
            **kwargs,
        )
        return jnp.sum(jnp.sin(o))

    x = {name: jnp.asarray(value) for name, value in inputs.items()}
    grads, grads_memory = jax.grad(loss, argnums=(0, 1))(x, [jnp.asarray(w) for w in memory])
    actual = sum(np.sum(np.asarray(grads[n]) * direction[n]) for n in names)
    actual += sum(np.sum(np.asarray(g) * d) for g, d in zip(grads_memory, direction_memory))
    assert abs(actual - expected) <= 1e-6 * abs(expected), (actual, expected)


def test_surprise_clip_keeps_a_too_large_step_finite():
    """θ near 1 with η = 0.95 in 64-token chunks: the papers' rule overflows float32; with
    the clip every token adds at most θ·τ to the momentum, so ‖m_t‖ ≤ θτ/(1 − η) and
    (no decay) ‖W_T − W_0‖ ≤ T·θτ/(1 − η): linear in T, never geometric."""
    inputs, memory = make_inputs(
        batch=1, length=1024, heads=2, key_dim=8, value_dim=8, depth=2, seed=13
    )
    inputs = {
        **inputs,
        "lr": np.full_like(inputs["lr"], 0.95),
        "momentum": np.full_like(inputs["momentum"], 0.95),
        "decay": np.zeros_like(inputs["decay"]),
        "v": 3 * inputs["v"],
    }
    floats = {name: np.asarray(value, np.float32) for name, value in inputs.items()}
    memory = [np.asarray(w, np.float32) for w in memory]
    kwargs = dict(mode="chunk", chunk_size=64, output_final_state=True)
    runaway, _ = run(floats, memory, **kwargs)
    assert not np.all(np.isfinite(np.asarray(runaway)))
    o, final = run(floats, memory, max_surprise_norm=1.0, **kwargs)
    assert np.all(np.isfinite(np.asarray(o)))
    bound = 1024 * 0.95 * 1.0 / (1 - 0.95)
    moved = np.sqrt(
        sum(
            np.sum((np.asarray(final[f"weight_{l}"]) - w[None]) ** 2, axis=(2, 3))
            for l, w in enumerate(memory)
        )
    )
    assert np.all(moved <= bound), moved.max()


def test_bad_input_raises_value_error():
    inputs, memory = make_inputs(length=5, depth=2)
    with pytest.raises(ValueError, match=r"`q` must have rank 4"):
        run({**inputs, "q": inputs["q"][0]}, memory)
    with pytest.raises(ValueError, match=r"`lr` must have shape \[B, T, H\]"):
        run({**inputs, "lr": inputs["lr"][..., None]}, memory)
    with pytest.raises(ValueError, match=r"memory\[1\]"):
        run(inputs, [memory[0], memory[1][:, :3]])
    with pytest.raises(ValueError, match="must output V=4"):
        run(inputs, [memory[0], memory[1][..., :3]])
    with pytest.raises(ValueError, match="unknown `mode`='parallel'"):
        run(inputs, memory, mode="parallel")
    with pytest.raises(ValueError, match="unknown `optimizer`='adam'"):
        run(inputs, memory, optimizer="adam")
    with pytest.raises(ValueError, match="`omega_window` must be a positive int"):
        run(inputs, memory, omega_window=0)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="`max_surprise_norm` must be a positive"):
            run(inputs, memory, max_surprise_norm=bad)
    with pytest.raises(ValueError, match="T=0"):
        run(slice_time(inputs, 0, 0), memory)
    with pytest.raises(ValueError, match="initial_state"):
        run(inputs, memory, initial_state={"weight_0": 0})
    with pytest.raises(ValueError, match="state_position"):
        run(inputs, memory, chunk_size=2, state_position=3)


def test_linear_scan_matches_the_loop_including_resets(x64):
    """The chunk form's transfer-matrix scan against ``x_t = a_t x_{t-1} + b_t`` run
    token by token, with ``a = 0`` (a reset) and ``a = 1`` among the factors."""
    from xformjax.ops.neural_memory.chunk import linear_scan

    rng = np.random.default_rng(14)
    a = rng.uniform(0.0, 1.0, 9)
    a[[2, 6]] = 0.0, 1.0
    b = rng.standard_normal((9, 3, 4))
    x0 = rng.standard_normal((3, 4))
    expected, x = [], x0
    for t in range(9):
        x = a[t] * x + b[t]
        expected.append(x)
    assert_close(
        linear_scan(jnp.asarray(a), jnp.asarray(b), jnp.asarray(x0)),
        np.stack(expected),
        1e-14,
        "linear_scan",
    )


@pytest.mark.parametrize("max_surprise_norm", [None, 0.4])
def test_dual_chunk_step_equals_the_materialised_one(x64, max_surprise_norm):
    """The momentum optimiser's dual chunk step (no per-token weights) against the
    materialised one, on one head: outputs, the next carry and the gradients of both
    with respect to every input and the incoming carry (weights, momentum, window)."""
    from xformjax.ops.neural_memory.chunk import dual_chunk_step, materialised_chunk_step
    from xformjax.ops.neural_memory.recurrent import Rule

    inputs, memory = make_inputs(
        batch=1, length=5, heads=1, key_dim=3, value_dim=5, depth=2, seed=15
    )
    rng = np.random.default_rng(16)
    names = ("q", "k", "v", "lr", "momentum", "decay", "gamma")
    xs = tuple(jnp.asarray(inputs[name][0, :, 0]) for name in names)
    carry = {
        "weights": tuple(jnp.asarray(w[0]) for w in memory),
        "momentum": tuple(jnp.asarray(0.1 * rng.standard_normal(w[0].shape)) for w in memory),
        "window_k": jnp.asarray(rng.standard_normal((2, 3))),
        "window_v": jnp.asarray(rng.standard_normal((2, 5))),
        "window_gamma": jnp.asarray([0.0, 0.7]),
    }
    rule = Rule(3, "momentum", 5, max_surprise_norm)

    def loss(step, carry, xs):
        new, o = step(carry, xs, rule)
        return (
            jnp.sum(jnp.sin(o))
            + sum(jnp.sum(jnp.cos(w)) for w in new["weights"])
            + sum(jnp.sum(m * m) for m in new["momentum"])
        ), (new, o)

    results = {}
    for name, step in (("dual", dual_chunk_step), ("materialised", materialised_chunk_step)):
        grads, (new, o) = jax.grad(loss, argnums=(1, 2), has_aux=True)(step, carry, xs)
        results[name] = (o, new, grads)
    (o, new, grads), (o_ref, new_ref, grads_ref) = results["dual"], results["materialised"]
    assert_close(o, np.asarray(o_ref), 1e-12, "dual o")
    for got, want in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(new_ref)):
        assert_close(got, np.asarray(want), 1e-12, "dual carry")
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        assert_close(got, np.asarray(want), 1e-10, "dual gradient")
    if max_surprise_norm is not None:  # the clip bites in this chunk
        _, unclipped = dual_chunk_step(carry, xs, Rule(3, "momentum", 5, None))
        assert np.linalg.norm(np.asarray(unclipped - o)) > 1e-3 * np.linalg.norm(np.asarray(o))


# ------------------------------------------------------ packed sequences (resets, layout)

PACKED_LENGTHS = ((3, 11, 1, 6, 16), (20, 5, 12))  # per row; C = 4 puts starts mid-chunk


def packed_starts(rows=PACKED_LENGTHS):
    length = max(sum(row) for row in rows)
    starts = np.zeros((len(rows), length), bool)
    valid = np.zeros((len(rows), length), bool)
    for b, lengths in enumerate(rows):
        edges = np.cumsum((0,) + lengths)
        starts[b, edges[1:-1]] = True
        valid[b, : edges[-1]] = True
    return starts, valid


def sequences(rows=PACKED_LENGTHS):
    for b, lengths in enumerate(rows):
        edges = np.cumsum((0,) + lengths)
        for start, end in itertools.pairwise(edges):
            yield b, int(start), int(end)


@pytest.mark.parametrize(
    "rows",
    [
        PACKED_LENGTHS,
        ((1,) * 24, (5, 1, 5, 1, 5, 1, 5, 1)),  # every token a sequence; straddling ones
        ((24,), (4, 4, 4, 4, 4, 4)),
    ],
)
def test_layout_puts_every_sequence_on_its_own_chunk_grid(rows):
    """Every token gets its own row of the static buffer; a sequence longer than ``C``
    starts on a slot; one of at most ``C`` lies in one slot; a reset marks each
    sequence's first row and the first row of every slot holding short sequences."""
    from xformjax.ops.neural_memory.layout import document_layout, slots_for, used_rows

    chunk = 4
    starts, valid = packed_starts(rows)
    layout = jax.jit(document_layout, static_argnums=2, static_argnames="continuing")(
        jnp.asarray(starts), jnp.asarray(valid), chunk, continuing=False
    )
    destination, resets = np.asarray(layout.destination), np.asarray(layout.resets)
    capacity = slots_for(starts.shape[1], chunk) * chunk
    assert resets.shape == (len(rows), capacity)
    for b in range(len(rows)):
        used = destination[b][valid[b]]
        assert len(set(used.tolist())) == used.size and used.max() < capacity
    last = max(int(destination[b][valid[b]].max()) for b in range(len(rows)))
    assert int(used_rows(layout, chunk)) == (last // chunk + 1) * chunk
    for b, start, end in sequences(rows):
        rows_of = destination[b, start:end]
        np.testing.assert_array_equal(rows_of, rows_of[0] + np.arange(end - start))
        assert resets[b, rows_of[0]] and not resets[b, rows_of[1:]].any()
        if end - start > chunk:
            assert rows_of[0] % chunk == 0
        else:
            assert rows_of[0] // chunk == rows_of[-1] // chunk
            assert resets[b, rows_of[0] // chunk * chunk]


@pytest.mark.parametrize("continuing", [False, True])
def test_rows_of_up_to_three_documents_fit_the_compact_buffer(continuing):
    """The compact buffer (``⌈N/C⌉ + 2`` slots) holds any row of at most three
    documents (each wastes less than a slot on its last chunk), and a row of many
    short straddling documents does not fit it (the full buffer is then needed)."""
    from xformjax.ops.neural_memory.layout import compact_slots, document_layout, used_rows

    chunk, length = 4, 37
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(300):
        cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(0, 3), replace=False))
        end = int(rng.integers(max(cuts, default=0) + 1, length + 1))
        rows.append(tuple(np.diff(np.concatenate([[0], cuts, [end]])).tolist()))
    starts, valid = packed_starts(tuple(rows))
    layout_of = jax.jit(
        jax.vmap(lambda s, v: document_layout(s[None], v[None], chunk, continuing=continuing))
    )
    used = jax.vmap(lambda layout: used_rows(layout, chunk))(
        layout_of(jnp.asarray(starts), jnp.asarray(valid))
    )
    assert starts.shape[1] == length
    compact = compact_slots(length, chunk) * chunk
    assert int(used.max()) <= compact
    assert int(used.max()) > compact - 2 * chunk  # the bound is nearly reached
    many = packed_starts(((5, 3, 5, 3, 5, 3, 5, 3, 5),))
    layout = layout_of(*(jnp.asarray(a) for a in many))
    assert int(used_rows(jax.tree.map(lambda a: a[0], layout), chunk)) > compact


@pytest.mark.parametrize("depth,omega,optimizer", [(2, 3, "muon"), (1, 3, "momentum")])
def test_resets_on_the_layout_equal_each_sequence_alone(x64, depth, omega, optimizer):
    """Packed sequences laid out (``layout``) and run with ``resets``: each sequence's
    outputs equal those of the sequence alone (chunk form; and the recurrent form with
    the resets in place), and the state at ``boundary`` is the last sequence's."""
    from xformjax.ops.neural_memory.layout import document_layout, gather, scatter

    chunk = 4
    starts, valid = packed_starts()
    inputs, memory = make_inputs(length=starts.shape[1], depth=depth, seed=21)
    common = dict(omega_window=omega, optimizer=optimizer, output_final_state=True)

    @jax.jit
    def everything(x, memory):
        layout = document_layout(jnp.asarray(starts), jnp.asarray(valid), chunk, continuing=False)
        laid = {name: scatter(value, layout) for name, value in x.items()}
        o, final = _run(
            laid,
            memory,
            mode="chunk",
            chunk_size=chunk,
            resets=layout.resets,
            state_position=layout.boundary,
            **common,
        )
        o_recurrent, _ = _run(x, memory, mode="recurrent", resets=jnp.asarray(starts), **common)
        alone = []
        for b, start, end in sequences():
            one = {name: value[b : b + 1, start:end] for name, value in x.items()}
            o_chunk, final_alone = _run(one, memory, mode="chunk", chunk_size=chunk, **common)
            alone.append((o_chunk, final_alone, _run(one, memory, mode="recurrent", **common)[0]))
        return gather(o, layout), final, o_recurrent, alone

    x = {name: jnp.asarray(value) for name, value in inputs.items()}
    o, final, o_recurrent, alone = everything(x, [jnp.asarray(w) for w in memory])
    for (b, start, end), (o_alone, final_alone, o_rec) in zip(sequences(), alone, strict=True):
        assert_close(o[b : b + 1, start:end], o_alone, 1e-10, f"chunk [{b}, {start}:{end}]")
        assert_close(o_recurrent[b : b + 1, start:end], o_rec, 1e-10, f"recurrent [{b}]")
        if end == sum(PACKED_LENGTHS[b]):  # the row's last sequence: a whole number of
            for key, value in final_alone.items():  # chunks, so its state at `boundary`
                assert_close(final[key][b : b + 1], value, 1e-10, f"state {key} [{b}]")
