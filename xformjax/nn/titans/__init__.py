"""Titans ("Titans: Learning to Memorize at Test Time", Behrouz et al. 2025): the
neural memory as a layer, as a gate and as context.

- :mod:`.base`: :class:`Titans`, registered as ``"titans"``; building it builds the
  class of ``config.titans_variant``.
- :mod:`.mal`: :class:`TitansMAL`, memory as a layer (the shared neural-memory mixer,
  :mod:`xformjax.nn.neural_memory`).
- :mod:`.mag`: :class:`TitansMAG`, sliding-window attention gated by the memory.
- :mod:`.mac`: :class:`TitansMAC`, per-segment attention over the memory's read-out.
- :mod:`.branches`: the attention branch and gated read-out MAG and MAC share, and
  :class:`AttentionTitans`, their base class.
"""

from xformjax.nn.neural_memory import NeuralMemoryMixer
from xformjax.nn.titans.base import Titans
from xformjax.nn.titans.branches import AttentionBranch, AttentionTitans, GatedReadout
from xformjax.nn.titans.mac import TitansMAC
from xformjax.nn.titans.mag import TitansMAG
from xformjax.nn.titans.mal import TitansMAL

__all__ = [
    "AttentionBranch",
    "AttentionTitans",
    "GatedReadout",
    "NeuralMemoryMixer",
    "Titans",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
]
