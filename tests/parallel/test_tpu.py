"""Compile-only TPU slices (``xformjax.parallel.tpu``) and ``ops.compiling_for``."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xformjax import ops
from xformjax.ops import common
from xformjax.parallel import tpu

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIBTPU = tpu.libtpu_path() or tpu.libtpu_path(ROOT / ".libtpu")
needs_libtpu = pytest.mark.skipif(
    LIBTPU is None, reason="libtpu is not installed here (make .libtpu/.installed)"
)


def test_topology_names_parse_into_chip_and_shape():
    topology = tpu.Topology.parse("v5e:4x4")
    assert (topology.chip.name, topology.shape, topology.num_chips) == ("v5e", (4, 4), 16)
    assert topology.chip.hbm_bytes == 16 * 2**30
    assert tpu.Topology.parse(" v5p:2x2x1 ").num_chips == 4
    assert tpu.Topology.parse("v6e:2x2").chip.hbm_bytes == 32 * 2**30


@pytest.mark.parametrize("name", ["v7x:2x2", "v5e", "v5e:2", "tpu:2x2", "v5e:2x2x2x2", ""])
def test_unknown_topologies_are_rejected_with_the_valid_chips(name):
    with pytest.raises(tpu.TopologyError, match=r"expected <chip>:<shape>.*'v5e'"):
        tpu.Topology.parse(name)


def test_libtpu_path_takes_a_file_or_an_install_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert tpu.libtpu_path(tmp_path) is None  # a directory without libtpu/libtpu.so
    library = tmp_path / "libtpu" / "libtpu.so"
    library.parent.mkdir()
    library.write_bytes(b"")
    assert tpu.libtpu_path(tmp_path) == library
    assert tpu.libtpu_path(library) == library
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(library))
    assert tpu.libtpu_path() == library
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(tmp_path / "missing.so"))
    assert tpu.libtpu_path() is None
    assert tpu.libtpu_version(library) == "unknown"
    (tmp_path / "libtpu-0.0.42.1.dist-info").mkdir()
    assert tpu.libtpu_version(library) == "0.0.42.1"


def test_a_missing_libtpu_says_how_to_install_it(tmp_path):
    with pytest.raises(tpu.TopologyError, match=r"libtpu not found.*xformjax\[tpu\]"):
        tpu.topology_devices("v5e:2x2", tmp_path)


def test_compiling_for_makes_the_default_backend_choose_the_kernels():
    assert jax.default_backend() == "cpu"
    assert common.target_platform() == "cpu"
    assert common.resolve_backend("op", None, has_kernel=True) == "xla"
    with ops.compiling_for("tpu"):
        assert common.target_platform() == "tpu"
        assert common.resolve_backend("op", None, has_kernel=True) == "pallas"
        with ops.compiling_for("cpu"):
            assert common.resolve_backend("op", None, has_kernel=True) == "xla"
        assert common.resolve_backend("op", None, has_kernel=True, mode="recurrent") == "xla"
    assert common.target_platform() == "cpu"
    with pytest.raises(ValueError, match="unknown platform 'npu'"), ops.compiling_for("npu"):
        pass


@needs_libtpu
@pytest.mark.tpu_aot
@pytest.mark.parametrize(
    "name, count, kind", [("v5e:2x2", 4, "TPU v5 lite"), ("v6e:2x2", 4, "TPU v6 lite")]
)
def test_slices_give_compile_only_devices(name, count, kind):
    devices = tpu.topology_devices(name, LIBTPU)
    assert len(devices) == count
    assert {d.device_kind for d in devices} == {kind}
    assert {d.platform for d in devices} == {"tpu"}


@needs_libtpu
@pytest.mark.tpu_aot
def test_a_default_op_traced_for_a_tpu_compiles_to_its_mosaic_kernel():
    """``backend=None`` inside ``compiling_for("tpu")`` compiles the Mosaic kernel for a real
    slice, sharded over its chips; outside it, the CPU's choice (XLA) is compiled."""
    mesh = Mesh(np.array(tpu.topology_devices("v5e:2x2", LIBTPU)), ("heads",))
    spec = PartitionSpec(None, None, "heads")
    seq = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    gate = jax.ShapeDtypeStruct((1, 1024, 8), jnp.float32, sharding=NamedSharding(mesh, spec))
    step = jax.shard_map(
        lambda q, k, v, g: ops.linear_attention(q, k, v, g=g)[0],
        mesh=mesh,
        in_specs=(spec,) * 4,
        out_specs=spec,
        check_vma=False,
    )
    # in both orders: the choice is not hidden by a cached trace of the same function
    xla_first = jax.jit(step).trace(seq, seq, seq, gate).lower().compile()
    with ops.compiling_for("tpu"):
        kernel = jax.jit(step).trace(seq, seq, seq, gate).lower().compile()
    xla = jax.jit(step).trace(seq, seq, seq, gate).lower().compile()
    assert "tpu_custom_call" not in xla_first.as_text()
    assert kernel.as_text().count('custom_call_target="tpu_custom_call"') >= 1
    assert "tpu_custom_call" not in xla.as_text()
    assert kernel.memory_analysis().argument_size_in_bytes == 3 * 1024 * 2 * 128 * 2 + 1024 * 2 * 4
