"""LASP-2 sequence parallelism for the linear-recurrence ops.

``sequence_parallel(op, mesh, axis="seq")`` returns ``op`` with its own signature,
running on arrays whose sequence axis (T) is split over the mesh axis ``axis``.

Derivation. Every op here is a linear recurrence in its state::

    S_t = A_t S_{t-1} + B_t       (A_t: decay, diagonal decay, or the delta rule's
                                   a_t·diag(exp gk_t)·(I − β_t k_t k_tᵀ); B_t: the write)

so over a shard ``s`` of consecutive tokens the final state is an affine function of
the state the shard starts from::

    S_end(s) = 𝒜_s S_start(s) + ℳ_s,   𝒜_s = A_last ⋯ A_first,   ℳ_s = S_end from S = 0.

``(𝒜, ℳ)`` pairs compose associatively — ``(𝒜₂, ℳ₂) ∘ (𝒜₁, ℳ₁) = (𝒜₂𝒜₁, 𝒜₂ℳ₁ + ℳ₂)`` —
so with shards ``0 … n−1`` the state entering shard ``s`` is the exact fold
``S_start(s) = (𝒜_{s−1}, ℳ_{s−1}) ∘ ⋯ ∘ (𝒜_0, ℳ_0) applied to S_init``. The outputs of
shard ``s`` are those of the op run locally from ``S_start(s)``: nothing is
approximated. Per call, each device

1. runs the local chunk form from a zero state to get ``ℳ_s`` ``[B, H, K, V]``, and
   its transition ``𝒜_s``: nothing for plain linear attention, a decay product
   ``[B, H, 1]`` for ``g``, a diagonal ``[B, H, K]`` for ``gk`` (with ``g``: one
   diagonal ``[B, H, K]``), a ``K × K`` matrix for the delta rule (the same local op run from
   ``S = I`` with zero values);
2. **one all-gather** of the packed pairs over ``axis``: ``n · B·H·(K·V + transition)``
   numbers, independent of T;
3. folds the earlier shards' pairs into its initial state (a scan over ``n`` small
   pairs, on every device), and reruns the local chunk form from it. The global
   final state is the fold of all ``n`` pairs, the same on every device.

The backward pass is JAX's transpose of the same program: the all-gather becomes
one reduce-scatter of the pairs' cotangents (a suffix fold of state cotangents), so
the backward also communicates ``O(B·H·K·(K+V))`` per shard, once — plus one
``psum`` of the replicated arguments' gradients (the initial state ``[B, H, K, V]``,
a per-head ``g``), also independent of T. Plain autodiff therefore adds no
communication beyond the mirror image, and no custom VJP is needed.

Cost per layer and device: two local chunk passes for the linear family, three for
the delta rule (one with ``V = K`` for the transition) — ``O(T/n)`` each — plus the
fold, ``O(n·B·H·K²·V)`` for the delta rule. Each device receives
``(n − 1)·B·H·(K·V + transition)`` numbers; ring attention would move
``(n − 1)/n·B·T·H_kv·(K + V)``, linear in T (the 256-chip estimate is in
``experiments/results/sequence_parallel_estimate.md``).

Under a mesh with more axes, the ``shard_map`` also splits the batch over ``data`` /
``fsdp`` and the heads over ``tensor`` where they divide, so LASP-2 composes with
data, FSDP and tensor parallelism; its only collective stays the one over ``axis``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from xformjax import ops
from xformjax.parallel import lasp2h
from xformjax.parallel.mesh import sequence_layout, spec_axes

#: the ``jax.named_scope`` of LASP-2's shard_map (op names in compiled HLO carry it)
SCOPE = "lasp2"
_KINDS = {ops.linear_attention: "linear", ops.delta_rule: "delta", ops.delta_product: "delta"}
#: arguments laid out [B, T(·n), H, ...]: split along T.
_SEQUENCE_ARGS = ("q", "k", "v", "beta", "g", "gk")


def _linear_transition(g, gk, batch, heads, dtype, length):
    """``𝒜`` of a shard for linear attention: ``None`` (identity) without gates,
    ``exp(Σ g)`` ``[B, H, 1]`` for a scalar gate, ``exp(Σ g + Σ gk)`` ``[B, H, K]``
    with a per-channel gate."""
    if g is None and gk is None:
        return None
    log_a = jnp.zeros((batch, heads, 1), dtype)
    if g is not None:
        total = g.astype(dtype) * length if g.ndim == 1 else jnp.sum(g.astype(dtype), axis=1)
        log_a = log_a + total[..., None]
    if gk is not None:
        log_a = log_a + jnp.sum(gk.astype(dtype), axis=1)
    return jnp.exp(log_a)


def _apply(kind, transition, state):
    if transition is None:
        return state
    if kind == "linear":
        return transition[..., None] * state
    return jnp.einsum("bhij,bhjv->bhiv", transition, state)


def _with_axes(entry, extra: tuple[str, ...]):
    """A ``PartitionSpec`` entry (``None``, a name or a tuple) with ``extra`` axes
    appended (size-1 axes: the split is unchanged)."""
    if not extra:
        return entry
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return names + extra


def _pack(transition, contribution):
    batch, heads = contribution.shape[:2]
    if transition is None:
        return contribution.reshape(batch, heads, -1)
    return jnp.concatenate(
        [transition.reshape(batch, heads, -1), contribution.reshape(batch, heads, -1)], axis=-1
    )


@dataclasses.dataclass(frozen=True)
class _BlockLayout:
    """How a ``shard_map`` over every mesh axis splits ``[B, T, H, ...]`` arrays: the
    batch over the batch axes and the heads over ``tensor`` where they divide
    (:func:`~xformjax.parallel.mesh.sequence_layout`).

    Every mesh axis is manual in the ``shard_map`` s here: a Pallas TPU kernel cannot be
    partitioned over an Auto axis, even one of size 1. The size-1 axes no entry uses go
    into the batch entry (and a per-head ``g``'s), so that nothing is replicated over a
    manual axis and the backward adds no psum over them.
    """

    batch: Any
    heads: Any
    filler: tuple[str, ...]

    @classmethod
    def of(cls, mesh: Mesh | AbstractMesh, axis: str | None, q: jax.Array) -> _BlockLayout:
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        batch, heads = sequence_layout(sizes, axis or "", q.shape[0], (q.shape[2],))
        used = spec_axes(*((axis,) if axis else ()), batch, heads)
        filler = tuple(a for a in mesh.axis_names if a not in used and sizes[a] == 1)
        return cls(_with_axes(batch, filler), heads, filler)

    def spec(self, name: str, array: jax.Array, axis: str | None) -> PartitionSpec:
        """The spec of argument ``name``: T (axis 1) over ``axis`` (``None``: whole)."""
        if name == "g" and array.ndim == 1:
            return PartitionSpec(_with_axes(self.heads, self.filler))
        return PartitionSpec(self.batch, axis, self.heads)

    @property
    def state_spec(self) -> PartitionSpec:
        return PartitionSpec(self.batch, self.heads)


def block_parallel(op: Callable, mesh: Mesh | AbstractMesh) -> Callable:
    """``op`` run by every device on its block of the batch and heads, T whole.

    A ``shard_map`` over every mesh axis, the batch split over ``data``/``fsdp`` and
    the heads over ``tensor`` where they divide (replicated otherwise); the forward
    needs no collective. The layers call their op this way under a mesh without
    sequence parallelism when the kernels may run (a GPU or TPU, or
    ``ops.compiling_for`` one): XLA cannot partition a Pallas kernel's custom call
    itself (on a TPU: "Mosaic kernels cannot be automatically partitioned"). Takes
    ``op``'s arguments (``cu_seqlens`` calls run ``op`` as it is) and returns what it
    returns.
    """
    if op not in _KINDS:
        raise ValueError(
            "block_parallel supports ops.linear_attention, ops.delta_rule and "
            f"ops.delta_product; got {getattr(op, '__name__', op)!r}"
        )
    signature = inspect.signature(op)

    @functools.wraps(op)
    def blocked_op(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        if arguments.get("cu_seqlens") is not None:
            return op(*args, **kwargs)
        want_final = arguments.pop("output_final_state")
        initial = arguments.pop("initial_state")
        arrays = {
            name: arguments.pop(name) for name in _SEQUENCE_ARGS if arguments.get(name) is not None
        }
        layout = _BlockLayout.of(mesh, None, arrays["q"])
        names = tuple(arrays)
        in_specs = (
            tuple(layout.spec(n, arrays[n], None) for n in names),
            layout.state_spec if initial is not None else None,
        )

        def local(local_arrays, init):
            values = dict(zip(names, local_arrays))
            return op(**values, **arguments, initial_state=init, output_final_state=True)

        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=(PartitionSpec(layout.batch, None, layout.heads), layout.state_spec),
            axis_names=frozenset(mesh.axis_names),
            check_vma=False,
        )
        o, final = sharded(tuple(arrays[n] for n in names), initial)
        return o, (final if want_final else None)

    return blocked_op


def sequence_parallel(op: Callable, mesh: Mesh | AbstractMesh, axis: str = "seq") -> Callable:
    """``op`` (``ops.linear_attention``, ``ops.delta_rule`` or ``ops.delta_product``)
    made sequence-parallel over ``mesh``'s axis ``axis`` (see the module docstring);
    ``ops.softmax_attention`` / ``ops.sigmoid_attention`` get LASP-2H
    (:mod:`xformjax.parallel.lasp2h`).

    The returned function takes global arrays (T divisible by the axis size),
    supports every argument of ``op`` except ``cu_seqlens``, and returns what ``op``
    returns. Outputs are split along T like the inputs; the final state is
    replicated over ``axis``. Inside, the batch is also split over the mesh's
    ``data``/``fsdp`` axes and the heads over ``tensor`` where they divide
    (:func:`~xformjax.parallel.mesh.sequence_layout`), so the op composes with data
    and tensor parallelism without gathering either.
    """
    if op not in _KINDS and op not in lasp2h.KINDS:
        raise ValueError(
            f"sequence_parallel supports ops.linear_attention, ops.delta_rule, "
            f"ops.delta_product, ops.softmax_attention and ops.sigmoid_attention;"
            f" got {getattr(op, '__name__', op)!r}"
        )
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))  # a Mesh or an AbstractMesh
    if axis not in sizes:
        raise ValueError(f"mesh has axes {tuple(sizes)}; no axis {axis!r}")
    if op in lasp2h.KINDS:
        return lasp2h.attention_sequence_parallel(op, mesh, axis, sizes[axis])
    kind = _KINDS[op]
    signature = inspect.signature(op)
    shards = sizes[axis]

    @functools.wraps(op)
    def parallel_op(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        if arguments.get("cu_seqlens") is not None:
            raise ValueError("sequence_parallel: cu_seqlens is not supported; pack along B")
        length = arguments["q"].shape[1]
        if length % shards:
            raise ValueError(
                f"sequence_parallel: T={length} must be divisible by the "
                f"{axis!r} axis size {shards}"
            )
        want_final = arguments.pop("output_final_state")
        initial = arguments.pop("initial_state")
        arrays = {
            name: arguments.pop(name) for name in _SEQUENCE_ARGS if arguments.get(name) is not None
        }
        static = arguments  # scale, mode, chunk_size, normalize, num_householder, ...

        layout = _BlockLayout.of(mesh, axis, arrays["q"])
        names = tuple(arrays)
        state_spec = layout.state_spec
        in_specs = (
            tuple(layout.spec(n, arrays[n], axis) for n in names),
            state_spec if initial is not None else None,
        )
        batch_part, heads_part = layout.batch, layout.heads

        def local(local_arrays, init):
            values = dict(zip(names, local_arrays))
            _, contribution = op(**values, **static, initial_state=None, output_final_state=True)
            dtype = contribution.dtype
            batch, heads, key_dim, _ = contribution.shape
            if kind == "linear":
                transition = _linear_transition(
                    values.get("g"), values.get("gk"), batch, heads, dtype, values["q"].shape[1]
                )
            else:
                eye = jnp.broadcast_to(
                    jnp.eye(key_dim, dtype=dtype), (batch, heads, key_dim, key_dim)
                )
                identity_run = {**values, "v": jnp.zeros(values["k"].shape, values["v"].dtype)}
                _, transition = op(
                    **identity_run, **static, initial_state=eye, output_final_state=True
                )
            packed = jax.lax.all_gather(_pack(transition, contribution), axis)  # one collective
            split = 0 if transition is None else transition.size // (batch * heads)
            transitions = (
                None
                if transition is None
                else packed[..., :split].reshape((shards,) + transition.shape)
            )
            contributions = packed[..., split:].reshape((shards,) + contribution.shape)

            def fold(state, pair):
                a, m = pair
                return _apply(kind, a, state) + m, state

            start = jnp.zeros_like(contribution) if init is None else init.astype(dtype)
            final, entering = jax.lax.scan(fold, start, (transitions, contributions))
            index = jax.lax.axis_index(axis)
            initial_state = jax.lax.dynamic_index_in_dim(entering, index, keepdims=False)
            o, _ = op(**values, **static, initial_state=initial_state, output_final_state=False)
            return o, final

        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=(PartitionSpec(batch_part, axis, heads_part), state_spec),
            axis_names=frozenset(mesh.axis_names),  # every axis manual (see above)
            check_vma=False,
        )
        # the scope names this layer's collectives in the compiled program's metadata
        # (``lasp2/…`` forward, ``transpose(…lasp2…)`` backward; see xformjax aot)
        with jax.named_scope(SCOPE):
            o, final = sharded(tuple(arrays[n] for n in names), initial)
        return o, (final if want_final else None)

    return parallel_op
