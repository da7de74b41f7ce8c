"""The hybrid decoder-only language model.

    h_0 = s · E[tokens]       (s = embed_scale, √d_model by default; E ~ N(0, 1/d_model))
    h_l = h_{l-1} + N'(mixer_l(N(h_{l-1})))         (N' = identity for Pre-LN, a norm
    h_l = h_l + N'(MLP_l(N(h_l)))                     for Peri-LN)
    logits = N(h_L) Eᵀ        (or W_out when embeddings are not tied)

The default initialisation (Gemma's convention) starts the residual stream at
unit scale per coordinate, the scale of every block's output (the projections are
fan-in scaled), and the tied logits at unit scale; see :class:`LMConfig`.

``model(tokens, cache=None, segment_ids=None, positions=None) -> (logits, cache)``:
``segment_ids``/``positions`` ``[B, T]`` describe documents packed into each row
(1, 2, … per document, 0 for padding; positions restarting at each document, derived
from the segments when not given), and every layer keeps the documents apart: each gets
the logits it gets alone (:mod:`xformjax.nn.packing`). ``cache`` is the list of the
mixers' states (typed pytrees, :mod:`xformjax.nn.states`). Without a cache the model
runs a fresh sequence in chunk mode and returns the cache that continues it;
:meth:`LanguageModel.init_cache` allocates an empty one with fixed shapes for
decoding (see :func:`xformjax.models.generate`).

Under a mesh (``jax.set_mesh``) the residual stream is constrained to the logical
axes ``("batch", "length", None)`` between blocks (:mod:`xformjax.parallel.mesh`), and
the mixers switch to LASP-2 / LASP-2H when the mesh's ``seq`` axis is > 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.core import Tracer

from xformjax.models.config import LMConfig
from xformjax.nn import linear, norms
from xformjax.nn.mixer import get_mixer
from xformjax.nn.mlp import MLP
from xformjax.nn.packing import make_packing
from xformjax.nn.states import MixerState
from xformjax.ops.common.validation import Mode
from xformjax.ops.common.value_checks import check_values
from xformjax.parallel.mesh import constrain

#: logical names of the residual stream ``[B, T, d_model]`` (the model dimension is
#: not split: parameters' ``embed`` dimension is FSDP-sharded, activations' is not)
ACTIVATION_AXES = ("batch", "length", None)


def check_tokens(tokens, vocab_size: int) -> None:
    """``tokens`` must be an integer array ``[B, T]`` (``TypeError`` for another dtype,
    ``ValueError`` for another rank) of ids in ``[0, vocab_size)``.

    The ids are checked when they are concrete (an eager call: ``ValueError`` naming
    the first bad id); under ``jit`` only with ``xformjax.config`` option
    ``check_values`` on (a ``checkify`` check, see :mod:`xformjax.config`), and not at
    all otherwise: the traced program is then unchanged (``jnp.take`` would fill an
    out-of-range row with NaN).
    """
    if not hasattr(tokens, "dtype") or not hasattr(tokens, "shape"):
        raise TypeError(
            f"LanguageModel: `tokens` must be int [B, T] (an integer array); "
            f"got {type(tokens).__name__}"
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(
            f"LanguageModel: `tokens` must be int [B, T] (an integer dtype); "
            f"got {tokens.dtype}{list(tokens.shape)}"
        )
    if tokens.ndim != 2:
        raise ValueError(
            f"LanguageModel: `tokens` must be int [B, T] (rank 2); "
            f"got {tokens.dtype}{list(tokens.shape)}"
        )
    if (
        isinstance(tokens, jax.Array)
        and not isinstance(tokens, Tracer)
        and not tokens.is_fully_addressable
    ):
        return  # a multi-process global array: its values are not all on this host
    check_values(
        "LanguageModel",
        "tokens",
        tokens,
        lambda t, xp: (t >= 0) & (t < vocab_size),
        f"token ids in [0, vocab_size={vocab_size})",
    )


class Block(nnx.Module):
    """One residual layer: a mixer and an MLP, each behind a norm."""

    def __init__(self, config: LMConfig, mixer_name: str, layer_index: int, *, rngs: nnx.Rngs):
        d, mixer_config = config.d_model, config.mixer

        def norm():
            return norms.make_norm(
                config.norm, d, eps=mixer_config.norm_eps, param_dtype=mixer_config.params_dtype
            )

        self.mixer_norm = norm()
        self.mixer = get_mixer(mixer_name)(
            mixer_config, layer_index=layer_index, num_layers=config.num_layers, rngs=rngs
        )
        self.mlp_norm = norm()
        self.mlp = MLP(mixer_config, config.hidden, kind=config.mlp, rngs=rngs)
        peri = config.norm_placement == "peri"
        self.mixer_out_norm = norm() if peri else None
        self.mlp_out_norm = norm() if peri else None

    def __call__(
        self,
        x: jax.Array,
        *,
        state: MixerState | None = None,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, MixerState]:
        """``x`` is the residual stream (float32 or wider); the sub-layers run in the
        mixer config's compute dtype. ``segment_ids``/``positions``: packed documents."""
        dtype = self.mixer.config.compute_dtype
        h, state = self.mixer(
            self.mixer_norm(x).astype(dtype),
            state=state,
            mode=mode,
            segment_ids=segment_ids,
            positions=positions,
        )
        if self.mixer_out_norm is not None:
            h = self.mixer_out_norm(h)
        x = x + h.astype(x.dtype)
        h = self.mlp(self.mlp_norm(x).astype(dtype))
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        return x + h.astype(x.dtype), state


class LanguageModel(nnx.Module):
    """A stack of :class:`Block` s over token embeddings (module docstring)."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, mixer_config = config.d_model, config.mixer
        embedding = (
            jax.random.normal(rngs.params(), (config.vocab_size, d), mixer_config.params_dtype)
            * config.embedding_std
        )
        self.embedding = nnx.Param(embedding, out_sharding=("vocab", "embed"), eager_sharding=False)
        self.blocks = nnx.List(
            [Block(config, name, i, rngs=rngs) for i, name in enumerate(config.layer_names())]
        )
        self.final_norm = norms.make_norm(
            config.norm, d, eps=mixer_config.norm_eps, param_dtype=mixer_config.params_dtype
        )
        self.lm_head = (
            None
            if config.tie_embeddings
            else linear.dense(
                mixer_config, d, config.vocab_size, axes=("embed", "vocab"), rngs=rngs
            )
        )

    def init_cache(self, batch: int, max_len: int) -> list[MixerState]:
        """Empty decoding states for ``batch`` sequences of up to ``max_len`` tokens."""
        return [block.mixer.init_state(batch, max_len) for block in self.blocks]

    def __call__(
        self,
        tokens: jax.Array,
        cache: list[MixerState] | None = None,
        *,
        mode: Mode | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, list[MixerState]]:
        """``tokens`` int ``[B, T]`` → ``(logits [B, T, vocab] float32, cache)``.

        The token ids must lie in ``[0, vocab_size)``: see :func:`check_tokens`.
        ``segment_ids``, ``positions``: int ``[B, T]``, documents packed in each row
        (module docstring)."""
        check_tokens(tokens, self.config.vocab_size)
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(
                f"LanguageModel: `cache` has {len(cache)} entries for {len(self.blocks)} layers"
            )
        offset = 0 if cache is None else cache[0].position
        batch, length = tokens.shape
        packing = make_packing("LanguageModel", segment_ids, positions, batch, length, offset)
        if packing is not None:  # checked and derived once, for every layer
            segment_ids, positions = packing.segment_ids, packing.positions
        dtype = self.config.mixer.compute_dtype
        residual_dtype = jnp.promote_types(dtype, jnp.float32)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(residual_dtype)
        x = x * jnp.asarray(self.config.embedding_scale, residual_dtype)
        x = constrain(x, ACTIVATION_AXES)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, state = block(
                x,
                state=None if cache is None else cache[i],
                mode=mode,
                segment_ids=segment_ids,
                positions=positions,
            )
            x = constrain(x, ACTIVATION_AXES)
            new_cache.append(state)
        x = self.final_norm(x).astype(dtype)
        if self.lm_head is None:
            logits = jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(dtype))
        else:
            logits = self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab")), new_cache
