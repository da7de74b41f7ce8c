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
import math
from typing import Any

from xformjax.nn.config import MixerConfig
from xformjax.nn.mixer import get_mixer
from xformjax.nn.mlp import MLP_KINDS
from xformjax.nn.norms import NORMS
from xformjax.overrides import apply_overrides

ALIASES = {"gdn": "gated_deltanet"}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A decoder-only language model.

    Attributes:
      vocab_size: number of token ids (256 for bytes).
      num_layers: depth.
      layer_pattern: mixer names, comma-separated, repeated to ``num_layers``.
      mixer: every mixer's :class:`MixerConfig` (``d_model`` is the model width).
      mlp: ``"swiglu"``, ``"glu"`` or ``"gelu"``; ``mlp_hidden`` its width
        (``8/3·d_model`` rounded up to a multiple of 8 if ``None``).
      norm: ``"rms"``, ``"layer"`` or ``"srms"``.
      norm_placement: ``"pre"`` (Pre-LN) or ``"peri"`` (Peri-LN: also normalise each
        sub-layer's output before the residual add).
      tie_embeddings: reuse the embedding matrix as the output projection.
      embed_std: standard deviation of the embedding matrix's initialisation
        (``None``: ``d_model ** -0.5``, so tied logits start at unit scale).
      embed_scale: multiplier on the looked-up embeddings (``None``:
        ``d_model ** 0.5``, so the residual stream starts at unit scale per
        coordinate, the scale of every block's output; Gemma's convention).
        ``embed_std=0.02, embed_scale=1.0`` is the GPT-2 convention, under which
        the token embeddings are 1/50 of the first block's output at d_model 64 and
        two softmax-attention layers do not learn associative recall (see
        ``tests/models/test_attention_learning.py``).
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

    def __post_init__(self):
        def bad(message: str):
            raise ValueError(f"LMConfig: {message}")

        if not isinstance(self.mixer, MixerConfig):
            bad(f"`mixer` must be a MixerConfig; got {type(self.mixer).__name__}")
        for name in ("vocab_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"`{name}` must be a positive int; got {value!r}")
        if self.mlp not in MLP_KINDS:
            bad(f"`mlp` must be one of {MLP_KINDS}; got {self.mlp!r}")
        if self.norm not in NORMS:
            bad(f"`norm` must be one of {NORMS}; got {self.norm!r}")
        if self.norm_placement not in ("pre", "peri"):
            bad(f"`norm_placement` must be 'pre' or 'peri'; got {self.norm_placement!r}")
        for name in ("embed_std", "embed_scale"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                bad(f"`{name}` must be a positive finite number or None; got {value!r}")
        try:
            for name in self._pattern():
                get_mixer(name)
        except ValueError as error:
            bad(f"`layer_pattern` {self.layer_pattern!r}: {error}")

    def _pattern(self) -> list[str]:
        names = [ALIASES.get(n.strip(), n.strip()) for n in self.layer_pattern.split(",")]
        if not all(names):
            raise ValueError("empty mixer name")
        return names

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
