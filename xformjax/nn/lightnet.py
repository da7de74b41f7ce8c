"""LightNet's additive linear recurrence ("You Only Scan Once: Efficient
Multi-dimension Sequential Modeling with LightNet", Qin et al. 2024).

    S_t = Σ_{j≤t} exp(k_j) v_jᵀ / z_t,   z_t = Σ_{j≤t} exp(k_j)     (per key channel)
    o_t = S_tᵀ q_t / √K,   q_t = SiLU(x_t W_q),  k_t = x_t W_k,  v_t = x_t W_v
    y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))

The normalised sum is a gated linear recurrence with a data-dependent per-channel
decay: ``S_t = diag(z_{t-1}/z_t) S_{t-1} + (exp(k_t)/z_t) v_tᵀ``. In log space
``log z_t = logaddexp(log z_{t-1}, k_t)`` (a ``logcumsumexp``), the gate is
``log z_{t-1} − log z_t ≤ 0`` and the key ``exp(k_t − log z_t) ∈ (0, 1]`` — no
overflow at any length. The state (:class:`~xformjax.nn.states.LightNetState`)
carries ``log z`` besides ``S``.

Packed documents (``segment_ids``): ``log z`` restarts at each document (a
log-sum-exp per document; a document's first token gets the empty prefix's gate, as
alone), and ``S`` through the reset gate of
:class:`~xformjax.nn.recurrent.MatrixMemoryMixer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import register
from xformjax.nn.packing import Packing
from xformjax.nn.recurrent import MatrixMemoryMixer, OpInputs, document_scan
from xformjax.nn.states import LightNetState

#: ``log z`` of an empty prefix (z = 0), kept finite so no inf reaches a gradient.
EMPTY_LOG = -1e30
#: floor of the log gate: the first token's ``log(0 / z)``, harmless since S = 0.
MIN_LOG_GATE = -60.0


def additive_gates(
    k: jax.Array, log_z: jax.Array, packing: Packing | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``k`` ``[B, T, H, K]``, ``log z`` of the prefix ``[B, H, K]`` →
    (normalised keys, log gates, final ``log z``). With ``packing``, ``log z`` is
    summed per document: the prefix's only for the tokens that continue it, and a
    document's first token sees the empty prefix."""
    if packing is None:
        log_z_t = jnp.logaddexp(log_z[:, None], jax.lax.cumlogsumexp(k, axis=1))
    else:
        own = document_scan(jnp.logaddexp, k, packing.starts)
        continuing = (packing.document_index == 0)[:, :, None, None]
        log_z_t = jnp.where(continuing, jnp.logaddexp(log_z[:, None], own), own)
    previous = jnp.concatenate([log_z[:, None], log_z_t[:, :-1]], axis=1)
    if packing is not None:
        previous = jnp.where(packing.starts[:, :, None, None], EMPTY_LOG, previous)
    log_gate = jnp.maximum(previous - log_z_t, MIN_LOG_GATE)
    return jnp.exp(k - log_z_t), log_gate, log_z_t[:, -1]


@register("lightnet")
class LightNet(MatrixMemoryMixer):
    """LightNet's normalised additive recurrence (see the module docstring)."""

    state_type = LightNetState

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        self.standard_layers(rngs, norm="rms")

    def init_extra_state(self, batch: int) -> dict[str, jax.Array]:
        shape = (batch, self.config.num_heads, self.config.key_dim)
        return {"log_z": jnp.full(shape, EMPTY_LOG, self.memory_dtype())}

    def prepare(
        self,
        x: jax.Array,
        state: LightNetState | None,
        position: jax.Array,
        packing: Packing | None = None,
    ) -> OpInputs:
        q, k, v = self.qkv(x)
        dtype = self.memory_dtype()
        log_z = self.init_extra_state(x.shape[0])["log_z"] if state is None else state.log_z
        keys, log_gate, final_log_z = additive_gates(k.astype(dtype), log_z, packing)
        return OpInputs(
            jax.nn.silu(q), keys.astype(k.dtype), v, gk=log_gate, extra_state={"log_z": final_log_z}
        )
