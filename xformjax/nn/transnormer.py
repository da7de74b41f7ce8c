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

    def prepare(self, x, state, position):
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
    ) -> tuple[jax.Array, MemoryState | KVCacheState]:
        """``x`` ``[B, T, d_model]`` → ``(y, state)``."""
        if not self.diag:
            return super().__call__(x, state=cast(MemoryState | None, state), mode=mode)
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        q, k, v = self.qkv(x)
        if mode == "recurrent" or state is not None:
            o, new_state = self._diag_recurrent(q, k, v, cast(KVCacheState | None, state))
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

    def _diag_recurrent(self, q, k, v, state: KVCacheState | None):
        """Token by token: write into the block buffer, attend to its filled slots."""
        if state is None:
            state = self._empty_block(q.shape[0])
        block = self.config.diag_block_size

        def step(carry, token):
            cache_k, cache_v, position = carry
            q_t, k_t, v_t = token
            slot = position % block
            cache_k = jax.lax.dynamic_update_slice_in_dim(
                cache_k, k_t[:, None].astype(cache_k.dtype), slot, axis=1
            )
            cache_v = jax.lax.dynamic_update_slice_in_dim(
                cache_v, v_t[:, None].astype(cache_v.dtype), slot, axis=1
            )
            o_t, _ = ops.softmax_attention(
                q_t[:, None], cache_k, cache_v, mode="recurrent", kv_length=slot + 1
            )
            return (cache_k, cache_v, position + 1), o_t[:, 0]

        tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v))
        carry = (state.k, state.v, position_of(state))
        (cache_k, cache_v, position), o = jax.lax.scan(step, carry, tokens)
        return jnp.moveaxis(o, 0, 1), KVCacheState(k=cache_k, v=cache_v, position=position)
