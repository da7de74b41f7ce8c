"""Parallelism: the device mesh and logical-axis rules (:mod:`~xformjax.parallel.mesh`),
LASP-2 / LASP-2H sequence parallelism (:func:`sequence_parallel`) and multi-host
start-up (:func:`initialize_distributed`)."""

from xformjax.parallel.distributed import initialize_distributed
from xformjax.parallel.lasp import block_parallel, sequence_parallel
from xformjax.parallel.mesh import (
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    axis_rules,
    constrain,
    create_sharded,
    current_rules,
    logical_to_spec,
    make_mesh,
    resolve_mesh_shape,
    state_shardings,
)

__all__ = [
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "axis_rules",
    "block_parallel",
    "constrain",
    "create_sharded",
    "current_rules",
    "initialize_distributed",
    "logical_to_spec",
    "make_mesh",
    "resolve_mesh_shape",
    "sequence_parallel",
    "state_shardings",
]
