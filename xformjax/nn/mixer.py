"""The mixer interface, the registry, and the pieces every family shares.

A mixer is an ``nnx.Module`` built as ``Mixer(config, layer_index=0, num_layers=1,
rngs=...)`` with

    y, state = mixer(x, state=None, mode=None, segment_ids=None, positions=None)
                                                    # x, y: [B, T, d_model]

- ``state=None``: a fresh sequence. The returned ``state`` continues it: feeding
  the next tokens with it equals running the concatenated sequence at once.
- ``mixer.init_state(batch, max_len)`` builds the empty state explicitly, with
  fixed shapes (what a jitted decoding loop carries); ``max_len`` is only used by
  mixers whose state grows with the sequence (the softmax KV cache).
- ``mode``: ``"chunk"`` (training), ``"parallel"`` (the quadratic form, where the
  family has one) or ``"recurrent"`` (token by token); ``None`` picks
  ``config.mode``, or ``"recurrent"`` for a single token.

- ``segment_ids``, ``positions``: int ``[B, T]``, documents packed in each row
  (:mod:`xformjax.nn.packing`): every mixer keeps them apart — each document gets
  the outputs and gradients it gets alone (exactly, up to float rounding) — and its
  positional encoding
  rotates by ``positions`` (derived from the segments when not given).

States are typed pytrees (frozen ``flax.struct`` dataclasses, one class per kind
of layer, all in :mod:`xformjax.nn.states`): fields are read as attributes
(``state.memory``) and changed with ``state.replace(...)``. Every state derives from
:class:`~xformjax.nn.states.MixerState` and holds ``position``, the number of
tokens consumed so far (int32 scalar), which positional encodings use. A mixer
with an auxiliary training loss (Mixture-of-Memories' load balance) carries it as
``state.aux_loss`` (a scalar); the trainer adds it to the loss with
``train.aux_loss_weight``.

Every mixer class registers itself in :data:`MIXERS` under a short name with
:func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear, norms
from xformjax.nn.config import MODES, MixerConfig
from xformjax.nn.packing import Packing, make_packing
from xformjax.nn.states import MixerState
from xformjax.ops.common.validation import Mode

#: the type of a mixer's state (each mixer returns its own subclass).
State = MixerState

MIXERS: dict[str, type[Mixer]] = {}

M = TypeVar("M", bound="Mixer")


def register(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: record a mixer in :data:`MIXERS` under ``name``."""

    def decorate(cls: type[M]) -> type[M]:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already taken by {MIXERS[name]}")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return decorate


def get_mixer(name: str) -> type[Mixer]:
    """The mixer class registered as ``name`` (a clear error for unknown names)."""
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(MIXERS)}") from None


class Mixer(nnx.Module):
    """Base class: mode resolution and input checks; subclasses do the math."""

    name: ClassVar[str] = ""
    #: modes this family implements (``"parallel"`` is absent where it has none).
    modes: ClassVar[tuple[Mode, ...]] = MODES
    #: whether ``config.short_conv`` gives this layer short convolutions on q, k, v
    #: (layers without the option ignore it, as they ignore ``conv_size``).
    short_conv_option: ClassVar[bool] = False

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        del rngs
        if not isinstance(config, MixerConfig):
            raise TypeError(
                f"{type(self).__name__} takes a MixerConfig; got {type(config).__name__}"
            )
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"layer_index={layer_index} must lie in [0, {num_layers})")
        self.config = config
        self.layer_index, self.num_layers = layer_index, num_layers

    def resolve_mode(self, mode: Mode | None, length: int) -> Mode:
        if mode is None:
            mode = "recurrent" if length == 1 else self.config.mode
            if mode not in self.modes:
                mode = "chunk"
        if mode not in self.modes:
            raise ValueError(
                f"{type(self).__name__} ({self.name!r}) supports modes "
                f"{self.modes}; got mode={mode!r}"
            )
        return mode

    def check_input(self, x: jax.Array) -> None:
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"{type(self).__name__}: `x` must be [B, T, d_model="
                f"{self.config.d_model}]; got shape {tuple(x.shape)}"
            )
        if x.shape[1] == 0:
            raise ValueError(f"{type(self).__name__}: `x` has no tokens (T=0)")

    def packing(
        self,
        x: jax.Array,
        state: State | None,
        segment_ids: jax.Array | None,
        positions: jax.Array | None,
    ) -> Packing | None:
        """The checked :class:`~xformjax.nn.packing.Packing` of this call (``None``
        when neither ``segment_ids`` nor ``positions`` is given)."""
        batch, length = x.shape[:2]
        return make_packing(
            type(self).__name__, segment_ids, positions, batch, length, position_of(state)
        )

    def init_state(self, batch: int, max_len: int | None = None) -> State:
        """The empty state of ``batch`` sequences (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must define init_state")

    def sequence_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token spent mixing along the sequence (beyond the
        projections, which :func:`xformjax.models.model_cost` counts from the
        weights), averaged over a ``seq_len``-token sequence."""
        raise NotImplementedError(f"{type(self).__name__} must define sequence_flops")

    def __call__(
        self,
        x: jax.Array,
        *,
        state: State | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, State]:
        raise NotImplementedError(f"{type(self).__name__} must define __call__")


def position_of(state: State | None) -> jax.Array:
    """Tokens consumed so far (0 for a fresh sequence)."""
    return jnp.zeros((), jnp.int32) if state is None else state.position


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, T, H·D]`` → ``[B, T, H, D]``."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """``[B, T, H, D]`` → ``[B, T, H·D]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class OutputHead(nnx.Module):
    """``y = W_o · merge(gate(x) ⊙ norm(o))``: the read-out shared by the families.

    ``norm`` normalises each head's ``V`` features (``"rms"``, ``"layer"`` — the
    GroupNorm of RetNet —, ``"srms"`` or ``None``); ``gate`` is ``"silu"``,
    ``"sigmoid"`` or ``None`` and is computed from the mixer's input ``x``.
    """

    def __init__(
        self,
        config: MixerConfig,
        num_heads: int,
        value_dim: int,
        *,
        norm: str | None,
        gate: str | None,
        rngs: nnx.Rngs,
    ):
        width = num_heads * value_dim
        self.norm = (
            norms.make_norm(
                norm,
                value_dim,
                eps=config.norm_eps,
                param_dtype=config.params_dtype,
                axis_name=None,
            )
            if norm
            else None
        )
        self.gate_kind = gate
        self.gate = (
            linear.dense(config, config.d_model, width, axes=("embed", "heads"), rngs=rngs)
            if gate
            else None
        )
        self.out = linear.dense(config, width, config.d_model, axes=("heads", "embed"), rngs=rngs)

    def __call__(self, o: jax.Array, x: jax.Array) -> jax.Array:
        if self.norm is not None:
            o = self.norm(o)
        o = merge_heads(o).astype(x.dtype)
        if self.gate is not None:
            gate = self.gate(x)
            o = o * (jax.nn.silu(gate) if self.gate_kind == "silu" else jax.nn.sigmoid(gate))
        return self.out(o)


class QKV(nnx.Module):
    """Query, key and value projections ``[B, T, d] → 3 × [B, T, H, ·]``.

    ``q, k`` have ``key_dim`` features per head, ``v`` ``value_dim``.
    """

    def __init__(self, config: MixerConfig, *, key_dim: int, value_dim: int, rngs: nnx.Rngs):
        heads, d = config.num_heads, config.d_model
        self.num_heads = heads
        self.q = linear.dense(config, d, heads * key_dim, axes=("embed", "heads"), rngs=rngs)
        self.k = linear.dense(config, d, heads * key_dim, axes=("embed", "heads"), rngs=rngs)
        self.v = linear.dense(config, d, heads * value_dim, axes=("embed", "heads"), rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.q, self.k, self.v))
        return q, k, v
