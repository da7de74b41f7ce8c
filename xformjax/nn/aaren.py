"""Aaren ("Attention as an RNN", Feng et al. 2024): softmax attention of a learned
query, computed as a many-to-many RNN.

Each head has a learned query ``q`` ``[K]`` that is the same at every step; keys
and values come from the input::

    k_t, v_t = x_t W_k, x_t W_v                        (per head)
    s_t = q·k_t / √K
    m_t = max(m_{t-1}, s_t)
    u_t = u_{t-1} · exp(m_{t-1} − m_t) + v_t · exp(s_t − m_t)
    w_t = w_{t-1} · exp(m_{t-1} − m_t) +       exp(s_t − m_t)
    o_t = u_t / w_t = Σ_{i≤t} softmax_i(s) v_i         (causal attention of q over x_{1..t})
    y_t = W_o · (SiLU(x_t W_g) ⊙ o_t)                  (the gate if ``config.output_gate``)

Because the query does not change with t, the scores are per-token scalars and the
summary ``(m, u, w)`` composes associatively: ``"parallel"`` is one prefix scan,
``"chunk"`` prefix scans within chunks with a carry, ``"recurrent"`` the RNN (see
:func:`xformjax.ops.aaren`). The state is that summary — a
:class:`~xformjax.nn.states.SoftmaxSummaryState`: ``max`` ``[B, H]``, ``numerator``
``[B, H, V]``, ``denominator`` ``[B, H]`` and ``position`` — a constant size, where
softmax attention keeps a KV cache; the empty state has ``max = −inf``.

Packed documents (``segment_ids`` ``[B, T]``; :mod:`xformjax.nn.packing`): the
summary restarts from empty where each document begins, in every form (the op's
``segment_ids``); Aaren has no positional encoding, so ``positions`` are not used.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import Mixer, OutputHead, position_of, register, split_heads
from xformjax.nn.states import SoftmaxSummaryState
from xformjax.ops.aaren import AarenState, aaren, empty_state
from xformjax.ops.common.validation import Mode


@register("aaren")
class Aaren(Mixer):
    """Aaren: a learned query per head attending causally over the sequence
    (see the module docstring)."""

    modes: ClassVar[tuple[str, ...]] = ("chunk", "parallel", "recurrent")

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads, d = config.num_heads, config.d_model
        query = jax.random.normal(rngs.params(), (heads, config.key_dim), config.params_dtype)
        self.query = nnx.Param(query, out_sharding=("heads", None), eager_sharding=False)
        self.k_proj = linear.dense(
            config, d, heads * config.key_dim, axes=("embed", "heads"), rngs=rngs
        )
        self.v_proj = linear.dense(
            config, d, heads * config.value_dim, axes=("embed", "heads"), rngs=rngs
        )
        self.head = OutputHead(
            config,
            heads,
            config.value_dim,
            norm=None,
            gate="silu" if config.output_gate else None,
            rngs=rngs,
        )

    def state_dtype(self):
        return jnp.promote_types(self.config.compute_dtype, jnp.float32)

    def init_state(self, batch: int, max_len: int | None = None) -> SoftmaxSummaryState:
        del max_len  # the summary does not grow with the sequence
        summary = empty_state(
            batch, self.config.num_heads, self.config.value_dim, self.state_dtype()
        )
        return self._layer_state(summary, jnp.zeros((), jnp.int32))

    @staticmethod
    def _layer_state(summary: AarenState, position: jax.Array) -> SoftmaxSummaryState:
        return SoftmaxSummaryState(
            max=summary.max,
            numerator=summary.numerator,
            denominator=summary.denominator,
            position=position,
        )

    def sequence_flops(self, seq_len: int) -> float:
        """Per token and head: the score ``q·k`` (``2K``), about two applications of
        ``⊕`` in the prefix scan (rescaling and adding ``u``: ``3V``, plus a few
        scalars each) and the read-out ``u/w`` (``V``): independent of ``seq_len``."""
        del seq_len
        key_dim, value_dim = self.config.key_dim, self.config.value_dim
        return float(self.config.num_heads * (2 * key_dim + 2 * (3 * value_dim + 6) + value_dim))

    def __call__(
        self,
        x: jax.Array,
        *,
        state: SoftmaxSummaryState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, SoftmaxSummaryState]:
        """``x`` ``[B, T, d_model]`` → ``(y [B, T, d_model], state)``."""
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        packing = self.packing(x, state, segment_ids, positions)
        position = position_of(state)
        heads = self.config.num_heads
        k = split_heads(self.k_proj(x), heads)
        v = split_heads(self.v_proj(x), heads)
        query = self.query[...].astype(self.config.compute_dtype)
        initial = (
            None if state is None else AarenState(state.max, state.numerator, state.denominator)
        )
        o, final = aaren(
            query,
            k,
            v,
            initial_state=initial,
            output_final_state=True,
            mode=mode,
            chunk_size=self.config.chunk_size,
            segment_ids=None if packing is None else packing.segment_ids,
        )
        assert final is not None  # output_final_state=True
        y = self.head(o, x)
        final = AarenState(*(value.astype(self.state_dtype()) for value in final))
        return y, self._layer_state(final, position + x.shape[1])
