"""Channel mixers: gated MLPs.

swiglu:  y = W_2 (SiLU(x W_1) ⊙ x W_3)      ("GLU Variants Improve Transformer")
glu:     y = W_2 (σ(x W_1) ⊙ x W_3)
gelu:    y = W_2 GELU(x W_1)
"""

from __future__ import annotations

import jax
from flax import nnx

from xformjax.nn import linear
from xformjax.nn.config import MixerConfig

MLP_KINDS = ("swiglu", "glu", "gelu")


class MLP(nnx.Module):
    """A gated (or plain GELU) MLP ``d_model → hidden → d_model``."""

    def __init__(self, config: MixerConfig, hidden: int, *, kind: str = "swiglu", rngs: nnx.Rngs):
        if kind not in MLP_KINDS:
            raise ValueError(f"unknown MLP kind {kind!r}; expected one of {MLP_KINDS}")
        d = config.d_model
        self.kind = kind
        self.up = linear.dense(config, d, hidden, axes=("embed", "mlp"), rngs=rngs)
        self.gate = (
            linear.dense(config, d, hidden, axes=("embed", "mlp"), rngs=rngs)
            if kind != "gelu"
            else None
        )
        self.down = linear.dense(config, hidden, d, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        if self.kind == "gelu":
            h = jax.nn.gelu(h)
        else:
            assert self.gate is not None  # built for the gated kinds
            gate = self.gate(x)
            h = h * (jax.nn.silu(gate) if self.kind == "swiglu" else jax.nn.sigmoid(gate))
        return self.down(h)
