"""``titans``: the registered Titans mixer, which builds the variant its config names.

"Titans: Learning to Memorize at Test Time", Behrouz et al. 2025. A per-head MLP
memory ``M_W`` is trained at test time on ``½‖M_W(k_t) − v_t‖²`` with momentum and
forgetting (the neural memory, :mod:`xformjax.nn.neural_memory`); the paper puts it
in a layer three ways, picked by ``config.titans_variant``:

- ``"mal"``, memory as a layer (:class:`~xformjax.nn.titans.mal.TitansMAL`): the
  memory is the mixer, ``o_t = M_{W_t}(q_t)``,
  ``y_t = W_o · (SiLU(x_t W_g) ⊙ RMSNorm(o_t))``.
- ``"mag"``, memory as a gate (:class:`~xformjax.nn.titans.mag.TitansMAG`):
  sliding-window attention with persistent tokens ``a_t``, gated by MAL's memory
  read, ``y_t = W_o · merge(RMSNorm_a(a_t) ⊙ σ(RMSNorm_m(o_t)))``.
- ``"mac"``, memory as context (:class:`~xformjax.nn.titans.mac.TitansMAC`): per
  segment, attention over ``[persistent, M(q), tokens]``, and the memory learns
  from the attention's output.

``nn.MIXERS["titans"]`` is :class:`Titans`; calling it with a config returns an
instance of the variant's class (all three subclass :class:`Titans`), so
``Titans(config, rngs=...)`` builds the same parameters and computes the same
numbers as the variant's class itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from flax import nnx

from xformjax.nn.config import MixerConfig, TitansVariant
from xformjax.nn.mixer import register
from xformjax.nn.neural_memory import NeuralMemoryMixer

# nnx.Module's own metaclass: at run time taken from the class rather than imported
# from a module path that flax may move; type checkers read flax's declaration.
if TYPE_CHECKING:
    from flax.nnx.module import ModuleMeta as _ModuleMeta
else:
    _ModuleMeta = type(nnx.Module)


class _BuildsItsVariant(_ModuleMeta):
    """Metaclass of :class:`Titans`: calling :class:`Titans` itself (not one of its
    variants) builds the class registered for ``config.titans_variant``."""

    def __call__(cls, config: MixerConfig, *args: Any, **kwargs: Any) -> Any:
        titans = cast("type[Titans]", cls)
        if titans.variant is None:
            return titans.variant_class(config)(config, *args, **kwargs)
        return super().__call__(config, *args, **kwargs)


@register("titans")
class Titans(NeuralMemoryMixer, metaclass=_BuildsItsVariant):
    """Titans: memory as a layer (MAL), as a gate (MAG) or as context (MAC); building
    ``Titans(config, ...)`` returns the variant ``config.titans_variant`` names (see
    the module docstring)."""

    #: the variant a subclass implements (``None``: this dispatching base).
    variant: ClassVar[TitansVariant | None] = None
    #: variant name → class, filled as the subclasses are defined.
    variants: ClassVar[dict[str, type[Titans]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "variant" in vars(cls) and cls.variant is not None:
            Titans.variants[cls.variant] = cls

    @classmethod
    def variant_class(cls, config: MixerConfig) -> type[Titans]:
        """The class of ``config.titans_variant`` (MAL for anything but a
        :class:`MixerConfig`, which then rejects it)."""
        if not isinstance(config, MixerConfig):
            return cls.variants["mal"]
        return cls.variants[config.titans_variant]
