"""Text corpora: the per-file split, the array_record round trip, packing."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from xformjax import data


def _make_corpus(root: pathlib.Path, count: int = 60) -> dict[str, bytes]:
    files = {}
    for i in range(count):
        path = root / f"pkg{i % 3}" / f"module_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"# file {i}\n" + "x = 1  # é ünïcode\n" * (i % 7 + 1)
        path.write_bytes(text.encode())
        files[str(path.relative_to(root))] = text.encode()
    (root / "notes.txt").write_text("not python")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skip.py").write_text("skipped")
    return files


def test_split_is_by_file_and_deterministic(tmp_path):
    files = _make_corpus(tmp_path)
    spec = data.CorpusSpec(root=str(tmp_path), validation_fraction=0.25)
    splits = data.split_files(spec)
    names = {s: {str(p.relative_to(tmp_path)) for p in paths} for s, paths in splits.items()}
    assert names["train"] | names["validation"] == set(files)
    assert not names["train"] & names["validation"]
    assert 5 <= len(names["validation"]) <= 25
    assert all(spec.is_validation(n) for n in names["validation"])
    assert data.split_files(spec) == splits


def test_corpus_round_trips_bytes_through_array_record(tmp_path):
    root = tmp_path / "texts"
    files = _make_corpus(root)
    spec = data.CorpusSpec(root=str(root), validation_fraction=0.25)
    sources = data.prepare_corpus(spec, data_dir=tmp_path / "tfds")
    seen = {}
    for split in ("train", "validation"):
        for i in range(len(sources[split])):
            example = sources[split][i]
            path = example["path"].decode()
            seen[path] = bytes(np.asarray(example["text"], np.uint8))
            assert spec.is_validation(path) == (split == "validation")
    assert seen == files
    assert list((tmp_path / "tfds").rglob("*.array_record*"))
    again = data.prepare_corpus(spec, data_dir=tmp_path / "tfds")  # reuses the build
    assert len(again["train"]) == len(sources["train"])


def test_stdlib_corpus_lists_this_pythons_sources():
    spec = data.stdlib_corpus()
    files = spec.files()
    names = {p.name for p in files}
    assert {"os.py", "__init__.py", "decoder.py"} <= names
    assert not any("site-packages" in p.parts for p in files)
    splits = data.split_files(spec)
    assert 0.005 < len(splits["validation"]) / len(files) < 0.05


KEYS = ("mask", "segment_ids", "positions")


def test_packed_language_model_batches(tmp_path):
    documents = [
        {"text": np.frombuffer(f"document {i} ".encode() * (i + 1), np.uint8)} for i in range(12)
    ]
    dataset = data.lm_dataset(documents, seq_len=16, batch_size=2, shuffle=False, repeat=False)
    batches = list(dataset)
    stream = b"".join(bytes(d["text"]) + bytes([data.DOCUMENT_END]) for d in documents)
    rows = [row for b in batches for row in b["inputs"]]
    for i, row in enumerate(rows):
        assert bytes(row.astype(np.uint8)) == stream[17 * i : 17 * i + 16]
    # the document of every byte of the stream, and each row's documents numbered from 1
    document = np.cumsum([0] + [byte == data.DOCUMENT_END for byte in stream[:-1]])
    packed = [row for b in batches for row in zip(*(b[k] for k in KEYS))]
    for i, (mask, ids, positions) in enumerate(packed):
        window = document[17 * i : 17 * i + 17]
        expected_ids = window - window[0] + 1
        np.testing.assert_array_equal(ids, expected_ids[:-1])
        starts = np.flatnonzero(np.diff(expected_ids[:-1])) + 1
        expected_positions = np.arange(16) - np.maximum.accumulate(
            np.where(np.isin(np.arange(16), starts), np.arange(16), 0)
        )
        np.testing.assert_array_equal(positions, expected_positions)
        # a target in the next document (after a DOCUMENT_END) is not trained on
        np.testing.assert_array_equal(mask, expected_ids[1:] == expected_ids[:-1])
    assert sum(float(m.sum()) for m, _, _ in packed) < 16 * len(packed)
    for b in batches:
        assert np.array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        assert {k: b[k].shape for k in KEYS} == dict.fromkeys(KEYS, (2, 16))
    with pytest.raises(ValueError, match="seq_len"):
        data.lm_dataset(documents, seq_len=0, batch_size=2)


def test_lm_iterator_resumes_from_its_state():
    documents = [{"text": np.frombuffer(bytes(range(1 + i, 40 + i)), np.uint8)} for i in range(30)]
    dataset = data.lm_dataset(documents, seq_len=24, batch_size=3, seed=5)
    iterator = iter(dataset)
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["inputs"] for _ in range(5)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for batch in expected:
        assert np.array_equal(next(resumed)["inputs"], batch)
