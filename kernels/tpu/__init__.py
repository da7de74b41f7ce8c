"""The TPU (Mosaic) kernels: flash-linear-attention's chunk-parallel decomposition.

Like ``kernels/gpu/``: chunk-local work in kernels parallel over chunks (grid
``(B·H, N)``, ``("parallel", "parallel")``) and only the state recurrence sequential
(grid ``(B·H, V/BV, N)``, ``("parallel", "parallel", "arbitrary")``), tiled over
``V``. Modules:

* ``common.py``: blocks, launch parameters, VMEM accounting, matmuls (shared);
* ``state.py``: the state recurrences (scalar or per-channel gates, linear
  attention or the delta rule), forward and backward;
* ``chunk.py``: the scalar-gate chunk-local kernels (delta rule WY/UT transform,
  outputs, their backward); ``gla.py``: the per-channel ones;
* ``attention.py``: the ``custom_vjp`` scalar linear attention and GLA share;
* ``linear_attention.py``, ``gla.py``, ``delta_rule.py``: the families.
"""
