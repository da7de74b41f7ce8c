"""Block sizes and launch parameters, per target.

A *target* is what a kernel is lowered for:

* ``"tpu"``: Mosaic TPU, the chunk-parallel decomposition of ``kernels/tpu/``:
  chunk-local kernels on grids ``(B·H, chunks)`` (both axes parallel), the state
  recurrences on ``(B·H, V/128, chunks)`` with the chunk axis sequential
  (``"arbitrary"``) and a ``[K, 128]`` state tile in a VMEM scratch. Its tiling is
  ``BLOCK_CONFIGS["tpu"]`` (and ``tpu.common.Tiles``).
* ``"gpu"``: the Triton lowering of Pallas (CUDA and ROCm), the chunk-parallel
  decomposition of ``kernels/gpu/``. Each of its kernels has its tiling in a
  frozen dataclass beside it (``chunk_h.StateConfig``, ``chunk_o.OutputConfig``,
  ``wy.WYConfig``, ``delta_h.DeltaStateConfig``,
  ``gla_common.GLATiles``), chosen so that every kernel fits an H100 at
  K, V ≤ ``MAX_HEAD_DIM`` (the sm_90 compile gate checks it); here only its
  feature padding.

Chunk sizes are the token tiles: the scalar-gate and delta-rule kernels build
``C×C`` decay masks and (delta rule) a ``C×C`` triangular inverse per chunk;
the TPU per-channel-gate kernels (``tpu/gla.py``) walk the diagonal 16×16 blocks
of their chunk one source row at a time with exact ``[16, K]`` decays. Feature
dimensions are padded to a power of two of at least ``min_feature``: 16 on GPUs
(Triton's tiles must be powers of two, and ``dot`` needs 16), the 128 lanes on TPUs
(so no transposed matmul operand is an unaligned tile). Zero columns change nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

#: What a kernel is lowered for (see the module docstring).
Target = Literal["tpu", "gpu"]
TARGETS: tuple[Target, ...] = get_args(Target)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tiling of one target.

    Attributes:
      chunk_size: tokens per chunk for scalar gates and the delta rule.
      channel_chunk_size: tokens per chunk for per-key-channel gates (GLA).
      inverse_block: diagonal block of the in-kernel ``(I + A)⁻¹`` substitution
        (a power of two).
      min_feature: feature widths are padded to a power of two at least this.
    """

    chunk_size: int = 64
    channel_chunk_size: int = 16
    inverse_block: int = 16
    min_feature: int = 16


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    """The static options of one chunk-scan kernel call (hashable: ``custom_vjp``'s
    non-differentiable argument).

    Attributes:
      scale: the query scale.
      chunk_size: tokens per chunk.
      inverse_block: diagonal block of the in-kernel ``(I + A)⁻¹`` (delta rule).
      target: what the kernel is lowered for.
      interpret: run Pallas' interpreter instead of compiling.
    """

    scale: float
    chunk_size: int
    inverse_block: int
    target: Target
    interpret: bool


#: The widest head dimension (K or V) the kernels are proven for: the sm_90 compile gate's
#: largest case, (K, V) = (256, 256) (``tests/kernels/test_sm90_gate.py``). Wider heads run
#: in XLA, with a warning (``xformjax.ops.common.kernel_gap``).
MAX_HEAD_DIM = 256

BLOCK_CONFIGS: dict[Target, BlockConfig] = {
    "tpu": BlockConfig(chunk_size=64, channel_chunk_size=64, inverse_block=16, min_feature=128),
    # The GPU kernels read only the feature padding (and the chunk) from here.
    "gpu": BlockConfig(chunk_size=64, min_feature=16),
}


def block_config(target: Target) -> BlockConfig:
    """The tiling used for ``target`` (``"tpu"`` or ``"gpu"``)."""
    if target not in BLOCK_CONFIGS:
        raise ValueError(f"unknown kernel target {target!r}; expected one of {TARGETS}")
    return BLOCK_CONFIGS[target]


def padded_feature(dim: int, target: Target) -> int:
    """The feature width a kernel runs at on ``target``: the next power of two, at least
    the target's ``min_feature``."""
    width = block_config(target).min_feature
    while width < dim:
        width *= 2
    return width
