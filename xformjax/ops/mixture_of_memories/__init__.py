"""``mixture_of_memories``: M routed (gated) delta-rule memories read by one query.

Mixture-of-Memories ("MoM: Linear Sequence Modeling with Mixture-of-Memories",
Du et al. 2025) keeps M independent matrix memories; a router sends each token
to a few of them. For every batch row, head and memory ``m``::

    routed  (r_{t,m} ≠ 0):  S' = exp(g_{t,m}) · S^{(m)}_{t-1}
                            S^{(m)}_t = S' + β_{t,m} k_{t,m} (v_{t,m} − S'ᵀ k_{t,m})ᵀ
    not routed (r_{t,m} = 0):  S^{(m)}_t = S^{(m)}_{t-1}     (identity transition)
    o_t = Σ_m r_{t,m} · scale · S^{(m)ᵀ}_t q_t

A token that is not routed to a memory leaves it untouched: its β and g are
masked to 0, which makes the delta-rule step the identity exactly. The M
memories are then independent delta rules sharing the query, so the op folds
M into the head axis (``[B, T, M·H, ·]``) and runs :func:`xformjax.ops.delta_rule`
once: it stays linear in T in the chunk form and inherits the parallel and
recurrent forms, the gradients and the state handling.

``resets`` (bool ``[B, T]``) restarts every memory from zero at the marked tokens
(documents packed in a row): a log-decay of :data:`RESET_LOG_GATE` (finite, so the
chunk form's log-decay sums stay finite; ``exp`` of it is 0) is added there to every
memory's gate, routed or not, before the token's own step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xformjax.ops import common
from xformjax.ops.common.gates import RESET_LOG_GATE
from xformjax.ops.common.validation import Backend, Mode
from xformjax.ops.delta_rule import delta_rule

__all__ = ["mixture_of_memories"]

OP = "mixture_of_memories"


def _validate(q, k, v, beta, routing, g, initial_state) -> None:
    """Shapes and dtypes of every argument, and the values of β (finite, in [0, 2]),
    ``routing`` (finite, ≥ 0) and ``g`` (finite, ≤ 0): clear ``ValueError`` otherwise
    (values: at once when concrete, under ``jit`` with ``check_values`` on)."""
    common.check_rank(OP, "q", q, ["B", "T", "H", "K"])
    common.check_rank(OP, "k", k, ["B", "T", "M", "H", "K"])
    common.check_rank(OP, "v", v, ["B", "T", "M", "H", "V"])
    common.check_rank(OP, "beta", beta, ["B", "T", "M", "H"])
    common.check_rank(OP, "routing", routing, ["B", "T", "M"])
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("routing", routing)):
        common.check_floating(OP, name, x)
    batch, num_tokens, heads, key_dim = q.shape
    if num_tokens == 0:
        common.fail(
            OP, f"`q` has T=0 tokens (shape {common.shape_str(q)}); at least one token is needed"
        )
    common.check_key_dim(OP, "q", q)
    memories = k.shape[2]
    where_q = f"of `q` {common.shape_str(q)}"
    for axis, size, what in (
        (0, batch, f"B {where_q}"),
        (1, num_tokens, f"T {where_q}"),
        (3, heads, f"H {where_q}"),
        (4, key_dim, f"K {where_q}"),
    ):
        common.check_dim(OP, "k", k, axis, size, what)
    where_k = f"of `k` {common.shape_str(k)}"
    for axis, size, what in (
        (0, batch, f"B {where_q}"),
        (1, num_tokens, f"T {where_q}"),
        (2, memories, f"M {where_k}"),
        (3, heads, f"H {where_q}"),
    ):
        common.check_dim(OP, "v", v, axis, size, what)
    expected = (batch, num_tokens, memories, heads)
    if tuple(beta.shape) != expected:
        common.fail(
            OP, f"`beta` must have shape [B, T, M, H] = {expected}; got {common.shape_str(beta)}"
        )
    if tuple(routing.shape) != expected[:3]:
        common.fail(
            OP,
            f"`routing` must have shape [B, T, M] = {expected[:3]}; "
            f"got {common.shape_str(routing)}",
        )
    common.check_beta_values(OP, beta)
    common.check_nonnegative(OP, "routing", routing)
    if g is not None:
        common.check_floating(OP, "g", g)
        if tuple(jnp.shape(g)) != expected:
            common.fail(
                OP, f"`g` must have shape [B, T, M, H] = {expected}; got {common.shape_str(g)}"
            )
        common.check_log_gate(OP, "g", g)
    if initial_state is not None:
        common.check_floating(OP, "initial_state", initial_state)
        state_shape = (batch, memories, heads, key_dim, v.shape[4])
        if tuple(jnp.shape(initial_state)) != state_shape:
            common.fail(
                OP,
                f"`initial_state` must have shape [B, M, H, K, V] = {state_shape}; "
                f"got {common.shape_str(initial_state)}",
            )


def _fold(x: jax.Array) -> jax.Array:
    """``[B, T, M, H, ...]`` → ``[B, T, M·H, ...]`` (memory-major heads)."""
    return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def mixture_of_memories(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    routing: jax.Array,
    *,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    resets: jax.Array | None = None,
    mode: Mode = "chunk",
    chunk_size: int = 64,
    backend: Backend | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """M gated delta-rule memories, each updated only on the tokens routed to it.

    For every batch row, head and memory ``m`` (see the module docstring)::

        r_{t,m} ≠ 0:  S' = exp(g_{t,m}) S_{t-1}
                      S_t = S' + β_{t,m} k_{t,m} (v_{t,m} − S'ᵀk_{t,m})ᵀ
        r_{t,m} = 0:  S_t = S_{t-1}
        o_t = Σ_m r_{t,m} · scale · S^{(m)ᵀ}_t q_t

    Args:
      q: ``[B, T, H, K]``, the query shared by every memory (``K ≥ 1``).
      k: ``[B, T, M, H, K]``; v: ``[B, T, M, H, V]``; beta: ``[B, T, M, H]``
        (finite and in [0, 2], as :func:`xformjax.ops.delta_rule`): each memory's
        own streams.
      routing: ``[B, T, M]`` router weights, finite and ≥ 0, exactly zero for the
        memories a token is not routed to (an always-on shared memory has weight 1
        everywhere).
      g: optional natural-log decays (finite, ≤ 0) ``[B, T, M, H]``.
      scale: a finite number > 0; defaults to ``K ** -0.5``.
      initial_state: ``[B, M, H, K, V]``.
      output_final_state: also return the final states ``[B, M, H, K, V]``.
      resets: optional bool ``[B, T]``: every memory restarts from zero at these
        tokens (before their own step): documents packed in a row.
      mode: ``"chunk"``, ``"parallel"`` or ``"recurrent"``, as :func:`xformjax.ops.delta_rule`.
      chunk_size, backend: as :func:`xformjax.ops.delta_rule`.

    Returns:
      ``(o [B, T, H, V]`` in the inputs' dtype, ``final_state [B, M, H, K, V]``
      in the accumulation dtype, or ``None`` unless ``output_final_state)``.

    Raises:
      ValueError: a malformed argument (shapes, β outside [0, 2], a negative or
        non-finite routing weight, a positive gate …), named in the message; the
        value checks run under ``jit`` only with ``xformjax.config`` option
        ``check_values`` on. TypeError: an argument of the wrong type.

    Gradients reach every floating input; the routing pattern (which weights are
    zero) is treated as fixed, as in mixture-of-experts layers.

    Example:
      >>> import jax.numpy as jnp
      >>> from xformjax.ops.mixture_of_memories import mixture_of_memories
      >>> q = jnp.ones((1, 10, 2, 8)) / 8 ** 0.5
      >>> k, v = jnp.broadcast_to(q[:, :, None], (1, 10, 3, 2, 8)), jnp.ones((1, 10, 3, 2, 8))
      >>> routing = jnp.zeros((1, 10, 3)).at[:, :, 1].set(1.0)   # every token to memory 1
      >>> o, s = mixture_of_memories(q, k, v, jnp.full((1, 10, 3, 2), 0.5), routing,
      ...                            output_final_state=True)
      >>> o.shape, s.shape, float(jnp.abs(s[:, 0]).max())   # memory 0 never written
      ((1, 10, 2, 8), (1, 3, 2, 8, 8), 0.0)
    """
    common.check_mode(OP, mode)
    common.check_chunk_size(OP, chunk_size)
    common.resolve_backend(OP, backend)
    common.check_bool(OP, "output_final_state", output_final_state)
    common.check_scale(OP, scale)
    _validate(q, k, v, beta, routing, g, initial_state)
    batch, num_tokens, memories, heads, key_dim = k.shape
    value_dim = v.shape[-1]

    out_dtype = jnp.result_type(q, k, v)
    dtype = common.compute_dtype(q, k, v, beta, routing, g, initial_state)
    routing = routing.astype(dtype)
    routed = (routing != 0)[..., None]  # [B, T, M, 1]
    # identity transition where not routed: no delta step (β = 0), no decay (g = 0)
    beta = jnp.where(routed, beta.astype(dtype), 0)
    g = None if g is None else jnp.where(routed, g.astype(dtype), 0)
    if resets is not None:
        if tuple(jnp.shape(resets)) != (batch, num_tokens):
            common.fail(
                OP,
                f"`resets` must have shape [B, T] = {(batch, num_tokens)}; "
                f"got {common.shape_str(resets)}",
            )
        wipe = jnp.where(jnp.asarray(resets, bool), RESET_LOG_GATE, 0.0).astype(dtype)
        wipe = jnp.broadcast_to(wipe[:, :, None, None], (batch, num_tokens, memories, heads))
        g = wipe if g is None else g + wipe
    q_all = jnp.broadcast_to(
        q.astype(dtype)[:, :, None], (batch, num_tokens, memories, heads, key_dim)
    )
    init = (
        None
        if initial_state is None
        else initial_state.astype(dtype).reshape(batch, memories * heads, key_dim, value_dim)
    )

    o, final = delta_rule(
        _fold(q_all),
        _fold(k.astype(dtype)),
        _fold(v.astype(dtype)),
        _fold(beta),
        g=None if g is None else _fold(g),
        scale=key_dim**-0.5 if scale is None else scale,
        initial_state=init,
        output_final_state=output_final_state,
        mode=mode,
        chunk_size=chunk_size,
        backend=backend,
    )
    o = o.reshape(batch, num_tokens, memories, heads, value_dim)
    o = jnp.einsum("btmhv,btm->bthv", o, routing)
    if final is not None:
        final = final.reshape(batch, memories, heads, key_dim, value_dim)
    return o.astype(out_dtype), final
