"""Test-session set-up.

* 8 host devices for sharding tests (``--xla_force_host_platform_device_count``);
  set before JAX initialises its backend.
* float64 is off by default; tests opt in with the ``x64`` fixture, which turns
  ``jax_enable_x64`` on for their duration only.
* the longest test files are collected first (see :data:`LONG_FIRST`) and marked
  ``slow``: ``make test-fast`` (``-m "not slow"``) leaves them out while iterating.
* XLA compiles with its optimisations off (``jax_disable_most_optimizations``) for
  every test but those that mostly *run* compiled programs (learning runs, long
  sequences, benchmarks; marked ``optimized`` or ``slow``) and the compile gates
  (``tpu_aot``, ``sm90``, whose memory figures must be the optimised program's).
  Almost every test compiles small programs once and runs them once: without the
  LLVM optimisation passes the float64 delta rule's forward-and-backward check
  compiles in half the CPU time, and the results agree to rounding.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test with float64 enabled (and restore the previous setting)."""
    with jax.enable_x64(True):
        yield


#: markers whose tests compile with XLA's optimisations on
OPTIMIZED_MARKERS = ("optimized", "slow", "tpu_aot", "sm90")


@pytest.fixture(autouse=True)
def _compile_fast(request):
    """Compile without XLA's optimisations unless the test is marked as running long."""
    if any(request.node.get_closest_marker(name) for name in OPTIMIZED_MARKERS):
        yield
        return
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


# The longest tests (30 s – 2 min each on 2 cores) start first, so that pytest-xdist's
# workers finish together instead of one of them running a long test alone at the end.
LONG_FIRST = (
    "tests/train/test_aot.py",
    "tests/test_kernel_bench.py",
    "tests/models/test_memory_learning.py",
    "tests/train/test_cli.py",
    "tests/test_notebooks.py",
    "tests/test_wheel.py",
    "tests/train/test_trainer.py",
    "tests/nn/test_linen.py",
    "tests/models/test_precision_training.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return LONG_FIRST.index(path) if path in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept
    for item in items:
        if rank(item) < len(LONG_FIRST):
            item.add_marker(pytest.mark.slow)
