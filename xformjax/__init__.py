"""xformjax: efficient sequence mixers for JAX and Flax.

Linear attention, lightning attention, GLA, the DeltaNet family and recurrent
memories, each with parallel, chunked and recurrent forms that agree.

The math lives in :mod:`xformjax.ops` (pure functions); Pallas kernels in
:mod:`xformjax.kernels`.
"""

from xformjax import ops

__all__ = ["ops"]
__version__ = "0.2.0"  # the one place: pyproject reads it
