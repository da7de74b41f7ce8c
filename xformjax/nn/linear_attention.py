"""Linear attention with selectable feature maps, and its magnitude-aware variant.

``linear_attn`` ("Transformers are RNNs", Katharopoulos et al. 2020):

    q_t, k_t = φ(x_t W_q), φ(x_t W_k);  v_t = x_t W_v      (φ from ``config.feature_map``)
    S_t = S_{t-1} + k_t v_tᵀ,  z_t = z_{t-1} + k_t
    o_t = s·S_tᵀ q_t              or, with ``normalize``,   s·S_tᵀ q_t / (s·q_tᵀ z_t + ε)
    y_t = W_o · gate ⊙ RMSNorm(o_t)     (the RMSNorm only without a normaliser)

with ``s = F^{-1/2}`` (``F`` the width of φ's output) for ``identity``, ``elu+1`` and
``relu``, and ``s = 1`` for ``hedgehog`` and ``taylor`` (their maps are scaled
already), and ``ε = 1e-6``. With ``config.short_conv``, ``x W_q``, ``x W_k`` and
``x W_v`` each pass through ``SiLU(conv(·))`` (a short causal convolution, as the
delta-rule layers') before φ; its caches are the state's ``conv``.

``mala`` ("Rectifying Magnitude Neglect in Linear Attention", Fan et al. 2025): the
normalised form discards ‖q‖. MALA keeps it with weights that still sum to one,

    w_tj = β_t q_tᵀk_j − γ_t,   β_t = 1 + 1/(q_tᵀz_t + ε),   γ_t = q_tᵀz_t / n_t,

(``n_t`` = number of keys seen; the paper's bidirectional ``N`` becomes the causal
count), i.e. ``o_t = β_t S_tᵀq_t − γ_t Σ_{j≤t} v_j``: the larger ``q_tᵀz_t``, the
sharper the weights. The state (:class:`~xformjax.nn.states.LinearAttentionState`)
carries ``Σ v`` (``value_sum``) besides ``S`` and ``z``.

Packed documents (``segment_ids``): ``S`` and ``z`` restart through the reset gate of
:class:`~xformjax.nn.recurrent.MatrixMemoryMixer`; MALA's ``Σ v`` restarts at each
document too, and its count ``n_t`` is the token's position in its document plus one.

Hedgehog's distillation loss for this layer is :func:`hedgehog_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn.config import MixerConfig
from xformjax.nn.feature_maps import FeatureMap, hedgehog_distillation_loss
from xformjax.nn.mixer import QKV, OutputHead, position_of, register
from xformjax.nn.packing import Packing, token_positions_of
from xformjax.nn.recurrent import OpInputs, ShortConvMixer, document_scan
from xformjax.nn.states import LinearAttentionState

_EPS = 1e-6


@register("linear_attn")
class LinearAttention(ShortConvMixer):
    """Linear attention with feature map ``config.feature_map`` (see module docstring)."""

    state_type = LinearAttentionState

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        heads = config.num_heads
        self.feature_dim = config.feature_dim or config.key_dim
        self.qkv = QKV(config, key_dim=self.feature_dim, value_dim=config.value_dim, rngs=rngs)
        self.add_short_convs(rngs)
        self.feature_map = FeatureMap(
            config.feature_map, self.feature_dim, heads, rngs=rngs, param_dtype=config.params_dtype
        )
        unnormalised = not (config.normalize or config.mala)
        self.head = OutputHead(
            config,
            heads,
            config.value_dim,
            norm="rms" if unnormalised else None,
            gate="silu" if config.output_gate else None,
            rngs=rngs,
        )

    def memory_shape(self):
        extra = 1 if (self.config.normalize or self.config.mala) else 0
        return (self.config.num_heads, self.feature_map.output_dim, self.config.value_dim + extra)

    def init_extra_state(self, batch: int) -> dict[str, object]:
        extra = super().init_extra_state(batch)
        if self.config.mala:
            shape = (batch, self.config.num_heads, self.config.value_dim)
            extra["value_sum"] = jnp.zeros(shape, self.memory_dtype())
        return extra

    def prepare(
        self,
        x: jax.Array,
        state: LinearAttentionState | None,
        position: jax.Array,
        packing: Packing | None = None,
    ) -> OpInputs:
        q, k, v, caches = self.conv_streams(x, state, packing)
        q, k = self.feature_map(q), self.feature_map(k)
        scale = 1.0 if self.config.feature_map in ("hedgehog", "taylor") else None
        if not self.config.mala:
            return OpInputs(
                q,
                k,
                v,
                scale=scale,
                normalize=self.config.normalize,
                extra_state={"conv": caches},
            )
        # MALA subtracts two large, nearly equal terms: keep it in float32 or wider
        dtype = self.memory_dtype()
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        ones = jnp.ones(v.shape[:-1] + (1,), dtype)
        value_sum = _value_sums(v, state, packing)[:, -1]
        return OpInputs(
            q,
            k,
            jnp.concatenate([v, ones], -1),
            scale=1.0,
            extra_state={"conv": caches, "value_sum": value_sum},
        )

    def finish(
        self, o: jax.Array, x: jax.Array, inputs: OpInputs, state: LinearAttentionState | None
    ) -> jax.Array:
        if self.config.mala:
            o = self._mala(o, inputs.v[..., :-1], state, inputs.packing)
        return self.head(o, x)

    def _mala(
        self,
        o: jax.Array,
        v: jax.Array,
        state: LinearAttentionState | None,
        packing: Packing | None = None,
    ) -> jax.Array:
        """``β_t S_tᵀq_t − γ_t Σ_{j≤t} v_j`` from the op's output ``[S_tᵀq_t, q_tᵀz_t]``
        and the values ``v`` ``[B, T, H, V]`` (sums and counts per document)."""
        numerator, score = o[..., :-1], o[..., -1:]
        dtype = o.dtype
        value_sums = _value_sums(v.astype(dtype), state, packing)
        positions = token_positions_of(packing, position_of(state), v.shape[1])
        counts = jnp.broadcast_to(positions + 1, v.shape[:2]).astype(dtype)
        beta = 1.0 + 1.0 / (score + _EPS)
        gamma = score / counts[:, :, None, None]
        return beta * numerator - gamma * value_sums


def _value_sums(
    v: jax.Array, state: LinearAttentionState | None, packing: Packing | None
) -> jax.Array:
    """MALA's running ``Σ_{j≤t} v_j`` ``[B, T, H, V]`` over each token's document; the
    state's sum is carried into the tokens that continue it."""
    previous = None if state is None else state.value_sum
    if packing is None:
        sums = jnp.cumsum(v, axis=1)
        return sums if previous is None else sums + previous[:, None].astype(v.dtype)
    sums = document_scan(jnp.add, v, packing.starts)
    if previous is None:
        return sums
    continuing = (packing.document_index == 0)[:, :, None, None]
    return jnp.where(continuing, sums + previous[:, None].astype(v.dtype), sums)


def hedgehog_loss(layer: LinearAttention, x: jax.Array) -> jax.Array:
    """Hedgehog's softmax-mimicry loss for a ``linear_attn`` layer on input ``x``.

    The layer's own q/k projections give both the teacher (softmax attention) and the
    student (its feature map); see :func:`hedgehog_distillation_loss`.
    """
    q, k, _, _ = layer.conv_streams(x, None, None)
    return hedgehog_distillation_loss(q, k, layer.feature_map)
