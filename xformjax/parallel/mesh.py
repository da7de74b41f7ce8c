"""The device mesh and the logical-axis rules that place parameters and activations.

One mesh with the named axes :data:`MESH_AXES` = ``(data, fsdp, tensor, seq)``:

- ``data``: pure data parallelism (batch split, parameters replicated);
- ``fsdp``: the batch is split *and* parameters/optimiser states are sharded along
  their ``embed`` dimension (gathered by XLA where a layer needs them);
- ``tensor``: heads, MLP hidden units and the vocabulary are split (Megatron style);
- ``seq``: the sequence is split; linear layers run LASP-2 and softmax layers
  LASP-2H (:mod:`xformjax.parallel.lasp`).

Parameters carry *logical* axis names in their metadata (``nnx.Param(...,
out_sharding=("embed", "heads"))``, see :mod:`xformjax.nn.linear`); activations are
named where the model constrains them (``("batch", "length", None)``).
:data:`DEFAULT_RULES` maps the names onto mesh axes::

    batch → (data, fsdp)   length → seq   embed → fsdp
    heads, kv, mlp, vocab → tensor

A mapping is dropped, for one array, where the mesh axis has size 1, is absent, does
not divide that dimension, or was already used by an earlier dimension — the
dimension is then replicated — so every model places on every mesh.

Example (8 devices: 2-way data, 2-way FSDP, 2-way sequence parallel)::

    mesh = make_mesh({"data": 2, "fsdp": 2, "seq": -1})   # -1: the rest (2)
    model = create_sharded(lambda: LanguageModel(config, rngs=nnx.Rngs(0)), mesh)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "seq")
#: mesh axes the batch is split over
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", "seq"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)

#: The logical axis names the package's parameters and activations use; each is
#: known to :func:`logical_to_spec` even under rules that leave it out (replicated).
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab")

_active_rules: list[Rules] = [DEFAULT_RULES]

T = TypeVar("T")


def resolve_mesh_shape(sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Sizes for :data:`MESH_AXES` from ``sizes`` (missing axes are 1; at most one
    ``-1``, which takes the devices left over). The product must equal
    ``device_count`` when there is a ``-1`` and must not exceed it otherwise."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")
    shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    bad = {axis: size for axis, size in shape.items() if size < 1 and size != -1}
    if bad:
        raise ValueError(f"mesh sizes must be ≥ 1 or -1 (fill); got {bad}")
    fill = [axis for axis, size in shape.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got {fill}")
    known = math.prod(size for size in shape.values() if size != -1)
    if fill:
        if device_count % known:
            raise ValueError(
                f"mesh {shape}: {device_count} devices do not divide by the "
                f"fixed axes' product {known}"
            )
        shape[fill[0]] = device_count // known
    elif known > device_count:
        raise ValueError(f"mesh {shape} needs {known} devices; {device_count} available")
    return shape


# (jax exports `Device = _xc.Device`, an assignment pyright does not take for a class)
def make_mesh(
    sizes: Mapping[str, int],
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> Mesh:
    """A mesh over the axes :data:`MESH_AXES` (sizes as in :func:`resolve_mesh_shape`)
    with every axis of type ``Auto`` (XLA propagates shardings between the
    constraints). Without ``devices`` it uses the first ``prod(sizes)`` of
    ``jax.devices()`` (all hosts' devices in a multi-host run)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    count = math.prod(shape.values())
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if count == len(devices):
        # lets jax order the devices for the physical topology (TPU ICI rings; also
        # a TPU slice's compile-only devices, see xformjax.parallel.tpu)
        return jax.make_mesh(
            tuple(shape.values()), MESH_AXES, axis_types=axis_types, devices=devices
        )
    grid = np.array(devices[:count], dtype=object).reshape(tuple(shape.values()))
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[Rules]:
    """Use ``rules`` instead of :data:`DEFAULT_RULES` inside the ``with`` block."""
    _active_rules.append(tuple(rules))
    try:
        yield _active_rules[-1]
    finally:
        _active_rules.pop()


def current_rules() -> Rules:
    return _active_rules[-1]


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh_sizes: Mapping[str, int],
    rules: Rules | None = None,
) -> PartitionSpec:
    """The ``PartitionSpec`` for an array of ``shape`` whose dimensions have the
    logical ``names``, under ``rules`` (default: the active rules). Mesh axes that
    are absent, of size 1, already used, or that do not divide the dimension are
    dropped (that part of the dimension is replicated). A name that is neither in
    :data:`LOGICAL_AXES` nor in the rules (a typo would silently replicate the
    dimension) raises ``ValueError`` listing the known names."""
    if len(names) != len(shape):
        raise ValueError(
            f"{len(names)} logical names {tuple(names)} for an array of rank {len(shape)}"
        )
    table = dict(current_rules() if rules is None else rules)
    known = list(dict.fromkeys((*LOGICAL_AXES, *table)))
    unknown = [n for n in names if n is not None and (not isinstance(n, str) or n not in known)]
    if unknown:
        raise ValueError(
            f"logical_to_spec: unknown logical axis name{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} in {tuple(names)}; known names: "
            f"{', '.join(known)} (or None: replicated)"
        )
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in targets:
            axis_size = mesh_sizes.get(axis, 1)
            if (
                axis in used
                or axis_size == 1
                or size % (math.prod(mesh_sizes[a] for a in kept) * axis_size)
            ):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """``NamedSharding`` s for an ``nnx.State`` (abstract or concrete): each
    variable's logical names (its ``out_sharding`` metadata) through the rules;
    variables without names (scalars, counters, σReparam's vectors) are replicated."""
    sizes = _mesh_sizes(mesh)

    def place(variable):
        names = _variable_names(variable)
        shape = getattr(variable, "shape", ())
        spec = (
            logical_to_spec(names, shape, sizes, rules)
            if names is not None and len(names) == len(shape)
            else PartitionSpec()
        )
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], T], mesh: Mesh, rules: Rules | None = None) -> T:
    """Build ``factory()`` (an nnx object or a tuple of them) with every array created
    directly in its sharding: the factory runs once abstractly to read the
    variables' logical names, then inside ``jax.jit`` with those shardings as
    ``out_shardings`` under ``jax.set_mesh(mesh)`` — no device ever holds a full
    replica of an FSDP- or tensor-sharded parameter."""
    rules = current_rules() if rules is None else rules
    # abstractly, outside the mesh: flax would read the logical names as mesh axes
    graphdef, abstract = nnx.split(nnx.eval_shape(factory))
    shardings = state_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh), axis_rules(rules):

        def build():
            return nnx.split(factory())[1]

        state = jax.jit(build, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the sharding its logical ``names`` give under the active
    mesh (``jax.set_mesh``) and rules; unchanged when no mesh is active or inside a
    ``shard_map`` body."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return x
    spec = logical_to_spec(names, x.shape, _mesh_sizes(mesh))
    return jax.lax.with_sharding_constraint(x, spec)


def sequence_layout(
    mesh_sizes: Mapping[str, int], axis: str, batch: int, head_counts: Sequence[int]
) -> tuple[Any, Any]:
    """How a sequence-parallel ``shard_map`` splits ``[B, T, H, ...]`` arrays besides
    T over ``axis``: ``(batch entry, heads entry)`` of the ``PartitionSpec`` — the
    batch over the :data:`BATCH_AXES` that divide ``batch``, the heads over
    ``tensor`` if it divides every count in ``head_counts`` (query and key/value
    heads, so grouped-query heads stay together) — ``None`` where replicated."""
    rules = (
        ("batch", tuple(a for a in BATCH_AXES if a != axis)),
        ("heads", "tensor" if axis != "tensor" else ()),
    )
    batch_entry = (tuple(logical_to_spec(("batch",), (batch,), mesh_sizes, rules)) or (None,))[0]
    head_specs = {tuple(logical_to_spec(("heads",), (h,), mesh_sizes, rules)) for h in head_counts}
    heads_entry = head_specs.pop()[0] if len(head_specs) == 1 and () not in head_specs else None
    return batch_entry, heads_entry


def spec_axes(*entries: Any) -> frozenset[str]:
    """The mesh axes named by ``PartitionSpec`` entries (``None``, a name or a tuple):
    the axes a ``shard_map`` should make manual; the others stay automatic, so no
    collective is added over them."""
    names: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            names.add(entry)
        elif entry is not None:
            names.update(entry)
    return frozenset(names)
