"""Test-session set-up.

* 8 host devices for sharding tests (``--xla_force_host_platform_device_count``);
  set before JAX initialises its backend.
* float64 is off by default; tests opt in with the ``x64`` fixture, which turns
  ``jax_enable_x64`` on for their duration only.
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


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
