"""Chunk-parallel GPU kernels (Triton via Pallas): flash-linear-attention's decomposition.

Arrays stay in the ops' token-major layout ``[B, L, H, D]`` (``L`` padded to a
multiple of the chunk, ``D`` to a power of two ≥ 16; ``layout.py``); a kernel
reads one head's ``[C, D]`` tiles through BlockSpecs, so nothing is transposed
in HBM. Matmul operands stay in the input dtype (bf16/f16 on the tensor
cores), accumulators, states and gates are float32 (``tiles.mm``). Only the
state recurrence is sequential; it runs over a grid of state tiles so that
even B·H = 16 heads give 64+ programs (the tile shrinks, rather than the
sequence being split: at K = V = 128 the forward state kernel has 128
programs for an H100's 132 SMs).

Scalar gate (linear attention, lightning attention, RetNet):

* ``chunk_h.py``: the states entering every chunk, ``h [B, N, H, K, V]``, grid
  ``(V/BV, K/BK, B·H)``, and the reverse recurrence for their cotangents;
* ``chunk_o.py``: the outputs, parallel over ``(V/BV, N, B·H)``, and the
  chunk-parallel ``dq, dk, dv`` and gate gradient (one ``dq, dk(, dw), db`` kernel
  and one ``dv`` kernel, shared with the delta rule, like fla's
  ``chunk_bwd_dqkwg``);
* ``linear_attention.py``: the ``custom_vjp`` that wires them.

Gated delta rule: ``wy.py`` (the chunk-local WY/UT transform with the blocked
``(I + A)⁻¹``: 16×16 diagonal blocks merged to the chunk, and its backward),
``delta_h.py`` (the state recurrence writing ``h`` and ``v_new``, and its
reverse), ``chunk_o.py`` for the outputs and their gradients, ``delta_rule.py``
(the ``custom_vjp``).

Per-channel gate (GLA): ``gla_intra.py`` (intra-chunk scores by 16-row
sub-chunks with the decay factored around a sub-chunk boundary),
``gla_state.py``, ``gla_output.py``, ``gla_inter.py`` (inter-chunk
gradients and the gate gradient), ``gla_common.py``, ``gla.py``.

Shared by all: ``layout.py`` (padding, the call options), ``specs.py``
(BlockSpecs, launch parameters), ``tiles.py`` (in-kernel matmuls, masks, loops).

``sm90.py`` compiles any of them for an H100 on a CPU host (pip ``triton``):
shared memory, registers, spills and compile time — the compile gate
``tests/kernels/test_sm90_gate.py``.
"""
