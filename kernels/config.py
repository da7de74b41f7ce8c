"""Block sizes and launch parameters of every kernel, per target, in one place.

A *target* is what a kernel is lowered for:

* ``"tpu"``: Mosaic TPU. The grid is ``(B·H, chunks)``; the chunk axis is
  sequential (``"arbitrary"``) and the K×V state lives in a VMEM scratch that
  persists across it.
* ``"gpu"``: the Triton lowering of Pallas (CUDA and ROCm). The grid is
  ``(B·H,)`` and each program loops over its chunks with the state in
  registers; ``num_warps``/``num_stages`` are Triton's launch parameters.

Chunk sizes are the token tiles: the scalar-gate and delta-rule kernels build
``C×C`` decay masks and (delta rule) a ``C×C`` triangular inverse per chunk;
the per-channel-gate kernel walks its chunk one source row at a time with
``C×K`` decays, so its chunk is smaller. Feature dimensions are padded to a
power of two of at least ``min_feature``: 16 on GPUs (Triton's tiles must be
powers of two, and ``dot`` needs 16), the 128 lanes on TPUs (so no transposed
matmul operand is an unaligned tile). Zero columns change nothing.
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
      num_warps, num_stages: Triton launch parameters (GPU only).
    """

    chunk_size: int = 64
    channel_chunk_size: int = 16
    inverse_block: int = 16
    min_feature: int = 16
    num_warps: int = 4
    num_stages: int = 1


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


BLOCK_CONFIGS: dict[Target, BlockConfig] = {
    "tpu": BlockConfig(chunk_size=64, channel_chunk_size=16, inverse_block=16, min_feature=128),
    "gpu": BlockConfig(
        chunk_size=64, channel_chunk_size=16, inverse_block=16, num_warps=4, num_stages=1
    ),
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
