"""TPU slices to compile for on any host: libtpu's compile-only devices.

A TPU program can be compiled ahead of time without the chips: libtpu describes a
slice by its topology name and hands out compile-only devices; ``jax.jit(f)`` with
shardings on a mesh of them, ``.trace(*specs).lower().compile()``, runs the real TPU
compiler (XLA:TPU and Mosaic for the Pallas kernels), and the compiled program's
``memory_analysis()`` gives the bytes each chip needs::

    devices = topology_devices("v5e:2x2")          # 4 compile-only TpuDevices
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    compiled = jax.jit(f, in_shardings=...).trace(spec).lower().compile()
    compiled.memory_analysis().temp_size_in_bytes

Nothing runs: the devices have no memory to execute on. libtpu is found by
:func:`libtpu_path` — ``$TPU_LIBRARY_PATH``, else the installed ``libtpu`` package
(``pip install "xformjax[tpu]"`` brings the one matching jax). A checkout keeps it in
``.libtpu/`` (``make .libtpu/.installed``), outside the virtual environment: where
``libtpu`` is importable, every JAX process on a CPU host probes for a TPU at start-up
and logs errors. Topology names are ``<chip>:<shape>``: ``v5e:2x2``, ``v5e:4x4``,
``v6e:2x2``, ``v5p:2x2x1``, ``v4:2x2x1`` (libtpu 0.0.42 has no ``v7x``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re

import jax

GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
    """What one chip of a TPU generation offers a compiled program.

    Attributes:
      name: the generation as topology names spell it (``"v5e"``).
      hbm_bytes: high-bandwidth memory per chip.
      scoped_vmem_bytes: the VMEM a Pallas kernel may use by default (XLA's
        ``xla_tpu_scoped_vmem_limit_kib``; a kernel may raise it up to ``vmem_bytes``).
      vmem_bytes: the vector memory per TensorCore.
      cores_per_chip: TensorCores per chip (2 on megacore chips: v4, v5p).
      accelerator_type: the ``TPU_ACCELERATOR_TYPE`` family (``v5litepod``).
    """

    name: str
    hbm_bytes: int
    scoped_vmem_bytes: int
    vmem_bytes: int
    cores_per_chip: int
    accelerator_type: str


#: Public per-chip figures (Google Cloud's TPU system-architecture pages).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 16 * MIB, 16 * MIB, 2, "v4"),
    "v5e": Chip("v5e", 16 * GIB, 16 * MIB, 128 * MIB, 1, "v5litepod"),
    "v5p": Chip("v5p", 95 * GIB, 16 * MIB, 64 * MIB, 2, "v5p"),
    "v6e": Chip("v6e", 32 * GIB, 32 * MIB, 128 * MIB, 1, "v6e"),
}

_TOPOLOGY = re.compile(r"^(?P<chip>v[0-9][a-z]?):(?P<shape>[0-9]+(x[0-9]+){1,2})$")


class TopologyError(ValueError):
    """A topology name that is not ``<chip>:<shape>`` for a known chip, or no libtpu."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed slice name: ``Topology.parse("v5e:4x4")`` → chip v5e, 16 chips."""

    name: str
    chip: Chip
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, name: str) -> Topology:
        match = _TOPOLOGY.match(name.strip())
        if match is None or match["chip"] not in CHIPS:
            raise TopologyError(
                f"unknown TPU topology {name!r}: expected <chip>:<shape> with chip one of "
                f"{sorted(CHIPS)}, e.g. v5e:2x2, v5e:4x4, v6e:2x2, v5p:2x2x1"
            )
        shape = tuple(int(n) for n in match["shape"].split("x"))
        return cls(name.strip(), CHIPS[match["chip"]], shape)

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)


def libtpu_path(explicit: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Where ``libtpu.so`` is: ``explicit``, else ``$TPU_LIBRARY_PATH``, else the
    installed ``libtpu`` package (found without importing it); ``None`` if nowhere."""
    for candidate in (explicit, os.environ.get("TPU_LIBRARY_PATH")):
        if candidate:
            path = pathlib.Path(candidate)
            path = path / "libtpu" / "libtpu.so" if path.is_dir() else path
            return path if path.is_file() else None
    try:
        spec = importlib.util.find_spec("libtpu")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(location) / "libtpu.so"
        if path.is_file():
            return path
    return None


def libtpu_version(path: str | os.PathLike) -> str:
    """The version of the libtpu wheel ``path`` (its ``libtpu.so``) came from, read from
    the ``libtpu-<version>.dist-info`` beside its package; ``"unknown"`` if there is none."""
    for info in sorted(pathlib.Path(path).resolve().parents[1].glob("libtpu-*.dist-info")):
        return info.name.removesuffix(".dist-info").split("-", 1)[1]
    return "unknown"


def topology_devices(name: str, libtpu: str | os.PathLike | None = None) -> list:
    """The compile-only devices of the slice ``name`` (``"v5e:2x2"``), one per
    TensorCore the slice exposes (v4 and v5p chips may expose two).

    ``libtpu``: a ``libtpu.so`` or a directory holding ``libtpu/libtpu.so`` (a
    ``pip install --target`` of the wheel); default :func:`libtpu_path`. The host's
    own backends are started first so that loading libtpu does not make JAX look
    for a TPU on this machine; the environment variables libtpu reads are set so
    that it does not probe for one either, and so that several processes may load it
    at once (its lockfile guards chips, and compile-only devices have none).
    """
    topology = Topology.parse(name)
    path = libtpu_path(libtpu)
    if path is None:
        where = f" at {libtpu}" if libtpu else ""
        raise TopologyError(
            f'libtpu not found{where}: install it (pip install "xformjax[tpu]", or in a '
            "checkout make .libtpu/.installed) or set TPU_LIBRARY_PATH to its libtpu.so"
        )
    jax.devices()  # the host's backends first (see the docstring)
    os.environ["TPU_LIBRARY_PATH"] = str(path)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # compile-only: no chip to guard, so several processes (pytest workers) may load libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cores = topology.num_chips * topology.chip.cores_per_chip
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topology.chip.accelerator_type}-{cores}")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology.name, "tpu").devices)
    except Exception as error:  # libtpu's own message (an unsupported chip or shape)
        raise TopologyError(f"libtpu cannot describe {name!r}: {error}") from error
