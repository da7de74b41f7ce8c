"""Text corpora as TFDS datasets in ``array_record`` files (no TensorFlow needed).

:class:`TextFiles` is a TFDS builder over a directory of text files matching a glob:
one example per file, ``{"text": uint8 bytes, "path": relative path}``, split into
``train`` and ``validation`` *by file*: a file goes to validation when the first
byte of ``sha256(relative path)`` is below ``256 · validation_fraction`` — the
same files on every machine, whatever the order of listing.

The default corpus is the running Python's own standard library (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded): real text that is
on every machine. ``prepare_corpus`` builds a corpus once into ``data_dir`` (the
dataset's name and config are derived from the directory, glob and a fingerprint
of the file list, so a changed directory gets a fresh build) and returns its grain
data sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig
from typing import Any, cast

import numpy as np

DEFAULT_DATA_DIR = pathlib.Path.home() / ".cache" / "xformjax" / "tfds"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Which files make a corpus."""

    root: str
    pattern: str = "**/*.py"
    validation_fraction: float = 0.02
    exclude: tuple[str, ...] = ("site-packages",)

    def files(self) -> list[pathlib.Path]:
        """Matching files, sorted by relative path."""
        root = pathlib.Path(self.root)
        if not root.is_dir():
            raise ValueError(f"corpus directory {self.root!r} does not exist")
        found = sorted(
            p
            for p in root.glob(self.pattern)
            if p.is_file() and not any(part in self.exclude for part in p.relative_to(root).parts)
        )
        if not found:
            raise ValueError(f"no files match {self.pattern!r} under {self.root!r}")
        return found

    def is_validation(self, relative_path: str) -> bool:
        first_byte = hashlib.sha256(relative_path.encode()).digest()[0]
        return first_byte < 256 * self.validation_fraction

    def fingerprint(self) -> str:
        """Hash of the spec and of every file's relative path and size."""
        digest = hashlib.sha256(repr(dataclasses.astuple(self)).encode())
        root = pathlib.Path(self.root)
        for path in self.files():
            digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
        return digest.hexdigest()[:16]


def stdlib_corpus() -> CorpusSpec:
    """The Python standard library's ``.py`` sources on this machine."""
    return CorpusSpec(root=sysconfig.get_paths()["stdlib"])


def split_files(spec: CorpusSpec) -> dict[str, list[pathlib.Path]]:
    """``{"train": [...], "validation": [...]}`` by the spec's per-file rule."""
    root = pathlib.Path(spec.root)
    splits: dict[str, list[pathlib.Path]] = {"train": [], "validation": []}
    for path in spec.files():
        split = "validation" if spec.is_validation(str(path.relative_to(root))) else "train"
        splits[split].append(path)
    return splits


def _builder_class():
    import tensorflow_datasets as tfds  # heavy import: only when a corpus is built

    class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """One example per text file: ``{"text": uint8 bytes, "path": str}``."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, spec: CorpusSpec, **kwargs):
            self.spec = spec
            super().__init__(**kwargs)

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                    "path": tfds.features.Text(),
                }
            )
            return tfds.core.DatasetInfo(
                builder=self, features=features, description=f"text files {self.spec}"
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                split: self._generate_examples(paths)
                for split, paths in split_files(self.spec).items()
            }

        def _generate_examples(self, paths):
            root = pathlib.Path(self.spec.root)
            for path in paths:
                relative = str(path.relative_to(root))
                yield (
                    relative,
                    {"text": np.frombuffer(path.read_bytes(), np.uint8), "path": relative},
                )

    return TextFiles


def prepare_corpus(
    spec: CorpusSpec | None = None, data_dir: str | pathlib.Path | None = None
) -> dict[str, Any]:
    """Build the corpus once (array_record) and return ``{"train", "validation"}``
    grain-compatible random-access sources of ``{"text", "path"}`` examples."""
    spec = stdlib_corpus() if spec is None else spec
    data_dir = pathlib.Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
    builder_cls = _builder_class()
    name = f"text_files_{spec.fingerprint()}"
    cls = type(name, (builder_cls,), {"name": name}, skip_registration=True)
    builder = cls(spec=spec, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return cast(dict[str, Any], builder.as_data_source())  # one source per split
