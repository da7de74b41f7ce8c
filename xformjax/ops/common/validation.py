"""Helpers shared by every op: argument checks, dtypes, backends and packing.

Nothing here knows about a particular recurrence. The ops call these to turn
user input into validated, promoted arrays and, for packed batches
(``cu_seqlens``), into per-token segment ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal, NoReturn, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from xformjax import kernels  # pyright: ignore[reportAttributeAccessIssue]
from xformjax.ops.common.value_checks import check_values

#: The form an op runs: the quadratic ``"parallel"``, the ``"chunk"``ed scan (linear in
#: T; the kernels' form) or token by token (``"recurrent"``).
Mode = Literal["parallel", "chunk", "recurrent"]
#: Who runs it: XLA, or the Pallas kernel; ``None`` picks (see :func:`resolve_backend`).
Backend = Literal["xla", "pallas"]
MODES: tuple[Mode, ...] = get_args(Mode)
BACKENDS: tuple[Backend | None, ...] = (None, *get_args(Backend))


def shape_str(x) -> str:
    return str(tuple(int(d) for d in jnp.shape(x)))


def fail(op: str, message: str) -> NoReturn:
    """Raise ``ValueError("{op}: {message}")``: every op's input errors name the op."""
    raise ValueError(f"{op}: {message}")


def fail_type(op: str, message: str) -> NoReturn:
    """Raise ``TypeError("{op}: {message}")``: an argument of the wrong type."""
    raise TypeError(f"{op}: {message}")


def check_rank(op: str, name: str, x, layout: Sequence[str]) -> None:
    """Raise unless ``x`` has ``len(layout)`` dimensions; ``layout`` names them."""
    if jnp.ndim(x) != len(layout):
        fail(
            op,
            f"`{name}` must have rank {len(layout)} [{', '.join(layout)}]; "
            f"got shape {shape_str(x)}",
        )


def check_dim(op: str, name: str, x, axis: int, expected: int, what: str) -> None:
    """Raise unless ``x.shape[axis] == expected``; ``what`` says where ``expected`` came from."""
    got = int(jnp.shape(x)[axis])
    if got != expected:
        fail(
            op,
            f"`{name}` has shape {shape_str(x)}: dimension {axis} is {got} but "
            f"{what} is {expected}",
        )


def check_floating(op: str, name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        fail(op, f"`{name}` must be a floating-point array; got dtype {jnp.result_type(x)}")


def check_mode(op: str, mode: str) -> Mode:
    if mode not in MODES:
        fail(op, f"unknown `mode`={mode!r}; expected one of {MODES}")
    return mode


def check_positive_int(op: str, name: str, value, *, expected: str = "a positive int") -> int:
    """``value`` must be an int (``TypeError`` otherwise; a bool is not one) and ≥ 1
    (``ValueError``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        fail_type(op, f"`{name}` must be {expected}; got {value!r}")
    if value < 1:
        fail(op, f"`{name}` must be {expected}; got {value!r}")
    return int(value)


def check_optional_positive_int(op: str, name: str, value) -> int | None:
    """``None``, or an int ≥ 1 as :func:`check_positive_int`."""
    if value is None:
        return None
    return check_positive_int(op, name, value, expected="None or a positive int")


def check_chunk_size(op: str, chunk_size) -> int:
    return check_positive_int(op, "chunk_size", chunk_size)


def check_bool(op: str, name: str, value) -> bool:
    """``value`` must be a bool (``TypeError`` otherwise: ``"no"`` is not ``False``)."""
    if not isinstance(value, (bool, np.bool_)):
        fail_type(op, f"`{name}` must be a bool (True or False); got {value!r}")
    return bool(value)


def check_scalar(op: str, name: str, value, what: str = "a number") -> None:
    """``value`` must be a Python or numpy number (not a bool) or a 0-d numeric array:
    ``TypeError`` for another type, ``ValueError`` for an array of another shape."""
    if isinstance(value, (jax.Array, np.ndarray)):
        if not jnp.issubdtype(value.dtype, jnp.number):
            fail_type(op, f"`{name}` must be {what}; got an array of dtype {value.dtype}")
        if value.ndim:
            fail(op, f"`{name}` must be {what} (a 0-d array); got shape {shape_str(value)}")
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        fail_type(op, f"`{name}` must be {what}; got {value!r}")


def check_scale(op: str, scale) -> None:
    """``scale`` (the scores' multiplier): ``None`` (``K ** -0.5``), or a number or a
    0-d array that is finite and > 0 (a temperature: negate ``q`` to flip the sign).
    The value is checked eagerly, and under ``jit`` with ``check_values`` on."""
    if scale is None:
        return
    check_scalar(op, "scale", scale, "None, a number or a 0-d array")
    check_values(op, "scale", scale, lambda s, xp: xp.isfinite(s) & (s > 0), "finite and > 0")


def check_key_dim(op: str, name: str, x, axis: int = -1, label: str = "K") -> None:
    """The key (head) dimension must be ≥ 1: the default scale is ``K ** -0.5``."""
    if int(jnp.shape(x)[axis]) < 1:
        fail(
            op,
            f"`{name}` has shape {shape_str(x)}: the key dimension {label} must be >= 1; "
            f"got {label}=0",
        )


#: β of the delta rule: 0 is the identity step, 1 the classic delta rule, 2 a reflection;
#: (0, 2) are the values with a learning signal, [0, 2] keeps ``I − β k kᵀ`` a contraction.
BETA_RANGE = "finite and in [0, 2]"


def check_beta_values(op: str, beta, name: str = "beta") -> None:
    """β values in [0, 2] (eagerly, and under ``jit`` with ``check_values`` on)."""
    check_values(op, name, beta, lambda b, xp: (b >= 0) & (b <= 2), BETA_RANGE)


def check_unit_interval(op: str, name: str, x) -> None:
    """Values in [0, 1] (NaN fails), eagerly and under ``jit`` with ``check_values`` on."""
    check_values(op, name, x, lambda a, xp: (a >= 0) & (a <= 1), "finite and in [0, 1]")


def check_nonnegative(op: str, name: str, x) -> None:
    """Finite values ≥ 0, eagerly and under ``jit`` with ``check_values`` on."""
    check_values(op, name, x, lambda a, xp: xp.isfinite(a) & (a >= 0), "finite and >= 0")


ACCELERATORS: tuple[str, ...] = ("gpu", "tpu", "cuda", "rocm")
_WARNED: set[tuple[str, str]] = set()
_TARGET_PLATFORMS: list[str] = []


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[str]:
    """Choose backends, inside the block, as JAX's default backend were ``platform``.

    ``backend=None`` looks at the default backend when a call is traced; a program
    traced on a CPU host to be compiled for a TPU slice (:mod:`xformjax.parallel.tpu`,
    ``xformjax aot``) must pick the kernels the TPU will run::

        with ops.compiling_for("tpu"):
            compiled = jax.jit(step).trace(*specs).lower().compile()

    The choice is made while tracing, and JAX's caches of traced functions do not know
    about it, so entering and leaving the block clears them (``jax.clear_caches()``):
    a function traced before the block is traced again inside it, and the other way
    round.
    """
    if platform not in ("cpu", *ACCELERATORS):
        raise ValueError(f"unknown platform {platform!r}; expected cpu or one of {ACCELERATORS}")
    jax.clear_caches()
    _TARGET_PLATFORMS.append(platform)
    try:
        yield platform
    finally:
        _TARGET_PLATFORMS.pop()
        jax.clear_caches()


def target_platform() -> str:
    """The platform ``backend=None`` chooses for: :func:`compiling_for`'s, else JAX's
    default backend."""
    return _TARGET_PLATFORMS[-1] if _TARGET_PLATFORMS else jax.default_backend()


def warn_once(op: str, message: str) -> None:
    """Emit ``message`` as a ``RuntimeWarning`` the first time ``(op, message)`` is seen."""
    if (op, message) in _WARNED:
        return
    _WARNED.add((op, message))
    warnings.warn(f"{op}: {message}", RuntimeWarning, stacklevel=4)


def resolve_backend(
    op: str,
    backend: Backend | None,
    unsupported: str | None = None,
    *,
    has_kernel: bool = False,
    mode: Mode = "chunk",
) -> Backend:
    """Return the backend that will run: ``"pallas"`` or ``"xla"``.

    ``backend=None`` picks the Pallas kernel when the op has one, ``mode`` is the
    chunk form (the kernels' form) and JAX's default backend is a GPU or TPU (or the
    block is :func:`compiling_for` one);
    XLA otherwise. ``"pallas"`` forces the kernel (interpret mode on CPU);
    ``"xla"`` forces XLA. ``unsupported`` says why the kernel cannot run these
    inputs: the op then runs in XLA and warns once (so does ``"pallas"`` on an op
    without a kernel, or with another ``mode``).
    """
    if backend not in BACKENDS:
        fail(op, f"unknown `backend`={backend!r}; expected one of {BACKENDS}")
    if backend == "xla" or (
        backend is None
        and (not has_kernel or mode != "chunk" or target_platform() not in ACCELERATORS)
    ):
        return "xla"
    if not has_kernel:
        warn_once(op, "has no Pallas kernel; running the XLA form")
        return "xla"
    if mode != "chunk":
        unsupported = f"mode={mode!r} (the kernels are the chunk form)"
    if unsupported is not None:
        warn_once(op, f"the Pallas kernel does not cover {unsupported}; running the XLA form")
        return "xla"
    return "pallas"


KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def kernel_gap(arrays, scale, conditions: dict[str, bool]) -> str | None:
    """Why the Pallas kernels cannot run a call, or ``None`` when they can.

    They take float32 and bfloat16 arrays (accumulating in float32), a Python
    number (or ``None``) as ``scale``, non-empty batches and heads, and head
    dimensions up to ``kernels.config.MAX_HEAD_DIM`` (what the sm_90 compile gate
    proves fits an H100); ``arrays`` starts ``(q, k, v, ...)``;
    ``conditions`` maps each further unsupported feature to whether the call
    uses it.
    """
    for x in arrays:
        if x is not None and jnp.result_type(x) not in KERNEL_DTYPES:
            return f"{jnp.result_type(x)} inputs (the kernels take float32 and bfloat16)"
    if scale is not None and not isinstance(scale, (int, float, np.integer, np.floating)):
        return "a traced or array `scale`"
    if 0 in tuple(arrays[0].shape[:1]) + tuple(arrays[0].shape[2:3]):
        return "an empty batch or no heads"
    key_dim, value_dim = arrays[0].shape[-1], arrays[2].shape[-1]
    if max(key_dim, value_dim) > kernels.MAX_HEAD_DIM:
        return (
            f"head dims K={key_dim}, V={value_dim} (the kernels are compiled and checked "
            f"for K, V ≤ {kernels.MAX_HEAD_DIM})"
        )
    for what, used in conditions.items():
        if used:
            return what
    return None


def compute_dtype(*arrays) -> jnp.dtype:
    """``promote(input dtype, float32)``: bf16/f16 accumulate in f32, f64 stays f64."""
    present = [a for a in arrays if a is not None]
    return jnp.promote_types(jnp.result_type(*present), jnp.float32)


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer under jit/grad)."""
    return not isinstance(x, Tracer)


LOG_GATE = "finite and <= 0"


def check_log_gate(op: str, name: str, gate) -> None:
    """Gates are natural-log decays: every value finite and ≤ 0.

    Checked through :func:`~xformjax.ops.common.value_checks.check_values`: at once for
    concrete values, under ``jit`` only with ``check_values`` on (a ``checkify`` check).
    The eager message reads "`g` holds log decays and must be finite and <= 0; got max
    0.5 (shape (2, 10, 3))".
    """
    if gate is None:
        return
    if is_concrete(gate):
        values = np.asarray(gate, dtype=np.float64)
        if values.size == 0:
            return
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values) & (values <= 0)
        if not ok.all():
            top = float(np.max(values))
            if not np.isnan(top) and top <= 0:  # only -inf fails
                got = f"{float(values[~ok].flat[0])} (max {top})"
            else:
                got = f"max {top}"
            fail(
                op,
                f"`{name}` holds log decays and must be {LOG_GATE}; got {got} "
                f"(shape {shape_str(gate)})",
            )
        return
    check_values(
        op,
        name,
        gate,
        lambda a, xp: xp.isfinite(a) & (a <= 0),
        f"{LOG_GATE} (it holds log decays)",
    )


@dataclasses.dataclass(frozen=True)
class Segments:
    """Packed sequences described by ``cu_seqlens`` (int32 ``[N+1]``) over ``T`` tokens.

    Attributes:
      cu_seqlens: ``[N+1]`` boundaries; sequence ``n`` is ``[cu[n], cu[n+1])``.
      ids: ``[T]`` the sequence each token belongs to.
      is_start: ``[T]`` whether the token opens its sequence.
      lengths: ``[N]`` the length of each sequence (zero is allowed).
    """

    cu_seqlens: jax.Array
    ids: jax.Array
    is_start: jax.Array
    lengths: jax.Array

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def starts(self) -> jax.Array:
        return self.cu_seqlens[:-1]

    @property
    def ends(self) -> jax.Array:
        """``[N]`` one past the last token of each sequence."""
        return self.cu_seqlens[1:]


def make_segments(op: str, cu_seqlens, batch: int, num_tokens: int) -> Segments | None:
    """Validate ``cu_seqlens`` and derive per-token segment ids (``None`` if unpacked)."""
    if cu_seqlens is None:
        return None
    check_rank(op, "cu_seqlens", cu_seqlens, ["N+1"])
    if not jnp.issubdtype(jnp.result_type(cu_seqlens), jnp.integer):
        fail(op, f"`cu_seqlens` must be an integer array; got dtype {jnp.result_type(cu_seqlens)}")
    if jnp.shape(cu_seqlens)[0] < 2:
        fail(
            op,
            f"`cu_seqlens` must hold at least two boundaries [0, T]; got shape "
            f"{shape_str(cu_seqlens)}",
        )
    if batch != 1:
        fail(op, f"packed sequences (`cu_seqlens`) need batch size B == 1; got B={batch}")
    expected = f"boundaries that start at 0, never decrease and end at T={num_tokens}"
    if is_concrete(cu_seqlens):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != num_tokens or np.any(np.diff(cu) < 0):
            fail(op, f"`cu_seqlens` must be {expected}; got {cu.tolist()}")
    else:  # a whole-array predicate: `check_values` needs only that it reduces to True
        check_values(
            op,
            "cu_seqlens",
            cu_seqlens,
            lambda c, xp: (c[0] == 0) & (c[-1] == num_tokens) & xp.all(c[1:] >= c[:-1]),
            expected,
        )
    return derive_segments(cu_seqlens, num_tokens)


def derive_segments(cu_seqlens, num_tokens: int) -> Segments:
    """Per-token segment ids of checked ``cu_seqlens`` (:func:`make_segments` checks them)."""
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    positions = jnp.arange(num_tokens, dtype=jnp.int32)
    ids = jnp.searchsorted(cu[1:], positions, side="right").astype(jnp.int32)
    ids = jnp.minimum(ids, cu.shape[0] - 2)
    return Segments(cu_seqlens=cu, ids=ids, is_start=positions == cu[ids], lengths=cu[1:] - cu[:-1])


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
