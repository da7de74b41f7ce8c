"""The attention branch and the gated read-out that Titans' MAG and MAC share, and
:class:`AttentionTitans`, their common base class that holds both.

:class:`AttentionBranch`: the attention's projections with RoPE and the learned
persistent tokens ``p_1 … p_P`` (``[P, d_model]``) whose keys/values (no RoPE) every
query sees:

    q^a, k^a, v^a = RoPE(x W_q^a), RoPE(x W_k^a), x W_v^a;   k^p, v^p = p W_k^a, p W_v^a

:class:`GatedReadout`: the paper's ``o = y ⊗ M(x̃)`` with its stated choice for
``⊗`` — both branch outputs normalised with learnable vector-valued weights, then
a non-linearity (σ on the memory side), per head:

    y_t = W_o · merge(RMSNorm_a(a_t) ⊙ σ(RMSNorm_m(o_t)))

(``a_t`` ``[B, T, H, V]``: the attention branch's output; ``o_t``: the memory's.)
"""

from __future__ import annotations

import jax
from flax import nnx

from xformjax.nn import linear, norms
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import merge_heads, split_heads
from xformjax.nn.positional import apply_rope
from xformjax.nn.streams import STREAMS
from xformjax.nn.titans.base import Titans


class GatedReadout(nnx.Module):
    """MAG's and MAC's combination of the two branches, per head:
    ``y = W_o · merge(RMSNorm_a(attention) ⊙ σ(RMSNorm_m(memory)))``."""

    def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
        heads, value_dim = config.num_heads, config.value_dim
        self.attention_norm, self.memory_norm = (
            norms.make_norm(
                "rms",
                value_dim,
                eps=config.norm_eps,
                param_dtype=config.params_dtype,
                axis_name=None,
            )
            for _ in range(2)
        )
        self.out = linear.dense(
            config, heads * value_dim, config.d_model, axes=("heads", "embed"), rngs=rngs
        )

    def __call__(self, attention: jax.Array, memory: jax.Array, dtype) -> jax.Array:
        """``attention``, ``memory`` ``[B, T, H, V]`` → ``[B, T, d_model]`` in ``dtype``."""
        gated = self.attention_norm(attention) * jax.nn.sigmoid(self.memory_norm(memory))
        return self.out(merge_heads(gated).astype(dtype))


class AttentionBranch(nnx.Module):
    """Query/key/value projections (RoPE on q, k) and the learned persistent tokens
    ``[P, d_model]`` whose keys/values (no RoPE) every query sees."""

    def __init__(self, config: MixerConfig, *, rngs: nnx.Rngs):
        heads, d = config.num_heads, config.d_model
        widths = {
            "q": heads * config.key_dim,
            "k": heads * config.key_dim,
            "v": heads * config.value_dim,
        }
        self.config = config
        self.projections = nnx.Dict(
            {
                name: linear.dense(config, d, width, axes=("embed", "heads"), rngs=rngs)
                for name, width in widths.items()
            }
        )
        count = config.persistent_tokens
        self.persistent = (
            nnx.Param(
                jax.random.normal(rngs.params(), (count, d), config.params_dtype),
                out_sharding=(None, "embed"),
                eager_sharding=False,
            )
            if count
            else None
        )

    def __call__(
        self, x: jax.Array, positions: jax.Array, rope: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x`` ``[B, T, ·]`` → ``q, k, v`` ``[B, T, H, ·]`` (RoPE at ``positions``)."""
        heads, theta = self.config.num_heads, self.config.rope_theta
        q, k, v = (split_heads(self.projections[name](x), heads) for name in STREAMS)
        if rope:
            q = apply_rope(q, positions, base=theta)
            k = apply_rope(k, positions, base=theta)
        return q, k, v

    def persistent_kv(self, dtype) -> tuple[jax.Array, jax.Array] | tuple[None, None]:
        """``(k^p [P, H, K], v^p [P, H, V])`` or ``(None, None)`` when ``P = 0``."""
        if self.persistent is None:
            return None, None
        tokens = self.persistent[...].astype(self.config.compute_dtype)
        heads = self.config.num_heads
        k, v = (
            split_heads(self.projections[name](tokens), heads).astype(dtype) for name in ("k", "v")
        )
        return k, v


class AttentionTitans(Titans):
    """The base of MAG and MAC: the neural memory, an :class:`AttentionBranch` beside
    it (``self.attention``), and the :class:`GatedReadout` of the two as the head."""

    def __init__(
        self, config: MixerConfig, *, layer_index: int = 0, num_layers: int = 1, rngs: nnx.Rngs
    ):
        super().__init__(config, layer_index=layer_index, num_layers=num_layers, rngs=rngs)
        self.attention = AttentionBranch(config, rngs=rngs)

    def build_head(self, config: MixerConfig, rngs: nnx.Rngs) -> nnx.Module:
        return GatedReadout(config, rngs=rngs)
