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


def check_chunk_size(op: str, chunk_size) -> int:
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        fail(op, f"`chunk_size` must be a positive int; got {chunk_size!r}")
    return int(chunk_size)


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


def check_log_gate(op: str, name: str, gate) -> None:
    """Gates are natural-log decays: reject positive values when they can be seen."""
    if gate is None or not is_concrete(gate):
        return
    top = float(np.max(np.asarray(gate, dtype=np.float64))) if np.size(gate) else 0.0
    if not np.isfinite(top) or top > 0:
        fail(
            op,
            f"`{name}` holds log decays and must be finite and <= 0; got max {top} "
            f"(shape {shape_str(gate)})",
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
    if is_concrete(cu_seqlens):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != num_tokens or np.any(np.diff(cu) < 0):
            fail(
                op,
                f"`cu_seqlens` must start at 0, never decrease and end at T={num_tokens}; "
                f"got {cu.tolist()}",
            )
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    positions = jnp.arange(num_tokens, dtype=jnp.int32)
    ids = jnp.searchsorted(cu[1:], positions, side="right").astype(jnp.int32)
    ids = jnp.minimum(ids, cu.shape[0] - 2)
    return Segments(cu_seqlens=cu, ids=ids, is_start=positions == cu[ids], lengths=cu[1:] - cu[:-1])


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
