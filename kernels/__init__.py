"""Pallas kernels for the fused chunked scans, installed as ``xformjax.kernels``.

The directory sits at the top of the repository and is mapped onto the
subpackage ``xformjax.kernels`` by ``[tool.setuptools.package-dir]`` in
``pyproject.toml``; import it only under that name (a top-level ``kernels``
distribution exists on the registry).

* :func:`linear_attention`: chunked linear attention (lightning-attention-2
  tiling) with no gate, ``g [H]``, ``g [B, T, H]`` or ``gk [B, T, H, K]``;
* :func:`delta_rule`: the chunked (gated) delta rule, β in (0, 2), with the
  WY/UT transform and its triangular inverse inside the kernel.

Both have backward kernels (``jax.custom_vjp``) and two targets, chosen when the
program is lowered (``platform.py``), both flash-linear-attention's chunk-parallel
decomposition (chunk-local work parallel over chunks and heads, only the state
recurrence sequential, over value tiles of the state): ``gpu/`` (Triton) on GPUs,
``tpu/`` (Mosaic; ``chunk_math.py`` holds the in-kernel helpers it shares) on TPUs;
on a CPU they run in Pallas' interpret mode. Gates enter every kernel as the
chunk-local cumulative log decay in a compensated pair ``(hi, lo)`` (``gates.py``),
so a strong gate (a reset, ``g = −1e4``) costs no float32 precision. Users normally
reach them through
:func:`xformjax.ops.linear_attention` / :func:`xformjax.ops.delta_rule` with
``backend=None`` (kernels on GPU/TPU where they cover the call) or
``backend="pallas"``.
"""

from .config import BLOCK_CONFIGS, MAX_HEAD_DIM, BlockConfig, block_config
from .delta_rule import delta_rule
from .linear_attention import linear_attention

AVAILABLE_KERNELS: tuple[str, ...] = ("linear_attention", "delta_rule")

__all__ = [
    "AVAILABLE_KERNELS",
    "BLOCK_CONFIGS",
    "MAX_HEAD_DIM",
    "BlockConfig",
    "block_config",
    "delta_rule",
    "linear_attention",
]
