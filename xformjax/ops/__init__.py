"""Pure-function sequence mixers.

Every op takes ``[B, T, H, D]`` sequences, returns ``(o, final_state)`` and
offers ``mode="parallel" | "chunk" | "recurrent"``; see ``shared/DESIGN.md`` §3
and each op's docstring for the recurrence it computes.

Bad input raises ``ValueError`` (``TypeError`` for an argument of the wrong type)
whose message names the op, the argument, what was expected and what was given.
Shapes, dtypes and types are checked on every call; values (log-gates finite and
≤ 0, β in [0, 2], routing weights ≥ 0, ``scale`` finite and > 0, ``cu_seqlens``
boundaries …) at once when the arrays are concrete, and under ``jit`` or ``grad``
only with ``xformjax.config.update("check_values", True)`` (see :mod:`xformjax.config`).
"""

from xformjax.ops.aaren import aaren
from xformjax.ops.common.validation import compiling_for
from xformjax.ops.delta_rule import delta_product, delta_rule
from xformjax.ops.diagonal_recurrence import diagonal_recurrence
from xformjax.ops.linear_attention import linear_attention
from xformjax.ops.mixture_of_memories import mixture_of_memories
from xformjax.ops.neural_memory import init_neural_memory_state, neural_memory
from xformjax.ops.softmax_attention import sigmoid_attention, softmax_attention

__all__ = [
    "aaren",
    "compiling_for",
    "delta_product",
    "delta_rule",
    "diagonal_recurrence",
    "init_neural_memory_state",
    "linear_attention",
    "mixture_of_memories",
    "neural_memory",
    "sigmoid_attention",
    "softmax_attention",
]
