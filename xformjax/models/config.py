"""``LMConfig``: the language model's frozen configuration, with named presets.

The stack is described by ``layer_pattern``, a comma-separated list of mixer
names from :data:`xformjax.nn.MIXERS` repeated (and cut) to ``num_layers``:
``"gated_deltanet,gated_deltanet,gated_deltanet,attn"`` with 8 layers is two
rounds of three gated DeltaNet layers and one attention layer. ``gdn`` is accepted
as a short name of ``gated_deltanet``.

    >>> from xformjax.models import LMConfig
    >>> config = LMConfig.preset("tiny", num_layers=3, **{"mixer.num_heads": 4})
    >>> config.layer_names()
    ('gated_deltanet', 'attn', 'gated_deltanet')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from xformjax.fields import check_bool, check_choice, check_float, check_int
from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import MIXERS, get_mixer
from xformjax.nn.mlp import MLP_KINDS
from xformjax.nn.norms import NORMS
from xformjax.overrides import apply_overrides

ALIASES = {"gdn": "gated_deltanet"}
NORM_PLACEMENTS = ("pre", "peri")
#: ``LMConfig.remat``'s named rematerialisation policies (see :class:`LMConfig`)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A decoder-only language model.

    Every field is checked at construction (``TypeError`` for a value of the wrong
    type, ``ValueError`` for one out of range, as ``"LMConfig: `field` must be …; got
    …"``); the mixer config checks its own fields.

    Attributes:
      vocab_size: number of token ids (256 for bytes); int ≥ 1.
      num_layers: depth; int ≥ 1.
      layer_pattern: mixer names, comma-separated, repeated to ``num_layers``
        (registered names of :data:`xformjax.nn.MIXERS`, or ``gdn``).
      mixer: every mixer's :class:`MixerConfig` (``d_model`` is the model width; its
        ``norm_eps`` and dtypes also apply to the blocks' norms and MLPs).
      mlp: ``"swiglu"``, ``"glu"`` or ``"gelu"``; ``mlp_hidden`` its width, int ≥ 1
        (``8/3·d_model`` rounded up to a multiple of 8 if ``None``).
      norm: ``"rms"``, ``"layer"`` or ``"srms"``.
      norm_placement: ``"pre"`` (Pre-LN) or ``"peri"`` (Peri-LN: also normalise each
        sub-layer's output before the residual add).
      tie_embeddings: reuse the embedding matrix as the output projection.
      embed_std: standard deviation of the embedding matrix's initialisation, finite
        > 0 (``None``: ``d_model ** -0.5``, so tied logits start at unit scale).
      embed_scale: multiplier on the looked-up embeddings, finite > 0 (``None``:
        ``d_model ** 0.5``, so the residual stream starts at unit scale per
        coordinate, the scale of every block's output; Gemma's convention).
        ``embed_std=0.02, embed_scale=1.0`` is the GPT-2 convention, under which
        the token embeddings are 1/50 of the first block's output at d_model 64 and
        two softmax-attention layers do not learn associative recall (see
        ``tests/models/test_attention_learning.py``).
      remat: what each block keeps for the backward pass (``jax.checkpoint`` around
        every block): ``"none"`` (no rematerialisation: every intermediate is kept),
        ``"full"`` (only the block's inputs: the whole block is recomputed),
        ``"dots"`` (matrix-multiply outputs kept, the rest recomputed:
        ``jax.checkpoint_policies.dots_saveable``) or ``"dots_no_batch"`` (only
        those without batch dimensions, i.e. the projections' outputs:
        ``dots_with_no_batch_dims_saveable``). Values and gradients do not change.
      scan_layers: stack the layers of each round of ``layer_pattern`` and run the
        rounds with ``jax.lax.scan``, so the compiled program holds one round of
        blocks whatever the depth; the pattern's length must divide ``num_layers``.
        Parameters then gain a leading (unsharded) axis of ``num_layers / period``
        rounds and the cache holds one stacked state per pattern entry (see
        :class:`~xformjax.models.LanguageModel`).
    """

    vocab_size: int = 256
    num_layers: int = 4
    layer_pattern: str = "gated_deltanet,gated_deltanet,gated_deltanet,attn"
    mixer: MixerConfig = dataclasses.field(default_factory=MixerConfig)
    mlp: str = "swiglu"
    mlp_hidden: int | None = None
    norm: str = "rms"
    norm_placement: str = "pre"
    tie_embeddings: bool = True
    embed_std: float | None = None
    embed_scale: float | None = None
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        owner = "LMConfig"
        if not isinstance(self.mixer, MixerConfig):
            raise TypeError(
                f"{owner}: `mixer` must be a MixerConfig; got {type(self.mixer).__name__}"
            )
        for name in ("vocab_size", "num_layers"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "mlp_hidden", self.mlp_hidden, optional=True)
        check_choice(owner, "mlp", self.mlp, MLP_KINDS)
        check_choice(owner, "norm", self.norm, NORMS)
        check_choice(owner, "norm_placement", self.norm_placement, NORM_PLACEMENTS)
        check_bool(owner, "tie_embeddings", self.tie_embeddings)
        check_choice(owner, "remat", self.remat, REMAT_POLICIES)
        check_bool(owner, "scan_layers", self.scan_layers)
        for name in ("embed_std", "embed_scale"):
            check_float(owner, name, getattr(self, name), above=0, optional=True)
        if not isinstance(self.layer_pattern, str):
            raise TypeError(
                f"{owner}: `layer_pattern` must be a comma-separated string of mixer names; "
                f"got {self.layer_pattern!r} ({type(self.layer_pattern).__name__})"
            )
        try:
            for name in self._pattern():
                get_mixer(name)
        except ValueError as error:
            raise ValueError(
                f"{owner}: `layer_pattern` must list registered mixer names; "
                f"got {self.layer_pattern!r}: {error}"
            ) from None
        if self.mixer.short_conv and not any(
            get_mixer(name).short_conv_option for name in self._pattern()
        ):
            raise ValueError(
                f"{owner}: `mixer.short_conv` is an option of "
                f"{', '.join(n for n, c in sorted(MIXERS.items()) if c.short_conv_option)}; "
                f"no layer of layer_pattern {self.layer_pattern!r} has it"
            )
        if self.scan_layers and self.num_layers % self.period:
            raise ValueError(
                f"{owner}: `scan_layers` needs the pattern's length to divide `num_layers`; "
                f"got {self.period} mixers in `layer_pattern` {self.layer_pattern!r} and "
                f"num_layers={self.num_layers}"
            )

    def _pattern(self) -> list[str]:
        names = [ALIASES.get(n.strip(), n.strip()) for n in self.layer_pattern.split(",")]
        if not all(names):
            raise ValueError("empty mixer name")
        return names

    @property
    def period(self) -> int:
        """The number of mixers in ``layer_pattern`` (one round of the stack)."""
        return len(self._pattern())

    @property
    def d_model(self) -> int:
        return self.mixer.d_model

    @property
    def embedding_std(self) -> float:
        """The embedding initialisation's standard deviation (``embed_std`` resolved)."""
        return self.d_model**-0.5 if self.embed_std is None else float(self.embed_std)

    @property
    def embedding_scale(self) -> float:
        """The multiplier on looked-up embeddings (``embed_scale`` resolved)."""
        return self.d_model**0.5 if self.embed_scale is None else float(self.embed_scale)

    @property
    def hidden(self) -> int:
        """The MLP width."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-(8 * self.d_model // 3) // 8) * 8

    def layer_names(self) -> tuple[str, ...]:
        """The mixer name of every layer."""
        pattern = self._pattern()
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    def replace(self, **overrides: Any) -> LMConfig:
        """A copy with fields replaced; ``"mixer.<field>"`` keys reach the mixer config
        (see :func:`xformjax.overrides.apply_overrides`)."""
        return apply_overrides(self, overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LMConfig:
        """The preset ``name`` (``tiny``, ``small``, ``base``) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)


PRESETS: dict[str, LMConfig] = {
    # seconds on a laptop CPU: tests, smoke runs
    "tiny": LMConfig(
        num_layers=2,
        layer_pattern="gated_deltanet,attn",
        mixer=MixerConfig(d_model=64, num_heads=2, chunk_size=32, max_seq_len=256),
    ),
    # minutes on a CPU: the experiments' language models
    "small": LMConfig(
        num_layers=6,
        layer_pattern="gated_deltanet,gated_deltanet,attn",
        mixer=MixerConfig(d_model=256, num_heads=4, max_seq_len=1024),
    ),
    # an accelerator-sized hybrid (≈ 90M parameters with a byte vocabulary)
    "base": LMConfig(
        num_layers=12,
        layer_pattern="gated_deltanet,gated_deltanet,gated_deltanet,attn",
        mixer=MixerConfig(d_model=768, num_heads=12, max_seq_len=2048),
    ),
}
