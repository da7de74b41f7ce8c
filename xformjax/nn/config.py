"""``MixerConfig``: the one frozen configuration every mixer is built from.

Every mixer in :data:`xformjax.nn.MIXERS` is constructed as
``Mixer(config, layer_index=0, num_layers=1, rngs=...)``. The fields shared by
all families come first; the family-specific ones say which mixer reads them.
``layer_index`` / ``num_layers`` matter only to depth-dependent families
(lightning attention's decay, TransNormer's DiagAttention in early layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import jax.numpy as jnp

from xformjax.fields import check_bool, check_choice, check_float, check_float_dtype, check_int
from xformjax.ops.common.validation import Mode

FEATURE_MAPS = ("identity", "elu+1", "relu", "hedgehog", "taylor")
MODES: tuple[Mode, ...] = ("chunk", "parallel", "recurrent")

#: Titans' variants: memory as a layer, as a gate, as context.
TitansVariant = Literal["mal", "mag", "mac"]
TITANS_VARIANTS: tuple[TitansVariant, ...] = get_args(TitansVariant)
#: the neural memory's update rule (ATLAS's ``memory_optimizer``).
MemoryOptimizer = Literal["muon", "momentum"]
MEMORY_OPTIMIZERS: tuple[MemoryOptimizer, ...] = get_args(MemoryOptimizer)
TRANSNORMER_ATTENTIONS = ("auto", "norm", "diag")

_POSITIVE_INTS = (
    "d_model",
    "num_heads",
    "chunk_size",
    "max_seq_len",
    "diag_block_size",
    "gate_low_rank",
    "num_householder",
    "num_memories",
    "top_k",
    "memory_depth",
    "memory_expansion",
    "memory_window",
    "omega_window",
    "poly_degree",
    "newton_schulz_steps",
)
_BOOLS = (
    "sigma_reparam",
    "output_gate",
    "normalize",
    "mala",
    "short_conv",
    "allow_neg_eigval",
    "shared_memory",
)
_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "feature_map": FEATURE_MAPS,
    "transnormer_attention": TRANSNORMER_ATTENTIONS,
    "titans_variant": TITANS_VARIANTS,
    "memory_optimizer": MEMORY_OPTIMIZERS,
}


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Hyper-parameters of a sequence mixer.

    Every field is checked at construction: a value of the wrong type raises
    ``TypeError`` (a ``bool`` is not a number, a number not a bool or a string), a
    value out of range ``ValueError``, both as ``"MixerConfig: `field` must be …; got
    …"``. A config does not know which family it builds: each family reads the fields
    listed for it below and ignores the others (a field set for another family has no
    effect, it is not an error). "All" means every family in :data:`xformjax.nn.MIXERS`.

    Shared (all families):
      d_model: width of the residual stream (input and output of the mixer); int ≥ 1.
      num_heads: number of (query) heads; int ≥ 1.
      head_dim: query/key dimension per head; ``d_model // num_heads`` if ``None``
        (then ``num_heads`` must divide ``d_model``); int ≥ 1. ``attn``,
        ``sigmoid_attn`` and ``retnet`` need it even (RoPE / xPos).
      expand_v: value dimension per head is ``max(1, round(head_dim · expand_v))``;
        finite > 0. Read by all but ``attn`` and ``sigmoid_attn`` (their values have
        ``head_dim`` features).
      chunk_size: chunk length of the chunked forms (Titans MAC: also its segment
        length, the span of its attention); int ≥ 1.
      mode: the default form when a call passes ``mode=None`` and more than one
        token: ``"chunk"``, ``"parallel"`` or ``"recurrent"``. A single token
        always defaults to ``"recurrent"``; a family without the form falls back to
        ``"chunk"``.
      dtype: the compute dtype (Flax's name for it, as in ``nnx.Linear``; read back as
        ``config.compute_dtype``): a floating dtype, ``"float32"``, ``"bfloat16"``, ….
        The operands of the matmuls — projections, MLPs, the logits — and the
        activations between them; the matmuls accumulate in float32. Norms, gates
        (sigmoids, softplus, decays and their cumulative sums), softmaxes, the residual
        stream, the recurrent states and the ops' arithmetic run in ``promote(dtype,
        float32)`` regardless; the logits come out float32.
      param_dtype: the dtype the parameters are stored in (a floating dtype; read back
        as ``config.params_dtype``). ``dtype="bfloat16"`` with ``param_dtype="float32"``
        is mixed precision; the language model reads both for its own layers too.
      sigma_reparam: reparameterise every projection as ``γ/σ(W)·W`` (σReparam).
      norm_eps: epsilon of the normalisations inside mixers (the per-head output
        norms, Titans' branch norms) and of the language model's norms; finite > 0.

    Output gate (all but ``attn``, ``sigmoid_attn``, ``transnormer`` and Titans
    ``mac`` / ``mag``, whose read-outs have no gate):
      output_gate: multiply the mixer's output by ``SiLU(x W_g)`` before ``W_o``.

    Softmax / sigmoid attention (``attn``, ``sigmoid_attn``):
      num_kv_heads: key/value heads (grouped-query); ``num_heads`` if ``None``;
        int ≥ 1 dividing ``num_heads``.
      max_seq_len: the default KV-cache capacity (the longest sequence the model is
        meant for); int ≥ 1.
      window: sliding-window size or ``None``; int ≥ 1.
      sigmoid_bias (``sigmoid_attn``): the bias, any finite number; if ``None``, per
        query ``1 − log n_i`` with ``n_i`` the keys query ``i`` sees (it depends only
        on the position, so decoding and training agree; see
        :mod:`xformjax.nn.attention`).

    RoPE (``attn``, ``sigmoid_attn``, ``retnet``, Titans ``mac`` and ``mag``):
      rope_theta: the rotary base; finite > 0.

    Linear attention (``linear_attn``; ``feature_map`` also ``transnormer``):
      feature_map: one of ``identity``, ``elu+1``, ``relu``, ``hedgehog``, ``taylor``.
      feature_dim: q/k projection width per head before the feature map
        (Based uses 16 for ``taylor``); ``head_dim`` if ``None``; int ≥ 1.
      normalize: divide by ``φ(q)ᵀ Σ φ(k)``.
      mala: the magnitude-aware variant (MALA).

    TransNormer (``transnormer``):
      transnormer_attention: ``"norm"``, ``"diag"`` or ``"auto"`` (DiagAttention in
        the first half of the layers, NormAttention after).
      diag_block_size: block length of DiagAttention; int ≥ 1.

    GLA (``gla``): gate_low_rank (int ≥ 1), gate_temperature (τ in
    ``α = σ(·)^{1/τ}``; finite > 0).

    Short convolutions (``deltanet``, ``gated_deltanet``, ``deltaproduct``, ``mom``,
    ``titans``, ``atlas``):
      conv_size: short causal convolution length on q/k/v (0 disables it); int ≥ 0.
      short_conv (``linear_attn``, ``retnet``, ``gla``): give the layer the same
        ``SiLU(conv(·))`` on q, k and v (length ``conv_size``), before the feature map
        or RoPE (flash-linear-attention's ``use_short_conv``); off by default, as in
        the papers. Other layers ignore it (a model with none of these raises).

    Delta rule (``deltanet``, ``gated_deltanet``, ``deltaproduct``; ``allow_neg_eigval``
    also ``mom`` and ``diag_rnn``):
      allow_neg_eigval: ``β = 2σ(·)`` instead of ``σ(·)`` (``diag_rnn``: transitions
        ``a = 2σ(·) − 1`` in (−1, 1) instead of ``σ(·)``).
      num_householder (``deltaproduct``): delta steps per token; int ≥ 1.

    Mixture-of-Memories (``mom``):
      num_memories: memories M, each with its own k/v/β/gate projections; int ≥ 1.
      top_k: memories each token is routed to; int in [1, num_memories].
      shared_memory: an always-on memory besides the routed ones.

    Titans / ATLAS neural memory (``titans``, ``atlas``):
      memory_depth: layers of the MLP memory (1: a linear memory); int ≥ 1.
      memory_expansion: hidden width of the MLP memory, × head_dim; int ≥ 1.
      max_surprise_norm: clip each token's surprise (the memory's loss gradient,
        all layers together) to this norm; ``None`` turns the clip off (the papers'
        rule); finite > 0. It keeps the inner optimisation from overflowing when a
        learned step is too large for the memory (see :mod:`xformjax.ops.neural_memory`).
      titans_variant (``titans``): ``"mac"`` (memory as context), ``"mag"`` (memory
        as gate) or ``"mal"`` (memory as layer).
      persistent_tokens (Titans ``mac``, ``mag``): learned persistent-memory tokens;
        int ≥ 0.
      memory_window (Titans ``mag``): sliding-window width of the attention branch;
        int ≥ 1. (MAC's attention spans its segment, ``chunk_size``.)
      omega_window (``atlas``): the Omega rule: the memory fits the last
        ``omega_window`` tokens (1: only the current one, as Titans); int ≥ 1.
      poly_degree (``atlas``): polynomial feature map degree of keys/queries (1:
        none); int ≥ 1.
      memory_optimizer (``atlas``): the update rule, ``"muon"`` (Newton–Schulz
        orthogonalised momentum) or ``"momentum"`` (Titans' rule, which ``titans``
        always uses).
      newton_schulz_steps (``atlas`` with ``"muon"``): iterations of the
        Newton–Schulz orthogonalisation; int ≥ 1.
    """

    d_model: int = 256
    num_heads: int = 4
    head_dim: int | None = None
    expand_v: float = 1.0
    num_kv_heads: int | None = None
    chunk_size: int = 64
    mode: Mode = "chunk"
    dtype: str = "float32"
    param_dtype: str = "float32"
    sigma_reparam: bool = False
    output_gate: bool = True
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    # softmax / sigmoid attention
    rope_theta: float = 10_000.0
    window: int | None = None
    sigmoid_bias: float | None = None
    # linear attention
    feature_map: str = "elu+1"
    feature_dim: int | None = None
    normalize: bool = False
    mala: bool = False
    # transnormer
    transnormer_attention: str = "auto"
    diag_block_size: int = 64
    # gla
    gate_low_rank: int = 16
    gate_temperature: float = 16.0
    # short convolutions (the delta rule, MoM, Titans, ATLAS; ``short_conv`` the others)
    conv_size: int = 4
    short_conv: bool = False
    # delta rule
    allow_neg_eigval: bool = False
    num_householder: int = 2
    # mixture of memories
    num_memories: int = 4
    top_k: int = 2
    shared_memory: bool = True
    # titans / atlas
    memory_depth: int = 2
    memory_expansion: int = 2
    titans_variant: TitansVariant = "mal"
    persistent_tokens: int = 4
    memory_window: int = 64
    omega_window: int = 4
    poly_degree: int = 2
    memory_optimizer: MemoryOptimizer = "muon"
    newton_schulz_steps: int = 5
    max_surprise_norm: float | None = 4.0

    def __post_init__(self):
        owner = "MixerConfig"
        for name in _POSITIVE_INTS:
            check_int(owner, name, getattr(self, name))
        for name in ("head_dim", "num_kv_heads", "window", "feature_dim"):
            check_int(owner, name, getattr(self, name), optional=True)
        for name in ("conv_size", "persistent_tokens"):
            check_int(owner, name, getattr(self, name), minimum=0)
        for name in ("expand_v", "norm_eps", "rope_theta", "gate_temperature"):
            check_float(owner, name, getattr(self, name), above=0)
        check_float(owner, "max_surprise_norm", self.max_surprise_norm, above=0, optional=True)
        check_float(owner, "sigmoid_bias", self.sigmoid_bias, optional=True)
        for name in _BOOLS:
            check_bool(owner, name, getattr(self, name))
        for name, choices in _CHOICES.items():
            check_choice(owner, name, getattr(self, name), choices)
        for name in ("dtype", "param_dtype"):
            check_float_dtype(owner, name, getattr(self, name))
        if self.short_conv and not self.conv_size:
            raise ValueError(f"{owner}: `short_conv` needs conv_size ≥ 1; got conv_size=0")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"{owner}: `d_model` must be divisible by num_heads={self.num_heads} when "
                f"head_dim is None; got {self.d_model} (or set head_dim explicitly)"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: `num_kv_heads` must divide num_heads={self.num_heads}; got "
                f"{self.num_kv_heads} (num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads})"
            )
        if self.top_k > self.num_memories:
            raise ValueError(
                f"{owner}: `top_k` must be ≤ num_memories={self.num_memories}; got {self.top_k}"
            )

    @property
    def key_dim(self) -> int:
        """Query/key dimension per head."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def value_dim(self) -> int:
        """Value dimension per head."""
        return max(1, round(self.key_dim * self.expand_v))

    @property
    def kv_heads(self) -> int:
        """Key/value heads of softmax attention."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def compute_dtype(self) -> Any:
        """The compute dtype: the field ``dtype`` as a ``jnp.dtype``."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> Any:
        """The parameters' dtype: the field ``param_dtype`` as a ``jnp.dtype``."""
        return jnp.dtype(self.param_dtype)
