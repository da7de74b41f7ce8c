"""Multi-host start-up: ``jax.distributed.initialize()`` when the environment says so.

Every host of a TPU pod slice (or every process of a GPU cluster) runs the same
command; :func:`initialize_distributed` must run before anything touches a device.
It initialises when

- ``XFORMJAX_DISTRIBUTED=1`` (or ``mode="on"``: the ``--distributed on`` flag), e.g.
  on Cloud TPU VMs, where JAX reads the pod's topology from the metadata server;
- ``JAX_COORDINATOR_ADDRESS`` is set (explicit coordinator; JAX also reads
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` style arguments from it);
- the job has several tasks under Slurm (``SLURM_NTASKS``) or Open MPI
  (``OMPI_COMM_WORLD_SIZE``), or several TPU workers are listed
  (``TPU_WORKER_HOSTNAMES`` / ``MEGASCALE_COORDINATOR_ADDRESS``);

and never when ``XFORMJAX_DISTRIBUTED=0`` (or ``mode="off"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def distributed_reason(environ: Mapping[str, str] | None = None, mode: str = "auto") -> str | None:
    """Why this process should join a multi-process run (``None``: it should not)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be 'auto', 'on' or 'off'; got {mode!r}")
    environ = os.environ if environ is None else environ
    forced = environ.get("XFORMJAX_DISTRIBUTED", "").strip().lower()
    if forced and forced not in _ON + _OFF:
        raise ValueError(f"XFORMJAX_DISTRIBUTED={forced!r}: use 1 or 0")
    if mode == "off" or (mode == "auto" and forced in _OFF):
        return None
    if mode == "on" or forced in _ON:
        return "requested"
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    for variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if environ.get(variable, "1").isdigit() and int(environ.get(variable, "1")) > 1:
            return variable
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU_WORKER_HOSTNAMES"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS"
    return None


def initialize_distributed(mode: str = "auto") -> bool:
    """Call ``jax.distributed.initialize()`` if :func:`distributed_reason` says so
    (once; later calls do nothing). Returns whether this is a multi-process run."""
    reason = distributed_reason(mode=mode)
    if reason is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize()
    return reason is not None
