"""TransNormer ("The Devil in Linear Transformer", Qin et al. 2022).

Two attentions, the first for early layers and the second for the rest:

- DiagAttention: softmax attention restricted to non-overlapping blocks of
  ``diag_block_size`` tokens (causal inside the block) — local, so attention is not
  diluted over the whole sequence;
- NormAttention: linear attention without the denominator (its unbounded gradients
  are the problem the paper fixes), normalised at the output instead:
  ``S_t = S_{t-1} + φ(k_t) v_tᵀ``, ``o_t = RMSNorm(s·S_tᵀ φ(q_t))`` with φ =
  ``config.feature_map`` and ``s = K^{-1/2}`` for every feature map (the scale only
  matters through the RMSNorm's ε).

The output is ``W_o · o`` without a gate: TransNormer ignores ``config.output_gate``.

``config.transnormer_attention="auto"`` uses DiagAttention in the first half of the
layers (``layer_index < num_layers // 2``, as the paper's 50/50 split) and
NormAttention after; ``"diag"`` / ``"norm"`` force one.

DiagAttention's state is the current block's keys and values ``[B, block, H, D]``
(a :class:`~xformjax.nn.states.KVCacheState`); NormAttention's is its memory (a
:class:`~xformjax.nn.states.MemoryState`).

Packed documents (``segment_ids``): NormAttention's memory restarts at each document
(the reset gate of :class:`~xformjax.nn.recurrent.MatrixMemoryMixer`). DiagAttention's
blocks are counted from each document's first token, as alone: a token attends to the
earlier tokens of its block ``(document, position // block)``. Such a block is
contiguous and at most ``block`` long, so it lies within two consecutive aligned tiles
of the row: each tile's queries attend to the keys of their own and the previous tile,
masked. Token by token, slot ``position % block`` of each row's buffer is written and
the slots up to it are read. A packed call's state holds the last document's current
block at those slots, and ``position`` counts the tokens consumed: to continue that
document later, pass its ``positions``.
"""

from __future__ import annotations

from typing import ClassVar, cast

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax import ops
from xformjax.nn.config import MixerConfig
from xformjax.nn.feature_maps import FeatureMap
from xformjax.nn.mixer import QKV, OutputHead, position_of, register
from xformjax.nn.packing import Packing, token_positions_of
from xformjax.nn.recurrent import MatrixMemoryMixer, OpInputs
from xformjax.nn.states import KVCacheState, MemoryState
from xformjax.ops.common.validation import Mode


def _uses_diag(config: MixerConfig, layer_index: int, num_layers: int) -> bool:
    if config.transnormer_attention == "auto":
        return layer_index < num_layers // 2
    return config.transnormer_attention == "diag"


@register("transnormer")
class TransNormer(MatrixMemoryMixer):
    """NormAttention or DiagAttention by depth (see the module docstring)."""

    modes: ClassVar[tuple[str, ...]] = ("chunk", "parallel", "recurrent")

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        self.diag = _uses_diag(config, layer_index, num_layers)
        heads, dim = config.num_heads, config.key_dim
        self.qkv = QKV(config, key_dim=dim, value_dim=config.value_dim, rngs=rngs)
        self.feature_map = FeatureMap(
            config.feature_map, dim, heads, rngs=rngs, param_dtype=config.params_dtype
        )
        self.head = OutputHead(
            config, heads, config.value_dim, norm=None if self.diag else "rms", gate=None, rngs=rngs
        )

    # NormAttention: the MatrixMemoryMixer path.
    def memory_shape(self):
        return (self.config.num_heads, self.feature_map.output_dim, self.config.value_dim)

    def prepare(self, x, state, position, packing=None):
        q, k, v = self.qkv(x)
        return OpInputs(self.feature_map(q), self.feature_map(k), v)

    def sequence_flops(self, seq_len: int) -> float:
        if not self.diag:
            return super().sequence_flops(seq_len)
        visible = (min(self.config.diag_block_size, seq_len) + 1) / 2
        return 2.0 * self.config.num_heads * (self.config.key_dim + self.config.value_dim) * visible

    # DiagAttention.
    def init_state(self, batch: int, max_len: int | None = None) -> MemoryState | KVCacheState:
        if not self.diag:
            return super().init_state(batch, max_len)
        return self._empty_block(batch)

    def _empty_block(self, batch: int) -> KVCacheState:
        """DiagAttention's empty block buffer."""
        shape = (batch, self.config.diag_block_size, self.config.num_heads)
        dtype = self.config.compute_dtype
        return KVCacheState(
            k=jnp.zeros(shape + (self.config.key_dim,), dtype),
            v=jnp.zeros(shape + (self.config.value_dim,), dtype),
            position=jnp.zeros((), jnp.int32),
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        state: MemoryState | KVCacheState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, MemoryState | KVCacheState]:
        """``x`` ``[B, T, d_model]`` → ``(y, state)``; ``segment_ids``, ``positions``:
        documents packed in the rows (module docstring)."""
        if not self.diag:
            return super().__call__(
                x,
                state=cast(MemoryState | None, state),
                mode=mode,
                segment_ids=segment_ids,
                positions=positions,
            )
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        packing = self.packing(x, state, segment_ids, positions)
        q, k, v = self.qkv(x)
        if mode == "recurrent" or state is not None:
            block_state = cast(KVCacheState | None, state)
            o, new_state = self._diag_recurrent(q, k, v, block_state, packing)
        elif packing is not None:
            o, new_state = self._diag_packed(q, k, v, packing)
        else:
            o, new_state = self._diag_blocks(q, k, v, mode)
        return self.head(o, x), new_state

    def _diag_blocks(self, q, k, v, mode):
        """Fresh sequence: fold the blocks into the batch and attend causally in each."""
        batch, length = q.shape[:2]
        block = self.config.diag_block_size
        num_blocks = -(-length // block)
        pad = num_blocks * block - length

        def blocks(a):
            a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
            return a.reshape(batch * num_blocks, block, *a.shape[2:])

        o, _ = ops.softmax_attention(
            blocks(q), blocks(k), blocks(v), mode=mode, chunk_size=self.config.chunk_size
        )
        o = o.reshape(batch, num_blocks * block, *o.shape[2:])[:, :length]
        last = lambda a: blocks(a).reshape(batch, num_blocks, block, *a.shape[2:])[:, -1]
        keep = (length - 1) % block + 1  # tokens of the last block that are real
        slots = (jnp.arange(block) < keep)[None, :, None, None]
        state = KVCacheState(
            k=jnp.where(slots, last(k), 0),
            v=jnp.where(slots, last(v), 0),
            position=jnp.asarray(length, jnp.int32),
        )
        return o, state

    def _diag_packed(self, q, k, v, packing: Packing):
        """Fresh packed rows: each aligned tile of ``block`` queries attends to the keys
        of its own and the previous tile that share its block ``(document, position //
        block)`` and come no later (module docstring)."""
        batch, length = q.shape[:2]
        block = self.config.diag_block_size
        num_tiles = -(-length // block)
        pad = num_tiles * block - length
        dtype = jnp.promote_types(q.dtype, jnp.float32)

        def tiles(a, fill=0):  # [B, T, ...] → [B, n, block, ...]
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
            a = jnp.pad(a, widths, constant_values=fill)
            return a.reshape(batch, num_tiles, block, *a.shape[2:])

        def with_previous(a, fill=0):  # [B, n, block, ...] → [B, n, 2·block, ...]
            before = jnp.concatenate([jnp.full_like(a[:, :1], fill), a[:, :-1]], axis=1)
            return jnp.concatenate([before, a], axis=2)

        # padding the row to whole tiles adds a block of its own (document −1) that no
        # real token sees; the keys before the first tile are nobody's (document −2)
        rows = jnp.arange(num_tiles * block).reshape(1, num_tiles, block)
        document = tiles(packing.document_index, -1)
        index = tiles(packing.positions // block, -1)
        visible = (
            (document[..., :, None] == with_previous(document, -2)[..., None, :])
            & (index[..., :, None] == with_previous(index, -1)[..., None, :])
            & (with_previous(rows, -1)[..., None, :] <= rows[..., :, None])
        )  # [B, n, block (queries), 2·block (keys)]
        qt = tiles(q.astype(dtype)) * q.shape[-1] ** -0.5
        kt, vt = (with_previous(tiles(a.astype(dtype))) for a in (k, v))
        logits = jnp.einsum("bnihd,bnjhd->bnhij", qt, kt)
        weights = jax.nn.softmax(jnp.where(visible[:, :, None], logits, -jnp.inf), axis=-1)
        o = jnp.einsum("bnhij,bnjhv->bnihv", weights, vt)
        o = o.reshape(batch, num_tiles * block, *o.shape[3:])[:, :length].astype(q.dtype)
        # the last document's current block: slot s ≤ r holds token T − 1 − r + s
        last = packing.positions[:, -1] % block  # r, [B]
        slots = jnp.arange(block)
        filled = (slots[None] <= last[:, None])[..., None, None]
        source = jnp.clip(length - 1 - last[:, None] + slots[None], 0, length - 1)
        gather = lambda a: jnp.take_along_axis(a, source[:, :, None, None], axis=1)
        state = KVCacheState(
            k=jnp.where(filled, gather(k), 0),
            v=jnp.where(filled, gather(v), 0),
            position=jnp.asarray(length, jnp.int32),
        )
        return o, state

    def _diag_recurrent(self, q, k, v, state: KVCacheState | None, packing: Packing | None):
        """Token by token: write slot ``position % block`` of each row's block buffer and
        attend to the slots up to it."""
        if state is None:
            state = self._empty_block(q.shape[0])
        batch, length = q.shape[:2]
        block = self.config.diag_block_size
        positions = token_positions_of(packing, position_of(state), length)
        slots = jnp.broadcast_to(positions, (batch, length)) % block  # [B, T]
        dtype = jnp.promote_types(q.dtype, jnp.float32)
        scale = q.shape[-1] ** -0.5

        def step(carry, token):
            cache_k, cache_v = carry
            q_t, k_t, v_t, slot = token  # [B, H, D] and [B]
            here = (jnp.arange(block)[None] == slot[:, None])[..., None, None]  # [B, L, 1, 1]
            cache_k = jnp.where(here, k_t[:, None].astype(cache_k.dtype), cache_k)
            cache_v = jnp.where(here, v_t[:, None].astype(cache_v.dtype), cache_v)
            filled = jnp.arange(block)[None] <= slot[:, None]  # [B, L]
            logits = jnp.einsum("bhd,blhd->bhl", q_t.astype(dtype) * scale, cache_k.astype(dtype))
            logits = jnp.where(filled[:, None], logits, -jnp.inf)
            weights = jax.nn.softmax(logits, axis=-1)
            o_t = jnp.einsum("bhl,blhv->bhv", weights, cache_v.astype(dtype))
            return (cache_k, cache_v), o_t.astype(q.dtype)

        tokens = (*(jnp.moveaxis(a, 1, 0) for a in (q, k, v)), slots.T)
        (cache_k, cache_v), o = jax.lax.scan(step, (state.k, state.v), tokens)
        position = position_of(state) + length
        return jnp.moveaxis(o, 0, 1), KVCacheState(k=cache_k, v=cache_v, position=position)
