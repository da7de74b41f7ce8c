"""``neural_memory``: Titans' MLP memory learned at test time, with ATLAS's Omega
rule and Muon optimiser.

"Titans: Learning to Memorize at Test Time", Behrouz et al. 2025, and
"ATLAS: Learning to Optimally Memorize the Context at Test Time", Behrouz et al.
2025. The memory of each head is an MLP ``M_W`` (see :mod:`.memory`: SiLU between
layers, no biases, no residual) whose weights are trained token by token on the
loss ``ℓ(W; k, v) = ½‖M_W(k) − v‖²``:

    u_t = Σ_{i=t−c+1}^{t} γ_i ∇_W ℓ(W_{t-1}; k_i, v_i)        (c = omega_window)
    u_t ← u_t · min(1, τ / ‖u_t‖)      (τ = max_surprise_norm; ‖·‖ over all layers)
    optimizer="momentum" (Titans):
        m_t = η_t m_{t-1} − θ_t u_t ;   W_t = (1 − α_t) W_{t-1} + m_t
    optimizer="muon" (ATLAS):
        m_t = η_t m_{t-1} − u_t     ;   W_t = (1 − α_t) W_{t-1} + θ_t NS(m_t)
    o_t = M_{W_t}(q_t)

``NS`` is the quintic Newton–Schulz orthogonalisation of Muon
(:mod:`.newton_schulz`), applied separately to the momentum of every weight
matrix ``W_l`` (``[d_{l-1}, d_l]``) of every head and sequence, at every token.
The learning rate sits outside ``NS`` (as in ATLAS's ``M_t = α_t M_{t-1} − η_t
NS(S_t)``) because ``NS`` discards the momentum's scale. With ``c = 1``,
``γ = 1``, ``optimizer="momentum"`` and no clip (``τ = None``, the default) this
is exactly Titans. The clip is this library's addition: it bounds each token's
step, so a learned θ that is too large for the memory's curvature (easy in the
chunk form, where the ``C`` steps of a chunk are all taken at ``W_0``) makes the
weights oscillate instead of overflowing.

Forms: ``"recurrent"`` is the rule above token by token; ``"chunk"`` is the
papers' parallel training form: within a chunk of ``C`` tokens every gradient
is taken at the chunk-start weights, then the momentum and weight recurrences
run as transfer-matrix products (:mod:`.chunk`; with momentum, on the rank-1
factors of the gradients, so no per-token weights are formed). With ``C = 1``
the two forms are the same computation; with ``C > 1`` the chunk form is the
paper's approximation, not the token-by-token rule (so results depend on
``chunk_size``).

``resets`` (bool ``[B, T]``) marks tokens where a new sequence begins: the state
restarts there from the initial weights (zero momentum, empty Omega window). In the
recurrent form anywhere. In the chunk form the chunk grid does not move, so a reset
is a fresh start only on a chunk boundary, or inside a chunk whose first token is
reset too (several short sequences in one chunk, all gradients at the initial
weights); :mod:`.layout` arranges packed documents that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xformjax.ops import common
from xformjax.ops.common.validation import Mode
from xformjax.ops.neural_memory import memory as memory_mlp
from xformjax.ops.neural_memory.chunk import chunk_sequence
from xformjax.ops.neural_memory.newton_schulz import newton_schulz
from xformjax.ops.neural_memory.recurrent import Rule, recurrent_sequence

__all__ = ["init_neural_memory_state", "memory_mlp", "neural_memory", "newton_schulz"]

OP = "neural_memory"
OPTIMIZERS = ("momentum", "muon")
FORMS = ("chunk", "recurrent")


def _check_memory(memory, key_dim: int, value_dim: int, heads: int) -> list:
    if isinstance(memory, jax.Array) or not isinstance(memory, Sequence) or not memory:
        common.fail(
            OP,
            "`memory` must be a non-empty sequence of per-head weight matrices [H, d_(l-1), d_l]",
        )
    previous = key_dim
    for index, w in enumerate(memory):
        name = f"memory[{index}]"
        common.check_rank(OP, name, w, ["H", "d_in", "d_out"])
        common.check_floating(OP, name, w)
        common.check_dim(OP, name, w, 0, heads, "H of `q`")
        common.check_dim(
            OP, name, w, 1, previous, "K of `q`" if index == 0 else f"d_out of memory[{index - 1}]"
        )
        previous = w.shape[2]
    if previous != value_dim:
        common.fail(
            OP,
            f"the last memory layer {common.shape_str(memory[-1])} must output "
            f"V={value_dim} (of `v`)",
        )
    return list(memory)


def init_neural_memory_state(
    memory: Sequence[jax.Array],
    batch: int,
    *,
    key_dim: int,
    value_dim: int,
    omega_window: int = 1,
    dtype=None,
) -> dict:
    """The state of a fresh sequence: the weights ``memory`` broadcast over the batch,
    zero momentum and (``omega_window > 1``) an empty window.

    Keys: ``weight_l``, ``momentum_l`` ``[B, H, d_{l-1}, d_l]`` for each layer ``l``;
    with ``c = omega_window > 1`` also ``window_k`` ``[B, H, c−1, K]``, ``window_v``
    ``[B, H, c−1, V]`` and ``window_gamma`` ``[B, H, c−1]`` (the last ``c − 1``
    tokens, oldest first; ``γ = 0`` marks an empty slot).

    ``batch`` is an int ≥ 0, ``key_dim``, ``value_dim`` and ``omega_window`` ints ≥ 1
    (``TypeError`` for another type, ``ValueError`` for another value)."""
    op = "init_neural_memory_state"
    if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)):
        common.fail_type(op, f"`batch` must be a non-negative int; got {batch!r}")
    if batch < 0:
        common.fail(op, f"`batch` must be a non-negative int; got {batch!r}")
    key_dim = common.check_positive_int(op, "key_dim", key_dim)
    value_dim = common.check_positive_int(op, "value_dim", value_dim)
    omega_window = common.check_positive_int(op, "omega_window", omega_window)
    if isinstance(memory, jax.Array) or not isinstance(memory, Sequence) or not memory:
        common.fail(
            op,
            "`memory` must be a non-empty sequence of per-head weight matrices [H, d_(l-1), d_l]",
        )
    dtype = common.compute_dtype(*memory) if dtype is None else dtype
    heads = memory[0].shape[0]
    state = {}
    for index, w in enumerate(memory):
        state[f"weight_{index}"] = jnp.broadcast_to(w.astype(dtype)[None], (batch,) + w.shape)
        state[f"momentum_{index}"] = jnp.zeros((batch,) + w.shape, dtype)
    if omega_window > 1:
        state["window_k"] = jnp.zeros((batch, heads, omega_window - 1, key_dim), dtype)
        state["window_v"] = jnp.zeros((batch, heads, omega_window - 1, value_dim), dtype)
        state["window_gamma"] = jnp.zeros((batch, heads, omega_window - 1), dtype)
    return state


def _check_state(initial_state, expected: dict) -> None:
    if not isinstance(initial_state, dict) or set(initial_state) != set(expected):
        keys = sorted(initial_state) if isinstance(initial_state, dict) else type(initial_state)
        common.fail(OP, f"`initial_state` must be a dict with keys {sorted(expected)}; got {keys}")
    for key, value in expected.items():
        if tuple(jnp.shape(initial_state[key])) != value.shape:
            common.fail(
                OP,
                f"`initial_state[{key!r}]` must have shape {value.shape}; got "
                f"{common.shape_str(initial_state[key])}",
            )


def _to_carry(state: dict, depth: int, omega_window: int) -> dict:
    carry = {
        "weights": tuple(state[f"weight_{i}"] for i in range(depth)),
        "momentum": tuple(state[f"momentum_{i}"] for i in range(depth)),
    }
    if omega_window > 1:
        carry.update({key: state[key] for key in ("window_k", "window_v", "window_gamma")})
    return carry


def _from_carry(carry: dict) -> dict:
    state = {}
    for index, (w, m) in enumerate(zip(carry["weights"], carry["momentum"])):
        state[f"weight_{index}"], state[f"momentum_{index}"] = w, m
    state.update({key: value for key, value in carry.items() if key not in ("weights", "momentum")})
    return state


def neural_memory(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr: jax.Array,
    momentum: jax.Array,
    decay: jax.Array,
    memory: Sequence[jax.Array],
    *,
    omega_weights: jax.Array | None = None,
    omega_window: int = 1,
    optimizer: str = "momentum",
    newton_schulz_steps: int = 5,
    max_surprise_norm: float | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 16,
    initial_state: dict | None = None,
    output_final_state: bool = False,
    state_position: int | jax.Array | None = None,
    resets: jax.Array | None = None,
) -> tuple[jax.Array, dict | None]:
    """Titans / ATLAS neural memory (the recurrence is in the module docstring).

    Args:
      q, k: ``[B, T, H, K]`` (used as given: normalising them is the layer's job).
      v: ``[B, T, H, V]``.
      lr: ``θ_t`` ``[B, T, H]``, finite and ≥ 0 (the inner learning rate).
      momentum: ``η_t`` ``[B, T, H]`` in [0, 1].
      decay: ``α_t`` ``[B, T, H]`` in [0, 1] (forgetting: ``W ← (1 − α) W + …``).
        The values of ``lr``, ``momentum``, ``decay`` and ``omega_weights`` are
        checked (``ValueError``) at once when concrete, and under ``jit`` with
        ``xformjax.config`` option ``check_values`` on.
      memory: the initial weights, a sequence of ``L`` arrays ``[H, d_{l-1}, d_l]``
        (``d_0 = K``, ``d_L = V``): learned parameters shared over the batch. Used
        when ``initial_state`` is ``None``; ignored otherwise (except for checks).
      omega_weights: ``γ_t`` ``[B, T, H]`` in [0, 1]; ``None`` means 1.
      omega_window: ``c ≥ 1``, tokens in the Omega rule's window.
      optimizer: ``"momentum"`` (Titans) or ``"muon"`` (ATLAS).
      newton_schulz_steps: iterations of ``NS`` (muon only).
      max_surprise_norm: ``τ > 0``: clip every token's surprise ``u_t`` to this norm
        (over all layers together); ``None``: no clip.
      mode: ``"chunk"`` or ``"recurrent"`` (no quadratic ``"parallel"`` form).
      chunk_size: ``C`` of the chunk form (it changes results: see above).
      initial_state: a state from :func:`init_neural_memory_state` or a previous call.
      output_final_state: return the final state.
      state_position: return the state after this many tokens instead of after all
        ``T`` (may be traced; in chunk mode it must be ``T`` or a multiple of
        ``chunk_size``). Lets a caller keep the state at a chunk boundary.

    Returns:
      ``(o [B, T, H, V] in the inputs' dtype, final_state or None)``. Arithmetic
      runs in ``promote(dtype, float32)``. Two calls chained through the state equal
      one call over the concatenation (recurrent form; chunk form when the split is
      at a chunk boundary).
    """
    if mode not in FORMS:
        common.fail(OP, f"unknown `mode`={mode!r}; expected one of {FORMS}")
    chunk_size = common.check_chunk_size(OP, chunk_size)
    for name, x, layout in (("q", q, "K"), ("k", k, "K"), ("v", v, "V")):
        common.check_rank(OP, name, x, ["B", "T", "H", layout])
        common.check_floating(OP, name, x)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if length == 0:
        common.fail(OP, f"T=0 is not allowed: `q` has shape {common.shape_str(q)}")
    common.check_key_dim(OP, "q", q)
    common.check_bool(OP, "output_final_state", output_final_state)
    common.check_dim(OP, "k", k, 0, batch, "B of `q`")
    common.check_dim(OP, "k", k, 1, length, "T of `q`")
    common.check_dim(OP, "k", k, 2, heads, "H of `q`")
    common.check_dim(OP, "k", k, 3, key_dim, "K of `q`")
    for axis, what in ((0, "B"), (1, "T"), (2, "H")):
        common.check_dim(OP, "v", v, axis, q.shape[axis], f"{what} of `q`")
    gates = {"lr": lr, "momentum": momentum, "decay": decay}
    if omega_weights is not None:
        gates["omega_weights"] = omega_weights
    for name, gate in gates.items():
        common.check_floating(OP, name, gate)
        if tuple(jnp.shape(gate)) != (batch, length, heads):
            common.fail(
                OP,
                f"`{name}` must have shape [B, T, H] = {(batch, length, heads)}; "
                f"got {common.shape_str(gate)}",
            )
    # values (at once when concrete; under jit with `check_values` on)
    common.check_nonnegative(OP, "lr", lr)
    for name in ("momentum", "decay", "omega_weights"):
        common.check_unit_interval(OP, name, gates.get(name))
    omega_window = common.check_positive_int(OP, "omega_window", omega_window)
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        common.fail(OP, f"unknown `optimizer`={optimizer!r}; expected one of {OPTIMIZERS}")
    newton_schulz_steps = common.check_positive_int(OP, "newton_schulz_steps", newton_schulz_steps)
    if max_surprise_norm is not None and not isinstance(
        max_surprise_norm, (bool, int, float, np.integer, np.floating)
    ):
        common.fail_type(
            OP,
            f"`max_surprise_norm` must be a positive finite number or None; "
            f"got {max_surprise_norm!r}",
        )
    if max_surprise_norm is not None and (
        isinstance(max_surprise_norm, bool)
        or not max_surprise_norm > 0
        or max_surprise_norm == float("inf")
    ):
        common.fail(
            OP,
            f"`max_surprise_norm` must be a positive finite number or None; "
            f"got {max_surprise_norm!r}",
        )
    memory = _check_memory(memory, key_dim, value_dim, heads)
    if state_position is None:
        state_position = length
    elif (
        isinstance(state_position, (jax.Array, np.ndarray))
        and jnp.issubdtype(state_position.dtype, jnp.integer)
        and tuple(state_position.shape) == (batch,)
    ):
        pass  # one per sequence
    elif isinstance(state_position, (bool, np.bool_)) or not (
        isinstance(state_position, (int, np.integer))
        or (
            isinstance(state_position, (jax.Array, np.ndarray))
            and jnp.issubdtype(state_position.dtype, jnp.integer)
            and state_position.ndim == 0
        )
    ):
        common.fail_type(
            OP, f"`state_position` must be an int or a 0-d integer array; got {state_position!r}"
        )
    elif common.is_concrete(state_position):
        position = int(state_position)
        if not 0 <= position <= length or (
            mode == "chunk" and position != length and position % chunk_size
        ):
            common.fail(
                OP,
                f"`state_position`={position} must lie in [0, T={length}] and, in "
                f"chunk mode, be T or a multiple of chunk_size={chunk_size}",
            )
    else:
        in_chunks = mode == "chunk"
        common.check_values(
            OP,
            "state_position",
            state_position,
            lambda p, xp: (
                (p >= 0) & (p <= length) & ((p == length) | (p % chunk_size == 0) | (not in_chunks))
            ),
            f"in [0, T={length}]"
            + (f" and T or a multiple of chunk_size={chunk_size}" if in_chunks else ""),
        )

    dtype = common.compute_dtype(q, k, v, lr, momentum, decay, omega_weights, *memory)
    if initial_state is not None:
        dtype = jnp.promote_types(dtype, common.compute_dtype(*jax.tree.leaves(initial_state)))
    out_dtype = jnp.result_type(q, k, v)
    expected = init_neural_memory_state(
        memory, batch, key_dim=key_dim, value_dim=value_dim, omega_window=omega_window, dtype=dtype
    )
    if initial_state is None:
        state = expected
    else:
        _check_state(initial_state, expected)
        state = {key: value.astype(dtype) for key, value in initial_state.items()}
    gamma = jnp.ones_like(lr) if omega_weights is None else omega_weights

    def heads_first(x):  # [B, T, H, ...] -> [B, H, T, ...]
        return jnp.moveaxis(x.astype(dtype), 2, 1)

    streams = tuple(heads_first(x) for x in (q, k, v, lr, momentum, decay, gamma))
    rule = Rule(
        omega_window,
        optimizer,
        newton_schulz_steps,
        None if max_surprise_norm is None else float(max_surprise_norm),
    )
    if mode == "chunk":
        run = partial(chunk_sequence, rule=rule, chunk_size=chunk_size)
    else:
        run = partial(recurrent_sequence, rule=rule)
    if resets is not None:
        if tuple(jnp.shape(resets)) != (batch, length):
            common.fail(
                OP,
                f"`resets` must have shape [B, T] = {(batch, length)}; "
                f"got {common.shape_str(resets)}",
            )
        reset_streams = (
            jnp.broadcast_to(jnp.asarray(resets, bool)[:, None], (batch, heads, length)),
        )
        init_carry = (_to_carry(expected, len(memory), omega_window),)
    else:
        reset_streams, init_carry = (), ()
    # One vmap over B·H rather than one per axis: with nested vmaps a batch of 1 stays a
    # leading axis of 1 in the backward's sums over a chunk's tokens, which XLA:CPU
    # (jaxlib 0.10) reduced ~100× slower than with the axes merged.
    merge = lambda x: x.reshape((batch * heads,) + x.shape[2:])
    split = lambda x: x.reshape((batch, heads) + x.shape[1:])
    position = jnp.broadcast_to(
        jnp.asarray(state_position, jnp.int32).reshape(-1, 1), (batch, heads)
    )

    def one(*args):
        *args, position = args
        if resets is None:
            return run(*args, state_position=position)
        *args, reset, init = args
        return run(*args, state_position=position, resets=reset, init=init)

    o, carry = jax.vmap(one)(
        *map(merge, streams),
        jax.tree.map(merge, _to_carry(state, len(memory), omega_window)),
        *map(merge, reset_streams),
        *jax.tree.map(merge, init_carry),
        merge(position),
    )
    o, carry = split(o), jax.tree.map(split, carry)
    o = jnp.moveaxis(o, 1, 2).astype(out_dtype)
    return o, (_from_carry(carry) if output_final_state else None)
