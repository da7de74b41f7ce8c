"""The mixers' decoding states: typed pytrees, one class per kind of layer.

A state is what ``y, state = mixer(x, state=...)`` carries from one call to the
next (see :mod:`xformjax.nn.mixer`). Each is a frozen :func:`flax.struct.dataclass`
— a pytree ``jax.jit`` and ``lax.scan`` carry — whose array fields have fixed
shapes from ``init_state(batch, max_len)``; ``state.replace(field=...)`` makes a
changed copy. Every state derives from :class:`MixerState` and so holds
``position``, the number of tokens consumed (int32 scalar). A field that a
configuration does not use is ``None`` (an empty pytree node) in every state the
layer returns, so the structure never changes between calls.

The classes, the layers that return them and their fields beyond ``position``:

- :class:`KVCacheState` — ``attn``, ``sigmoid_attn``, ``transnormer``
  (DiagAttention): ``k``, ``v``, ``segment_ids`` (attention; ``None`` in DiagAttention).
- :class:`MemoryState` — ``lightning``, ``transnormer`` (NormAttention),
  ``diag_rnn``: ``memory``.
- :class:`ConvMemoryState` — ``retnet``, ``gla``: ``memory``, ``conv``
  (:class:`ConvCaches`; empty unless ``short_conv``).
- :class:`LinearAttentionState` — ``linear_attn``: ``memory``, ``conv``, ``value_sum``
  (MALA).
- :class:`LightNetState` — ``lightnet``: ``memory``, ``log_z``.
- :class:`DeltaRuleState` — ``deltanet``, ``gated_deltanet``, ``deltaproduct``:
  ``memory``, ``conv`` (:class:`ConvCaches`).
- :class:`MixtureOfMemoriesState` — ``mom``: ``memory``, ``conv``, ``aux_loss``.
- :class:`SoftmaxSummaryState` — ``aaren``: ``max``, ``numerator``, ``denominator``.
- :class:`NeuralMemoryState` — ``titans`` (MAL), ``atlas``: ``memory``, ``buffer``
  (:class:`MemoryTokens`), ``conv``, ``document_tokens``.
- :class:`TitansMAGState` — ``titans`` (MAG): those of MAL, ``attn_k``, ``attn_v``.
- :class:`TitansMACState` — ``titans`` (MAC): ``memory``, ``segment``
  (:class:`SegmentTokens`), ``conv``, ``document_tokens``.

A layer with an auxiliary training loss carries it as ``aux_loss`` (a float32
scalar, the last call's); the trainer adds every ``aux_loss`` it finds
(``getattr(state, "aux_loss", None)``) with ``train.aux_loss_weight``.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class MixerState:
    """The base of every state: ``position``, tokens consumed so far (int32 ``[]``)."""

    position: jax.Array


@struct.dataclass
class KVCacheState(MixerState):
    """Keys and values of the tokens a softmax layer attends to.

    Attention: ``[B, L, Hkv, D]`` with the first ``position`` of ``L`` slots filled,
    and ``segment_ids`` int32 ``[B, L]``, the document of each cached key: the number
    of documents begun in its row, since the cache was empty, up to that key (0 for
    the first; a call continues the last cached key's document; see
    :mod:`xformjax.nn.attention`). A query attends only to cached keys of its own
    document. TransNormer's DiagAttention: the current block ``[B, block, H, ·]`` and
    ``segment_ids = None``.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array | None = None


@struct.dataclass
class MemoryState(MixerState):
    """A recurrent memory: ``[B, H, K, V]`` (the linear-attention family, the op's
    state) or ``[B, H, V]`` (the diagonal RNN)."""

    memory: jax.Array


@struct.dataclass
class ConvCaches:
    """The last ``conv_size − 1`` inputs ``[B, L−1, C]`` of each stream's short causal
    convolution; ``None`` for a stream without one (or ``conv_size = 0``)."""

    q: jax.Array | None = None
    k: jax.Array | None = None
    v: jax.Array | None = None


@struct.dataclass
class ConvMemoryState(MemoryState):
    """A recurrent memory and the caches of the q, k, v short convolutions (all
    ``None`` in a layer without them)."""

    conv: ConvCaches


@struct.dataclass
class LinearAttentionState(ConvMemoryState):
    """Linear attention's memory (``V + 1`` columns with a normaliser), the q, k, v
    convolution caches (``short_conv``) and, for MALA, ``value_sum`` ``Σ_j v_j``
    ``[B, H, V]`` (``None`` otherwise)."""

    value_sum: jax.Array | None = None


@struct.dataclass
class LightNetState(MemoryState):
    """LightNet's memory and ``log z`` ``[B, H, K]``, the log of the running sum of
    ``exp(k)`` (``−1e30`` when empty)."""

    log_z: jax.Array


@struct.dataclass
class DeltaRuleState(ConvMemoryState):
    """The delta rule's memory ``[B, H, K, V]`` and the q, k, v convolution caches."""


@struct.dataclass
class MixtureOfMemoriesState(DeltaRuleState):
    """The M (+1 shared) memories ``[B, M(+1), H, K, V]``, the convolution caches and
    the load-balancing ``aux_loss`` of the last call's tokens (0 in ``init_state``)."""

    aux_loss: jax.Array


@struct.dataclass
class SoftmaxSummaryState(MixerState):
    """Aaren's running softmax summary: ``max`` ``[B, H]`` (``−inf`` when empty),
    ``numerator`` ``[B, H, V]`` and ``denominator`` ``[B, H]``."""

    max: jax.Array
    numerator: jax.Array
    denominator: jax.Array


@struct.dataclass
class MemoryTokens:
    """Per-token inputs of the neural memory's update: ``k`` ``[B, T, H, K]``, ``v``
    ``[B, T, H, V]`` and the gates ``[B, T, H]`` — θ (``lr``), η (``momentum``), α
    (``decay``), γ (``gamma``, the Omega weights; 1 without them)."""

    k: jax.Array
    v: jax.Array
    lr: jax.Array
    momentum: jax.Array
    decay: jax.Array
    gamma: jax.Array


@struct.dataclass
class NeuralMemoryState(MixerState):
    """Titans MAL / ATLAS.

    ``memory``: the op's state at the last chunk boundary (absolute position a
    multiple of ``C``), as :func:`xformjax.ops.neural_memory.init_neural_memory_state`
    builds it (``weight_l``, ``momentum_l`` ``[B, H, d_{l-1}, d_l]``; ``window_*``
    with ``omega_window > 1``). ``buffer``: the :class:`MemoryTokens` of the
    ``document_tokens mod C`` tokens since, ``[B, C, H, ·]``, zero beyond the count.
    ``conv``: the q, k, v convolution caches. ``document_tokens`` int32 ``[B]``: the
    tokens of each row's current document so far (``position`` unless documents were
    packed: the chunk grid restarts with every document).
    """

    memory: dict[str, jax.Array]
    buffer: MemoryTokens
    conv: ConvCaches
    document_tokens: jax.Array


@struct.dataclass
class TitansMAGState(NeuralMemoryState):
    """Titans MAG: MAL's state and the attention branch's last ``W − 1`` (RoPE'd)
    keys ``attn_k`` ``[B, W−1, H, K]`` and values ``attn_v`` ``[B, W−1, H, V]`` (the
    last ``min(document_tokens, W − 1)`` of them belong to the current document)."""

    attn_k: jax.Array
    attn_v: jax.Array


@struct.dataclass
class SegmentTokens:
    """The open segment's tokens ``[B, C, H, ·]`` in Titans MAC (zero beyond
    ``document_tokens mod C``): the retrieval query ``q`` and the attention's ``qa``,
    ``ka``, ``va``."""

    q: jax.Array
    qa: jax.Array
    ka: jax.Array
    va: jax.Array


@struct.dataclass
class TitansMACState(MixerState):
    """Titans MAC: the op's ``memory`` at the last segment boundary (as in
    :class:`NeuralMemoryState`), the open ``segment``, the retrieval query's
    convolution cache (``conv.q``) and ``document_tokens`` (as there)."""

    memory: dict[str, jax.Array]
    segment: SegmentTokens
    conv: ConvCaches
    document_tokens: jax.Array
