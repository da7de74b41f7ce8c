"""``xformjax.config``: the ``check_values`` switch, its environment variable, and the
shared value check of ``xformjax.ops.common.value_checks`` eager and under ``jit``."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xformjax
from xformjax.ops.common.value_checks import check_values


def half_open_unit(op_input):
    check_values("op", "x", op_input, lambda a, xp: (a > 0) & (a <= 1), "in (0, 1]")
    return op_input * 2


def test_the_switch_is_off_by_default_and_takes_bools_only():
    assert xformjax.config.get("check_values") is (
        os.environ.get("XFORMJAX_CHECK_VALUES", "0") not in ("", "0", "false", "no", "off")
    )
    with pytest.raises(TypeError, match="takes a bool; got 'yes'"):
        xformjax.config.update("check_values", "yes")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="unknown xformjax option 'check_value'"):
        xformjax.config.get("check_value")


def test_concrete_values_are_checked_at_once_whatever_the_switch():
    with xformjax.config.override("check_values", False):
        with pytest.raises(ValueError, match=r"op: `x` must be in \(0, 1\]; got 5 at index"):
            half_open_unit(np.array([0.5, 5.0]))
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]; got nan$"):
            half_open_unit(float("nan"))
        assert half_open_unit(1.0) == 2.0


def test_traced_values_are_checked_only_with_the_switch_on():
    bad = jnp.array([0.5, -3.0])
    with xformjax.config.override("check_values", False):
        np.testing.assert_array_equal(jax.jit(half_open_unit)(bad), [1.0, -6.0])
        assert "check" not in str(jax.make_jaxpr(half_open_unit)(bad))
    with xformjax.config.override("check_values", True):
        checked = xformjax.config.checked(jax.jit(half_open_unit))
        with pytest.raises(ValueError, match=r"op: `x` must be in \(0, 1\]; got values in"):
            checked(bad)
        np.testing.assert_array_equal(checked(jnp.array([0.5, 1.0])), [1.0, 2.0])
        # Not functionalized: JAX itself says what to do.
        with pytest.raises(ValueError, match="checkify"):
            jax.jit(half_open_unit)(bad)
    # The switch cleared the caches: the same jitted function runs unchecked again.
    np.testing.assert_array_equal(jax.jit(half_open_unit)(bad), [1.0, -6.0])


def test_the_environment_variable_turns_the_switch_on_and_rejects_nonsense():
    code = "import xformjax; print(xformjax.config.get('check_values'))"
    env = dict(os.environ, XFORMJAX_CHECK_VALUES="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
    env["XFORMJAX_CHECK_VALUES"] = "maybe"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "XFORMJAX_CHECK_VALUES must be 0/1" in out.stderr
