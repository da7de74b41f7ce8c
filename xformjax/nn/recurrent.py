"""Base class of the mixers whose state is a matrix memory ``S`` ``[B, H, K, V]``.

A subclass turns the input into the op's arguments (:meth:`prepare`) and the op's
output back into the residual stream (:meth:`finish`); this class runs the op in
the requested form, threads the memory and the subclass's extra state (conv
caches, running sums) and counts positions. The state is a
:class:`~xformjax.nn.states.MemoryState`, or the subclass of it the layer names
as ``state_type`` (its extra fields are what :meth:`init_extra_state` and
``OpInputs.extra_state`` give).

Documents packed in a row (``segment_ids``, :mod:`xformjax.nn.packing`) are kept apart
by the gate: after :meth:`~MatrixMemoryMixer.prepare`, ``g`` becomes a per-token gate
``[B, T, H]`` holding :data:`~xformjax.nn.packing.RESET_LOG_GATE` at every document's
first token (:func:`~xformjax.nn.packing.with_reset`), so every form of the op starts
the document from the empty state — exactly: ``exp`` of it is 0. ``gk`` is left as it
is (the op sums the two); DeltaProduct's op puts a token's gate on its first
Householder row, so the reset wipes the state before the token's first step. What a
subclass computes along the sequence itself (positions, running sums) restarts per
document in :meth:`~MatrixMemoryMixer.prepare`, which gets the packing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax import ops
from xformjax.nn.mixer import QKV, Mixer, OutputHead, position_of
from xformjax.nn.packing import Packing, with_reset
from xformjax.nn.states import ConvCaches, ConvMemoryState, MemoryState
from xformjax.nn.streams import conv_qkv, init_conv_caches, qkv_convs
from xformjax.ops.common.validation import ACCELERATORS, Mode, target_platform


@dataclasses.dataclass
class OpInputs:
    """Arguments of one op call (``[B, T, H, ·]`` layout, as the op contract).

    ``op`` is ``"linear"`` (:func:`ops.linear_attention`), ``"delta"``
    (:func:`ops.delta_rule`) or ``"delta_product"`` (:func:`ops.delta_product`).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    op: str = "linear"
    g: jax.Array | None = None
    gk: jax.Array | None = None
    beta: jax.Array | None = None
    scale: float | None = None
    normalize: bool = False
    num_householder: int = 1
    #: the new values of the state's fields beyond ``memory`` and ``position``, by
    #: field name of the layer's ``state_type``.
    extra_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the call's documents (set by :meth:`MatrixMemoryMixer.__call__`, for ``finish``).
    packing: Packing | None = None


def document_scan(
    combine: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    starts: jax.Array,
) -> jax.Array:
    """The inclusive scan ``out_t = combine(out_{t−1}, x_t)`` along axis 1 (tokens) of
    ``x`` ``[B, T, ...]``, restarted (``out_t = x_t``) where ``starts`` ``[B, T]`` is
    true: a running sum or log-sum-exp per packed document. ``combine`` must be
    associative (an associative scan, ``O(log T)`` depth)."""
    flags = starts.reshape(starts.shape + (1,) * (x.ndim - 2))
    flags = jnp.broadcast_to(flags, x.shape[:2] + flags.shape[2:])

    def step(earlier, later):
        began_earlier, value_earlier = earlier
        began_later, value_later = later
        joined = jnp.where(began_later, value_later, combine(value_earlier, value_later))
        return began_earlier | began_later, joined

    return jax.lax.associative_scan(step, (flags, x), axis=1)[1]


def sequence_mesh(length: int):
    """The active mesh (``jax.set_mesh``) if its ``seq`` axis has size > 1 dividing
    ``length``, else ``None``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "seq" not in mesh.axis_names:
        return None
    size = dict(zip(mesh.axis_names, mesh.axis_sizes))["seq"]
    return mesh if size > 1 and length % size == 0 else None


def kernel_mesh():
    """The active mesh if it spans several devices, is not manual (a ``shard_map``
    body) and the ops may pick a Pallas kernel (a GPU or TPU, or
    ``ops.compiling_for`` one), else ``None``: XLA cannot partition a kernel's custom
    call, so the op must run per device (:func:`xformjax.parallel.block_parallel`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or target_platform() not in ACCELERATORS:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh


def run_op(
    inputs: OpInputs, initial_state: jax.Array | None, mode: Mode, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """Call the op ``inputs`` names; returns ``(o, final_state)``.

    In chunk mode under an active mesh whose ``seq`` axis has size > 1 (dividing T),
    the op runs with LASP-2 sequence parallelism
    (:func:`xformjax.parallel.sequence_parallel`); under another multi-device mesh,
    where the kernels may run, per device on its block of batch and heads
    (:func:`xformjax.parallel.block_parallel`, see :func:`kernel_mesh`). Results are
    the same.
    """
    common = dict(
        scale=inputs.scale,
        initial_state=initial_state,
        output_final_state=True,
        mode=mode,
        chunk_size=chunk_size,
    )
    functions = {
        "linear": ops.linear_attention,
        "delta": ops.delta_rule,
        "delta_product": ops.delta_product,
    }
    if inputs.op not in functions:
        raise ValueError(f"unknown op {inputs.op!r}")
    function = functions[inputs.op]
    mesh = sequence_mesh(inputs.q.shape[1]) if mode == "chunk" else None
    if mesh is not None:
        from xformjax.parallel import sequence_parallel  # parallel builds on ops only

        function = sequence_parallel(function, mesh, "seq")
    elif mode == "chunk" and (blocks := kernel_mesh()) is not None:
        from xformjax.parallel import block_parallel

        function = block_parallel(function, blocks)
    if inputs.op == "linear":
        return function(
            inputs.q,
            inputs.k,
            inputs.v,
            g=inputs.g,
            gk=inputs.gk,
            normalize=inputs.normalize,
            **common,
        )
    if inputs.op == "delta":
        return function(
            inputs.q, inputs.k, inputs.v, inputs.beta, g=inputs.g, gk=inputs.gk, **common
        )
    return function(
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.beta,
        g=inputs.g,
        num_householder=inputs.num_householder,
        **common,
    )


class MatrixMemoryMixer(Mixer):
    """``prepare → op → finish`` with the memory in ``state.memory``."""

    modes: ClassVar[tuple[str, ...]] = ("chunk", "parallel", "recurrent")
    #: the class of the layer's state.
    state_type: ClassVar[type[MemoryState]] = MemoryState

    def standard_layers(self, rngs: nnx.Rngs, *, norm: str | None) -> None:
        """The usual parts: ``self.qkv`` (head-sized q, k, v projections) and
        ``self.head`` (per-head ``norm``, SiLU output gate if ``config.output_gate``,
        output projection)."""
        config = self.config
        self.qkv = QKV(config, key_dim=config.key_dim, value_dim=config.value_dim, rngs=rngs)
        self.head = OutputHead(
            config,
            config.num_heads,
            config.value_dim,
            norm=norm,
            gate="silu" if config.output_gate else None,
            rngs=rngs,
        )

    def memory_shape(self) -> tuple[int, int, int]:
        """``(H, K, V)`` of the op's state (``V + 1`` columns when normalising)."""
        return (self.config.num_heads, self.config.key_dim, self.config.value_dim)

    def init_extra_state(self, batch: int) -> dict[str, Any]:
        """The empty state's fields beyond ``memory`` and ``position`` (conv caches,
        running sums), by field name; none by default."""
        return {}

    def prepare(
        self,
        x: jax.Array,
        state: MemoryState | None,
        position: jax.Array,
        packing: Packing | None = None,
    ) -> OpInputs:
        """The op's arguments for input ``x`` at ``position`` (with ``extra_state``
        holding the subclass's new extra state). With ``packing``, whatever runs along
        the sequence (positional encodings, running sums, convolutions) restarts at
        each document; the state reset itself is added to ``g`` afterwards."""
        raise NotImplementedError(f"{type(self).__name__} must define prepare")

    def finish(
        self, o: jax.Array, x: jax.Array, inputs: OpInputs, state: MemoryState | None
    ) -> jax.Array:
        """The op's output ``[B, T, H, V]`` → ``[B, T, d_model]`` (``self.head`` by default)."""
        return self.head(o, x)

    def sequence_flops(self, seq_len: int) -> float:
        """Chunk form: intra-chunk ``QKᵀ`` and ``(·)V`` over ``C`` tokens, plus the
        state read-out and update (``2·K·V`` each); the delta rule adds the WY/UT
        preparation (``KKᵀ``, ``W = AK``, ``U = AV``) and the state correction."""
        heads, key_dim, value_dim = self.memory_shape()
        chunk = min(self.config.chunk_size, seq_len)
        per_head = 2 * chunk * (key_dim + value_dim) + 4 * key_dim * value_dim
        if self.op_kind in ("delta", "delta_product"):
            steps = getattr(self, "steps", 1)
            per_head += steps * (2 * chunk * (2 * key_dim + value_dim) + 2 * key_dim * value_dim)
        return float(heads * per_head)

    op_kind = "linear"

    def memory_dtype(self):
        return jnp.promote_types(self.config.compute_dtype, jnp.float32)

    def init_state(self, batch: int, max_len: int | None = None) -> MemoryState:
        del max_len  # the memory does not grow with the sequence
        memory = jnp.zeros((batch, *self.memory_shape()), self.memory_dtype())
        return self.state_type(
            memory=memory, position=jnp.zeros((), jnp.int32), **self.init_extra_state(batch)
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        state: MemoryState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, MemoryState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``; ``segment_ids``,
        ``positions`` ``[B, T]``: documents packed in the rows (module docstring)."""
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        position = position_of(state)
        packing = self.packing(x, state, segment_ids, positions)
        inputs = self.prepare(x, state, position, packing)
        batch, length, heads = inputs.q.shape[:3]
        inputs.g = with_reset(inputs.g, packing, (batch, length, heads))
        inputs.packing = packing
        memory = None if state is None else state.memory
        o, final = run_op(inputs, memory, mode, self.config.chunk_size)
        y = self.finish(o, x, inputs, state)
        new_state = self.state_type(
            memory=final.astype(self.memory_dtype()),
            position=position + x.shape[1],
            **inputs.extra_state,
        )
        return y, new_state


class ShortConvMixer(MatrixMemoryMixer):
    """A matrix-memory layer whose ``self.qkv`` streams take ``config.short_conv``:
    ``SiLU(conv(·))`` on q, k and v, the convolutions' caches in the state's ``conv``
    (linear attention, RetNet, GLA). A subclass calls :meth:`add_short_convs` after
    building ``self.qkv`` and takes its q, k, v from :meth:`conv_streams`."""

    state_type: ClassVar[type[MemoryState]] = ConvMemoryState
    short_conv_option = True

    def add_short_convs(self, rngs: nnx.Rngs) -> None:
        """``self.convs``: the q, k, v short convolutions of ``config.short_conv`` over
        ``self.qkv``'s widths (empty without the option; the state's ``conv`` caches
        are then empty too)."""
        self.convs = qkv_convs(self.config, self.qkv, rngs)

    def empty_conv_caches(self, batch: int) -> ConvCaches:
        """The convolutions' caches at the start of a sequence."""
        return init_conv_caches(self.convs, batch, self.config.compute_dtype)

    def conv_streams(
        self, x: jax.Array, state: ConvMemoryState | None, packing: Packing | None
    ) -> tuple[jax.Array, jax.Array, jax.Array, ConvCaches]:
        """``q, k, v`` ``[B, T, H, ·]``: ``self.qkv(x)``, each through ``SiLU(conv(·))``
        with ``config.short_conv``; and the convolutions' new caches."""
        caches = None if state is None else state.conv
        return conv_qkv(self.qkv, self.convs, x, caches, packing)

    def init_extra_state(self, batch: int) -> dict[str, Any]:
        return {"conv": self.empty_conv_caches(batch)}
