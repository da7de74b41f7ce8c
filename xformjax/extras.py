"""The optional parts of the install, and the clear error when one is missing.

``pip install xformjax`` brings the core: the ops, the layers, the language model
and sharding (jax, flax, optax, numpy). The trainer, the data pipelines and the
``xformjax`` command need the ``train`` extra::

    pip install "xformjax[train]"

:mod:`xformjax.train` and :mod:`xformjax.data` call :func:`require_extra` first, so
importing them without it says which extra to install instead of failing on the
first missing module deep inside.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

#: The modules each extra provides (the import names, not the distributions).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": (
        "yaml",
        "tqdm",
        "orbax.checkpoint",
        "grain",
        "tensorflow_datasets",
        "array_record",
        "tensorboardX",
    ),
}


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The names in ``modules`` that cannot be imported here."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing (or blocked)
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`ImportError` naming ``pip install "xformjax[extra]"`` when a module
    of ``extra`` is missing; ``feature`` says what needs it (``"xformjax.train"``)."""
    missing = missing_modules(EXTRA_MODULES[extra])
    if missing:
        raise ImportError(
            f"{feature} needs the {extra!r} extra, which this install lacks (missing: "
            f'{", ".join(missing)}). Install it with: pip install "xformjax[{extra}]"'
        )
