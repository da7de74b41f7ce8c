"""A diagonal gated linear RNN (Mamba/LRU/HGRN-style state, one number per channel).

    a_t = σ(x_t W_a + b_a)                    transitions in (0, 1)
        = 2σ(x_t W_a + b_a) − 1               with ``allow_neg_eigval``: in (−1, 1)
    h_t = a_t ⊙ h_{t-1} + x_t W_b             h_t: [H, V] (a vector per head)
    o_t = h_t
    y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

The "diagonal" model of "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues", Grazzi et al. 2025: a diagonal transition with eigenvalues in
``[0, 1]`` cannot count modulo 2 with finite precision, one in ``[−1, 1]`` can
(``a = −1`` flips the sign of a channel on every ``1`` bit). The recurrence is
:func:`xformjax.ops.diagonal_recurrence`; ``b_a`` starts at 2 so that the layer
begins with long memory (``σ(2) ≈ 0.88``).

Packed documents (``segment_ids``): ``a_t = 0`` at each document's first token, so
``h`` restarts there from the empty state in every form (the products of transitions
the forms build across a boundary are then exactly 0).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax import ops
from xformjax.nn import linear
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import Mixer, OutputHead, position_of, register, split_heads
from xformjax.nn.states import MemoryState
from xformjax.ops.common.validation import Mode

TRANSITION_BIAS = 2.0


@register("diag_rnn")
class DiagonalRNN(Mixer):
    """Element-wise gated linear RNN (see the module docstring)."""

    modes: ClassVar[tuple[str, ...]] = ("chunk", "parallel", "recurrent")

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        width = config.num_heads * config.value_dim
        self.transition = linear.dense(
            config,
            config.d_model,
            width,
            axes=("embed", "heads"),
            use_bias=True,
            bias_init=TRANSITION_BIAS,
            rngs=rngs,
            float_output=True,  # the transitions σ(·) are computed in float32
        )
        self.inputs = linear.dense(
            config, config.d_model, width, axes=("embed", "heads"), rngs=rngs
        )
        self.head = OutputHead(
            config,
            config.num_heads,
            config.value_dim,
            norm="rms",
            gate="silu" if config.output_gate else None,
            rngs=rngs,
        )

    def transitions(self, x: jax.Array) -> jax.Array:
        """``a_t`` ``[B, T, H, V]``, in ``(0, 1)`` or ``(−1, 1)``."""
        gate = jax.nn.sigmoid(self.transition(x).astype(self.state_dtype()))
        a = 2 * gate - 1 if self.config.allow_neg_eigval else gate
        return split_heads(a, self.config.num_heads)

    def state_dtype(self):
        return jnp.promote_types(self.config.compute_dtype, jnp.float32)

    def init_state(self, batch: int, max_len: int | None = None) -> MemoryState:
        del max_len
        shape = (batch, self.config.num_heads, self.config.value_dim)
        return MemoryState(
            memory=jnp.zeros(shape, self.state_dtype()), position=jnp.zeros((), jnp.int32)
        )

    def sequence_flops(self, seq_len: int) -> float:
        del seq_len
        return 2.0 * self.config.num_heads * self.config.value_dim

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
        ``positions``: documents packed in the rows (module docstring)."""
        self.check_input(x)
        mode = self.resolve_mode(mode, x.shape[1])
        position = position_of(state)
        packing = self.packing(x, state, segment_ids, positions)
        b = split_heads(self.inputs(x), self.config.num_heads)
        a = self.transitions(x)
        if packing is not None:
            a = jnp.where(packing.starts[:, :, None, None], jnp.zeros((), a.dtype), a)
        h, final = ops.diagonal_recurrence(
            a,
            b,
            initial_state=None if state is None else state.memory,
            output_final_state=True,
            mode=mode,
            chunk_size=self.config.chunk_size,
        )
        assert final is not None  # output_final_state=True
        y = self.head(h.astype(x.dtype), x)
        return y, MemoryState(
            memory=final.astype(self.state_dtype()), position=position + x.shape[1]
        )
