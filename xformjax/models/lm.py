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

``LMConfig.remat`` wraps every block in ``jax.checkpoint`` with a named policy
(:data:`REMAT_POLICIES`). With ``LMConfig.scan_layers`` the layers of each entry of
the pattern are stacked into one :class:`Block` whose parameters have a leading axis
of ``R = num_layers / period`` rounds (``model.stacks``, ``period`` blocks; logical
name ``None``: never sharded), and the rounds run in a ``jax.lax.scan``, so the
compiled program holds one round whatever the depth. The cache is then ``period``
states, each stacked over the ``R`` rounds; :meth:`LanguageModel.init_cache` builds
it and ``generate`` works unchanged. The layers are built exactly as without
scanning and then stacked, so both models start from the same parameters.

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

#: ``LMConfig.remat`` → the ``jax.checkpoint`` policy of every block (``"full"``:
#: none, i.e. nothing saved; ``"none"`` does not rematerialise at all)
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

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


def run_block(
    block: Block,
    x: jax.Array,
    *,
    state: MixerState | None,
    mode: Mode | None,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
    remat: str = "none",
    prevent_cse: bool = True,
) -> tuple[jax.Array, MixerState]:
    """``block(x, ...)``, under ``jax.checkpoint`` with the policy ``remat`` names
    (:data:`REMAT_POLICIES`; ``"none"``: called directly). Variables the call updates
    (σReparam's power iteration) are written back to ``block``."""
    if remat == "none":
        return block(x, state=state, mode=mode, segment_ids=segment_ids, positions=positions)
    graphdef, variables = nnx.split(block)

    def forward(variables, x, state, segment_ids, positions):
        module = nnx.merge(graphdef, variables)
        y, new_state = module(
            x, state=state, mode=mode, segment_ids=segment_ids, positions=positions
        )
        return y, new_state, nnx.state(module, nnx.Not(nnx.Param))

    checkpointed = jax.checkpoint(forward, prevent_cse=prevent_cse, policy=REMAT_POLICIES[remat])
    y, new_state, updated = checkpointed(variables, x, state, segment_ids, positions)
    nnx.update(block, updated)
    return y, new_state


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _map_names(tree, change):
    """``tree``'s variables with logical names (``out_sharding``) ``change(names)``."""

    def one(variable):
        names = variable.get_metadata().get("out_sharding")
        return variable.replace(out_sharding=change(tuple(names))) if names else variable

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def stack_blocks(blocks: list[Block]) -> Block:
    """One :class:`Block` whose variables stack those of ``blocks`` (built alike) on a
    new leading axis, logical name ``None`` (replicated). ``ValueError`` if the blocks
    differ in structure (a mixer whose static attributes depend on its depth)."""
    first = blocks[0]
    for block in blocks[1:]:  # the index is the only static attribute allowed to differ
        block.mixer.layer_index = first.mixer.layer_index
    graphdef, first_variables = nnx.split(first)
    variables = [first_variables]
    for block in blocks[1:]:
        other, block_variables = nnx.split(block)
        if other != graphdef:
            raise ValueError(
                f"LanguageModel: `scan_layers` stacks the layers that share a pattern "
                f"entry, but the {first.mixer.name!r} layers differ in structure (their "
                f"static attributes depend on the depth): use scan_layers=False"
            )
        variables.append(block_variables)
    stacked = jax.tree.map(
        lambda *vs: vs[0].replace(jnp.stack([v[...] for v in vs])),
        *variables,
        is_leaf=_is_variable,
    )
    return nnx.merge(graphdef, _map_names(stacked, lambda names: (None, *names)))


def unstack_variables(stacked):
    """The per-round view of a stack's variables (the leading logical name dropped);
    their arrays still carry the round axis until sliced (``lax.scan`` slices them)."""
    return _map_names(stacked, lambda names: names[1:])


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
        blocks = [Block(config, name, i, rngs=rngs) for i, name in enumerate(config.layer_names())]
        if config.scan_layers:  # built as without scanning (same parameters), then stacked
            period = config.period
            self.blocks = None
            self.stacks = nnx.List([stack_blocks(blocks[j::period]) for j in range(period)])
        else:
            self.blocks = nnx.List(blocks)
            self.stacks = None
        self.final_norm = norms.make_norm(
            config.norm, d, eps=mixer_config.norm_eps, param_dtype=mixer_config.params_dtype
        )
        self.lm_head = (
            None
            if config.tie_embeddings
            else linear.dense(
                mixer_config,
                d,
                config.vocab_size,
                axes=("embed", "vocab"),
                rngs=rngs,
                float_output=True,  # compute-dtype operands, float32 logits
            )
        )

    @property
    def rounds(self) -> int:
        """How many times the pattern repeats (the stacked axis under ``scan_layers``)."""
        return self.config.num_layers // self.config.period

    def layer(self, index: int) -> Block:
        """Layer ``index``'s :class:`Block` (under ``scan_layers`` a copy sliced out
        of its stack: changing it does not change the model)."""
        if not 0 <= index < self.config.num_layers:
            raise ValueError(
                f"LanguageModel: `index` must lie in [0, {self.config.num_layers}); got {index}"
            )
        if self.stacks is None:
            assert self.blocks is not None
            return self.blocks[index]
        period = self.config.period
        graphdef, stacked = nnx.split(self.stacks[index % period])
        sliced = jax.tree.map(lambda a: a[index // period], unstack_variables(stacked))
        block = nnx.merge(graphdef, sliced)
        block.mixer.layer_index = index
        return block

    def mixers(self) -> list:
        """Every layer's mixer, in order (under ``scan_layers`` a stacked mixer stands
        for each of its rounds; for what depends only on the config, e.g. FLOPs)."""
        if self.stacks is None:
            assert self.blocks is not None
            return [block.mixer for block in self.blocks]
        return [stack.mixer for _ in range(self.rounds) for stack in self.stacks]

    def init_cache(self, batch: int, max_len: int) -> list[MixerState]:
        """Empty decoding states for ``batch`` sequences of up to ``max_len`` tokens:
        one per layer, or under ``scan_layers`` one per pattern entry with every
        array stacked over the ``rounds`` (leading axis)."""
        if self.stacks is None:
            assert self.blocks is not None
            return [block.mixer.init_state(batch, max_len) for block in self.blocks]
        rounds = self.rounds
        return [
            jax.tree.map(
                lambda a: jnp.broadcast_to(a, (rounds, *a.shape)),
                self.layer(j).mixer.init_state(batch, max_len),
            )
            for j in range(self.config.period)
        ]

    def _run_stacks(
        self,
        x: jax.Array,
        cache: list[MixerState] | None,
        mode: Mode | None,
        segment_ids: jax.Array | None,
        positions: jax.Array | None,
    ) -> tuple[jax.Array, list[MixerState]]:
        """The rounds of ``scan_layers`` as one ``lax.scan`` over the stacked variables
        (and the stacked cache); σReparam's updated vectors are written back."""
        assert self.stacks is not None
        graphdef, stacked = nnx.split(self.stacks)
        remat = self.config.remat

        def one_round(x, inputs):
            variables, round_cache = inputs
            blocks = nnx.merge(graphdef, variables)
            states = []
            for j, block in enumerate(blocks):
                x, state = run_block(
                    block,
                    x,
                    state=None if round_cache is None else round_cache[j],
                    mode=mode,
                    segment_ids=segment_ids,
                    positions=positions,
                    remat=remat,
                    prevent_cse=False,  # not needed inside a scan (jax.checkpoint's docs)
                )
                x = constrain(x, ACTIVATION_AXES)
                states.append(state)
            return x, (nnx.state(blocks, nnx.Not(nnx.Param)), states)

        x, (updated, new_cache) = jax.lax.scan(
            one_round, x, (unstack_variables(stacked), None if cache is None else list(cache))
        )
        nnx.update(self.stacks, _map_names(updated, lambda names: (None, *names)))
        return x, new_cache

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
        scanned = self.stacks is not None
        entries = self.config.period if scanned else self.config.num_layers
        if cache is not None and len(cache) != entries:
            what = "pattern entries (scan_layers)" if scanned else "layers"
            raise ValueError(
                f"LanguageModel: `cache` has {len(cache)} entries for {entries} {what}"
            )
        offset = 0
        if cache is not None:  # under scan_layers stacked over the rounds, all equal
            offset = cache[0].position[0] if scanned else cache[0].position
        batch, length = tokens.shape
        packing = make_packing("LanguageModel", segment_ids, positions, batch, length, offset)
        if packing is not None:  # checked and derived once, for every layer
            segment_ids, positions = packing.segment_ids, packing.positions
        dtype = self.config.mixer.compute_dtype
        residual_dtype = jnp.promote_types(dtype, jnp.float32)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(residual_dtype)
        x = x * jnp.asarray(self.config.embedding_scale, residual_dtype)
        x = constrain(x, ACTIVATION_AXES)
        if scanned:
            x, new_cache = self._run_stacks(x, cache, mode, segment_ids, positions)
        else:
            assert self.blocks is not None
            new_cache = []
            for i, block in enumerate(self.blocks):
                x, state = run_block(
                    block,
                    x,
                    state=None if cache is None else cache[i],
                    mode=mode,
                    segment_ids=segment_ids,
                    positions=positions,
                    remat=self.config.remat,
                )
                x = constrain(x, ACTIVATION_AXES)
                new_cache.append(state)
        x = self.final_norm(x).astype(dtype)
        if self.lm_head is None:
            # compute-dtype operands, float32 accumulation and logits
            embedding = self.embedding[...].astype(dtype)
            accumulate = jnp.promote_types(dtype, jnp.float32)
            logits = jnp.einsum("btd,vd->btv", x, embedding, preferred_element_type=accumulate)
        else:
            logits = self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab")), new_cache
