"""xformjax: efficient sequence mixers for JAX and Flax.

Linear attention, lightning attention, GLA, the DeltaNet family and recurrent
memories, each with parallel, chunked and recurrent forms that agree.

The math lives in :mod:`xformjax.ops` (pure functions); Pallas kernels in
:mod:`xformjax.kernels`. Library-wide switches (value checks under ``jit``) are in
:mod:`xformjax.config`.
"""

from xformjax import config, ops

__all__ = ["config", "ops"]
__version__ = "0.2.0"  # the one place: pyproject reads it
