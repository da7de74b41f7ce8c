"""The train step of ``xformjax train`` compiled for TPU v5e slices by libtpu on this CPU
(``xformjax aot``, :mod:`xformjax.train.aot`).

Two programs of the ``default`` preset (three gated DeltaNet layers and one
attention layer), about a minute each on 2 cores, on ``v5e:2x4`` (8 chips), with a
(data, seq) mesh at T = 8K and at T = 32K (one test, so that pytest-xdist never
compiles a program twice); and one of the larger ``base`` model (d_model 768, K = V =
128 heads, bf16, at four of its twelve layers) with an (fsdp, tensor, seq) mesh at
T = 8K. Each must
compile with the Pallas kernels (Mosaic custom calls) and fit a chip's 16 GiB; in
each, every linear layer makes exactly one LASP-2 all-gather of its (transition,
contribution) pairs in the forward and one mirror collective in the backward, of
the pairs' size; from 8K to 32K no collective outside softmax attention's LASP-2H
changes. The first program is compiled through the ``xformjax aot`` command, whose
report is checked, as are its exit codes on errors. A pure data-parallel mesh
(``mesh.data=4``, ``mesh.seq=1``) compiles too, its kernels run per device. The whole
``base`` preset at 8K and 32K, and the v5e:4x4 slice, are in
``experiments/results/tpu_aot.md`` (``python -m experiments.bench.tpu_aot``): their
compiles take minutes each.
"""

from __future__ import annotations

import collections
import pathlib
import re

import pytest

from xformjax.parallel import lasp, lasp2h, tpu
from xformjax.train import aot, cli, load_config

pytestmark = pytest.mark.tpu_aot

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIBTPU = tpu.libtpu_path(ROOT / ".libtpu") or tpu.libtpu_path()
if LIBTPU is None:
    pytest.skip(
        "libtpu is not installed (make .libtpu/.installed, or pip install 'xformjax[tpu]'): "
        "the TPU train-step compile is not checked",
        allow_module_level=True,
    )

TOPOLOGY = "v5e:2x4"
MESHES = {
    "data-seq": ["mesh.data=2", "mesh.seq=4"],
    "fsdp-tensor-seq": ["mesh.fsdp=2", "mesh.tensor=2", "mesh.seq=2"],
}
#: (mesh, T) of the programs compiled
CASES = (("data-seq", 8192), ("data-seq", 32768), ("fsdp-tensor-seq", 8192))
#: The larger preset, ``base`` (d_model 768, 6 heads of K = V = 128, bf16), at a third of
#: its depth (three gated DeltaNet layers and one attention layer, as ``default``): its
#: 12 layers compile in about two minutes here, four in under one. The whole ``base`` at
#: 8K and 32K is in ``experiments/results/tpu_aot.md``.
LARGER = {"base": ["model.num_layers=4"]}
BATCH = 2  # one sequence per batch shard
#: the packing's small collectives (where documents begin across shard edges, and their
#: prefix count over the sharded sequence): 4 B to 512 B at 8K-32K tokens
SMALL_BYTES = 1024


def _overrides(mesh: str, length: int) -> list[str]:
    return [
        f"train.seq_len={length}",
        f"model.mixer.max_seq_len={length}",
        f"train.batch_size={BATCH}",
        *MESHES[mesh],
    ]


class _Capture:
    """Standard output and error of ``cli.main`` as text."""

    def __enter__(self):
        import contextlib
        import io

        self._buffer = io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._buffer))
        self._stack.enter_context(contextlib.redirect_stderr(self._buffer))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.text = self._buffer.getvalue()


def _linear_layers(config) -> int:
    return sum(name != "attn" for name in config.model.layer_names())


def _pair_bytes(config, mesh: dict[str, int]) -> int:
    """The gathered ``(transition, contribution)`` pairs of one gated DeltaNet layer on
    one chip: ``shards × B_local × H_local × (K·K + K·V)`` float32 numbers."""
    mixer = config.model.mixer
    key_dim = mixer.d_model // mixer.num_heads
    batch_local = config.train.batch_size // (mesh["data"] * mesh["fsdp"])
    heads_local = mixer.num_heads // mesh["tensor"]
    return 4 * mesh["seq"] * batch_local * heads_local * (key_dim * key_dim + key_dim * key_dim)


def _check_program(
    report: aot.AotReport, case: tuple[str, int], config_name: str = "default"
) -> None:
    """What every compiled program must show (see the module docstring)."""
    config = load_config(config_name, _overrides(*case) + LARGER.get(config_name, []))
    assert report.topology == TOPOLOGY and report.chip == "v5e"
    assert report.hbm_bytes == 16 * tpu.GIB
    assert report.fits and 0 < report.peak_bytes < 16 * tpu.GIB, report.format()
    assert report.temp_bytes > 0 and report.argument_bytes > 0
    # the outputs alias the donated state: only the metrics are new
    assert report.output_bytes - report.alias_bytes < 4096
    assert report.flops > 0 and report.batch == (1, BATCH, case[1])
    layers = _linear_layers(config)
    # every linear layer runs Pallas TPU kernels (forward, transition and backward)
    assert report.mosaic_kernels >= 3 * layers
    # LASP-2: one all-gather of the pairs per linear layer forward...
    pairs, shards = _pair_bytes(config, dict(report.mesh)), dict(report.mesh)["seq"]
    forward = report.scoped(lasp.SCOPE, backward=False)
    assert [(c.kind, c.array_bytes) for c in forward] == [("all-gather", (pairs,))] * layers
    # ...and its transpose backward: a reduce-scatter of the pairs' cotangents, or the
    # all-reduce (then a slice) XLA:TPU may rewrite it into, into which XLA's combiner
    # may merge a scalar reduction
    backward = report.scoped(lasp.SCOPE, backward=True)
    assert len(backward) == layers, backward
    for item in backward:
        if item.kind == "reduce-scatter":
            assert item.array_bytes == (pairs // shards,), item
        else:
            assert item.kind == "all-reduce" and item.array_bytes[0] == pairs, item
            assert sum(item.array_bytes[1:]) <= 16, item
    # softmax attention (LASP-2H): one all-gather of the keys and values forward, and one
    # of the keys' document ids (int32 [B_local, T]: text batches are packed documents)
    gathers = report.scoped(lasp2h.SCOPE, backward=False)
    assert [c.kind for c in gathers] == ["all-gather", "all-gather"]
    mesh = dict(report.mesh)
    batch_local = config.train.batch_size // (mesh["data"] * mesh["fsdp"])
    assert (4 * batch_local * case[1],) in [c.array_bytes for c in gathers], gathers


def test_data_seq_mesh_through_the_command_at_8k_and_32k(monkeypatch):
    """``xformjax aot`` compiles the 8K program and prints its report; the 32K program
    has the same collectives except softmax attention's."""
    reports = []
    real = aot.compile_train_step

    def spy(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(aot, "compile_train_step", spy)
    short_case, long_case = CASES[0], CASES[1]
    with _Capture() as capture:
        code = cli.main(
            ["aot", "--config", "default", "--topology", TOPOLOGY, "--libtpu", str(LIBTPU)]
            + ["--set", *_overrides(*short_case)]
        )
    assert code == 0, capture.text
    short = reports[0]
    assert short.format() in capture.text
    for needle in (
        f"topology {TOPOLOGY}: 8 v5e chips, mesh data=2 fsdp=1 tensor=1 seq=4",
        "arguments",
        "temporaries",
        "outputs",
        "of 16.00 GiB: fits",
        "step FLOPs per chip:",
        "compiled in",
    ):
        assert needle in capture.text, needle
    assert re.search(r"\n  all-gather +lasp2 forward +3 × ", capture.text), capture.text
    _check_program(short, short_case)

    long = real(load_config("default", _overrides(*long_case)), TOPOLOGY, LIBTPU)
    _check_program(long, long_case)

    def signature(report, *, attention: bool):
        items = (c for c in report.collectives if c.in_scope(lasp2h.SCOPE) == attention)
        return collections.Counter(
            (c.kind, c.array_bytes, c.backward) for c in items if c.bytes > SMALL_BYTES
        )

    # no collective outside LASP-2H changes from 8K to 32K, LASP-2's included...
    assert signature(short, attention=False) == signature(long, attention=False)
    # ...but for the packing's small exchanges (where a document begins across a shard
    # edge; its prefix count, whose all-reduce XLA sizes by T: 256 B at 8K, 512 B at 32K)
    for report in (short, long):
        small = [c for c in report.collectives if c.bytes <= SMALL_BYTES]
        assert small and all(c.kind != "all-gather" for c in small), small
    # ...while LASP-2H's gathered keys and values grow 4× (the programs do differ in T)
    gathered = lambda r: [c.bytes for c in r.scoped(lasp2h.SCOPE, backward=False)]
    assert gathered(long) == [4 * b for b in gathered(short)]


def test_fsdp_tensor_seq_mesh_with_the_larger_model():
    case = CASES[2]
    config = load_config("base", _overrides(*case) + LARGER["base"])
    assert config.model.mixer.d_model // config.model.mixer.num_heads == 128
    report = aot.compile_train_step(config, TOPOLOGY, LIBTPU)
    assert dict(report.mesh) == {"data": 1, "fsdp": 2, "tensor": 2, "seq": 2}
    _check_program(report, case, "base")


def test_a_data_parallel_mesh_runs_the_kernels_per_device():
    """Without sequence parallelism (``mesh.seq=1``) the linear layers call their ops
    inside a ``shard_map`` over every axis (``parallel.block_parallel``): XLA cannot
    partition a Mosaic kernel, so the step would not compile otherwise. Only the
    gradients' all-reduces cross chips."""
    config = load_config("default", ["mesh.data=4", "train.batch_size=4"])
    report = aot.compile_train_step(config, "v5e:2x2", LIBTPU)
    assert dict(report.mesh) == {"data": 4, "fsdp": 1, "tensor": 1, "seq": 1}
    assert report.fits and report.batch == (1, 4, config.train.seq_len)
    # each linear layer: forward (states, outputs) and backward kernels, W/U for the delta rule
    assert report.mosaic_kernels >= 3 * _linear_layers(config)
    assert not report.scoped(lasp.SCOPE, backward=False)
    assert {c.kind for c in report.collectives} == {"all-reduce"}


def _fake_report(**changes) -> aot.AotReport:
    fields = dict(
        topology=TOPOLOGY,
        chip="v5e",
        mesh=(("data", 2), ("fsdp", 1), ("tensor", 1), ("seq", 4)),
        batch=(1, 2, 8192),
        argument_bytes=10 << 20,
        output_bytes=10 << 20,
        alias_bytes=10 << 20,
        temp_bytes=3 << 30,
        code_bytes=100 << 20,
        hbm_bytes=16 * tpu.GIB,
        flops=1.5e11,
        collectives=(),
        mosaic_kernels=42,
        compile_seconds=60.0,
    )
    return aot.AotReport(**{**fields, **changes})


def test_the_report_adds_up():
    report = _fake_report()
    assert report.peak_bytes == (10 << 20) + (3 << 30) + (100 << 20) and report.fits
    assert not _fake_report(temp_bytes=16 << 30).fits
    assert "  total           3.11 GiB of 16.00 GiB: fits" in report.format()


def test_the_command_exits_1_when_the_step_does_not_fit(monkeypatch):
    monkeypatch.setattr(
        aot, "compile_train_step", lambda *a, **k: _fake_report(temp_bytes=17 * tpu.GIB)
    )
    with _Capture() as capture:
        code = cli.main(["aot", "--topology", TOPOLOGY, "--libtpu", str(LIBTPU)])
    assert code == 1
    assert "DOES NOT FIT" in capture.text
    assert "error: the step needs 17.11 GiB per chip; a v5e chip has 16 GiB" in capture.text

    def refused(*args, **kwargs):  # what XLA:TPU's own refusal becomes
        raise aot.DoesNotFitError("v5e:2x4: Ran out of memory on HBM")

    monkeypatch.setattr(aot, "compile_train_step", refused)
    with _Capture() as capture:
        code = cli.main(["aot", "--topology", TOPOLOGY, "--libtpu", str(LIBTPU)])
    assert code == 1 and "error: v5e:2x4: Ran out of memory on HBM" in capture.text


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--topology", "v9z:2x2"], "unknown TPU topology 'v9z:2x2'"),
        (["--topology", "v5e:2x2", "--libtpu", "/nonexistent/libtpu.so"], "libtpu not found"),
        (["--topology", "v5e:2x2", "--set", "mesh.data=2"], "uses 2 of the 4 devices"),
        (["--topology", "v5e:2x2", "--set", "mesh.data=8"], "needs 8 devices; 4 available"),
        (["--topology", "v5e:2x2", "--set", "mesh.data=4", "train.batch_size=6"], "batch_size=6"),
        (
            ["--topology", "v5e:2x2", "--set", "mesh.seq=4", "train.seq_len=258"],
            "sequence length 258",
        ),
        (["--topology", "v5e:2x2", "--set", "mesh.tensor=4", "model.mixer.num_heads=2"], "heads"),
        (["--config", "nonexistent", "--topology", "v5e:2x2"], "unknown config"),
    ],
)
def test_the_command_exits_2_on_a_bad_slice_or_mesh(arguments, message):
    libtpu = [] if "--libtpu" in arguments else ["--libtpu", str(LIBTPU)]
    with _Capture() as capture:
        code = cli.main(["aot", *arguments, *libtpu])
    assert code == 2, capture.text
    assert message in capture.text and "error:" in capture.text
