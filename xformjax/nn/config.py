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

from xformjax.ops.common.validation import Mode

FEATURE_MAPS = ("identity", "elu+1", "relu", "hedgehog", "taylor")
MODES: tuple[Mode, ...] = ("chunk", "parallel", "recurrent")

#: Titans' variants: memory as a layer, as a gate, as context.
TitansVariant = Literal["mal", "mag", "mac"]
TITANS_VARIANTS: tuple[TitansVariant, ...] = get_args(TitansVariant)
#: the neural memory's update rule (ATLAS's ``memory_optimizer``).
MemoryOptimizer = Literal["muon", "momentum"]
MEMORY_OPTIMIZERS: tuple[MemoryOptimizer, ...] = get_args(MemoryOptimizer)


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Hyper-parameters of a sequence mixer.

    Shared:
      d_model: width of the residual stream (input and output of the mixer).
      num_heads: number of (query) heads.
      head_dim: query/key dimension per head; ``d_model // num_heads`` if ``None``.
      expand_v: value dimension per head is ``round(head_dim · expand_v)``.
      num_kv_heads: key/value heads of softmax attention (grouped-query);
        ``num_heads`` if ``None``.
      chunk_size: chunk length of the chunked forms.
      mode: the default form when a call passes ``mode=None`` and more than one
        token: ``"chunk"``, ``"parallel"`` or ``"recurrent"``. A single token
        always defaults to ``"recurrent"``.
      dtype: computation dtype of projections (``"float32"``, ``"bfloat16"``, …);
        the ops accumulate in ``promote(dtype, float32)`` regardless.
      param_dtype: dtype of the parameters.
      sigma_reparam: reparameterise every projection as ``γ/σ(W)·W`` (σReparam).
      output_gate: multiply the mixer's output by ``SiLU(x W_g)`` (gated families).
      norm_eps: epsilon of the normalisations inside mixers.
      max_seq_len: the longest sequence the model is meant for: the default KV-cache
        capacity.

    Softmax / sigmoid attention (``attn``, ``sigmoid_attn``):
      rope_theta: RoPE base.  window: sliding-window size or ``None``.
      sigmoid_bias: sigmoid attention's bias; if ``None``, per query
        ``1 − log n_i`` with ``n_i`` the keys query ``i`` sees (it depends only on
        the position, so decoding and training agree; see :mod:`xformjax.nn.attention`).

    Linear attention (``linear_attn``):
      feature_map: one of ``identity``, ``elu+1``, ``relu``, ``hedgehog``, ``taylor``.
      feature_dim: q/k projection width per head before the feature map
        (Based uses 16 for ``taylor``); ``head_dim`` if ``None``.
      normalize: divide by ``φ(q)ᵀ Σ φ(k)``.
      mala: the magnitude-aware variant (MALA).

    TransNormer (``transnormer``):
      transnormer_attention: ``"norm"``, ``"diag"`` or ``"auto"`` (DiagAttention in
        the first half of the layers, NormAttention after).
      diag_block_size: block length of DiagAttention.

    GLA (``gla``): gate_low_rank, gate_temperature (τ in ``α = σ(·)^{1/τ}``).

    Delta rule (``deltanet``, ``gated_deltanet``, ``deltaproduct``):
      conv_size: short causal convolution length on q/k/v (0 disables it).
      allow_neg_eigval: ``β = 2σ(·)`` instead of ``σ(·)`` (``diag_rnn``: transitions
        ``a = 2σ(·) − 1`` in (−1, 1) instead of ``σ(·)``).
      num_householder: DeltaProduct's steps per token.

    Mixture-of-Memories (``mom``):
      num_memories: memories M, each with its own k/v/β/gate projections.
      top_k: memories each token is routed to.
      shared_memory: an always-on memory besides the routed ones.

    Titans / ATLAS neural memory (``titans``, ``atlas``):
      memory_depth: layers of the MLP memory (1: a linear memory).
      memory_expansion: hidden width of the MLP memory, × head_dim.
      titans_variant: ``"mac"`` (memory as context), ``"mag"`` (memory as gate) or
        ``"mal"`` (memory as layer).
      persistent_tokens: learned persistent-memory tokens (MAC, MAG).
      memory_window: sliding-window width of the attention branch (MAC, MAG).
      omega_window: ATLAS's Omega rule: the memory fits the last ``omega_window``
        tokens (1: only the current one, as Titans).
      poly_degree: ATLAS's polynomial feature map degree of keys/queries (1: none).
      memory_optimizer: ATLAS's update rule, ``"muon"`` (Newton–Schulz
        orthogonalised momentum) or ``"momentum"`` (Titans' rule).
      newton_schulz_steps: iterations of the Newton–Schulz orthogonalisation.
      max_surprise_norm: clip each token's surprise (the memory's loss gradient,
        all layers together) to this norm; ``None`` turns the clip off (the papers'
        rule). It keeps the inner optimisation from overflowing when a learned step
        is too large for the memory (see :mod:`xformjax.ops.neural_memory`).
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
    # delta rule
    conv_size: int = 4
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
        def bad(message: str):
            raise ValueError(f"MixerConfig: {message}")

        for name in (
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
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"`{name}` must be a positive int; got {value!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            bad(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            bad(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.mode not in MODES:
            bad(f"`mode` must be one of {MODES}; got {self.mode!r}")
        if self.feature_map not in FEATURE_MAPS:
            bad(f"`feature_map` must be one of {FEATURE_MAPS}; got {self.feature_map!r}")
        if self.transnormer_attention not in ("auto", "norm", "diag"):
            bad(
                "`transnormer_attention` must be 'auto', 'norm' or 'diag'; "
                f"got {self.transnormer_attention!r}"
            )
        if self.top_k > self.num_memories:
            bad(f"top_k={self.top_k} exceeds num_memories={self.num_memories}")
        if self.titans_variant not in TITANS_VARIANTS:
            bad(f"`titans_variant` must be 'mac', 'mag' or 'mal'; got {self.titans_variant!r}")
        if self.memory_optimizer not in MEMORY_OPTIMIZERS:
            bad(f"`memory_optimizer` must be 'muon' or 'momentum'; got {self.memory_optimizer!r}")
        if self.persistent_tokens < 0:
            bad(f"`persistent_tokens` must be ≥ 0; got {self.persistent_tokens}")
        if self.conv_size < 0:
            bad(f"`conv_size` must be ≥ 0; got {self.conv_size}")
        if self.expand_v <= 0:
            bad(f"`expand_v` must be positive; got {self.expand_v}")
        if self.max_surprise_norm is not None and (
            isinstance(self.max_surprise_norm, bool)
            or not 0 < self.max_surprise_norm < float("inf")
        ):
            bad(
                f"`max_surprise_norm` must be None or a positive finite number; "
                f"got {self.max_surprise_norm!r}"
            )
        if self.window is not None and self.window < 1:
            bad(f"`window` must be None or ≥ 1; got {self.window}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                bad(f"`{name}` is not a dtype: {getattr(self, name)!r}")

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
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)
