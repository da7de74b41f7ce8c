"""Pallas kernels for the fused chunked scans, installed as ``xformjax.kernels``.

The directory sits at the top of the repository and is mapped onto the
subpackage ``xformjax.kernels`` by ``[tool.setuptools.package-dir]`` in
``pyproject.toml``; import it only under that name (a top-level ``kernels``
distribution exists on the registry).

The kernels themselves are tracked in the kernels issue. Until they land,
every op runs its XLA form and ``backend="pallas"`` is rejected with a clear
``ValueError`` by :func:`xformjax.ops.common.resolve_backend`.
"""

AVAILABLE_KERNELS: tuple[str, ...] = ()
