"""The mixed-precision policy, read off the traced program (``jax.make_jaxpr``, no
compilation) of a bfloat16-compute model with float32 parameters.

The policy (``MixerConfig(dtype="bfloat16", param_dtype="float32")``):

- parameters are stored in ``param_dtype``;
- matmuls take their operands in the compute dtype ``dtype`` — projections, MLPs, the
  logits — and accumulate in float32: every ``dot_general`` has bfloat16 operands but
  for the sites listed in :data:`FLOAT32_MATMULS`;
- norms (mean, variance, ``rsqrt``), gates (sigmoids, log-sigmoids, softplus, ``exp``
  of decays, cumulative sums), softmaxes and the residual stream are float32: no
  ``exp``/``log``/``rsqrt``/… runs on bfloat16 values but the elementwise activations
  listed in :data:`BFLOAT16_ACTIVATIONS`;
- the logits come out float32, from a float32-accumulating matmul.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import jax
import jax.extend.core
import jax.numpy as jnp
import pytest
from flax import nnx

# private, but the only way to a traced equation's Python stack (jax ≥ 0.4)
from jax._src import source_info_util

from tests.nn.test_mixers import VARIANTS
from xformjax import models, nn

BASE = nn.MixerConfig(
    d_model=32,
    num_heads=2,
    chunk_size=8,
    max_seq_len=32,
    diag_block_size=8,
    conv_size=3,
    memory_window=8,
    persistent_tokens=2,
    gate_low_rank=4,
    dtype="bfloat16",  # the compute dtype
    param_dtype="float32",
)

#: the matmuls that take float32 operands under a bfloat16 compute dtype: a path under
#: ``xformjax/`` or the innermost function(s) (``outer > inner``) of this package, with a
#: variant of ``tests/nn/test_mixers.py`` that uses it (checked: no stale entry).
FLOAT32_MATMULS = {
    # DESIGN.md §3: the ops compute in promote(dtype, float32) — attention scores and
    # their values, the recurrences and chunk algebra (states accumulate over the whole
    # sequence), the neural memory's inner optimisation. (Their matmuls are batched over
    # heads, and XLA:CPU cannot run a batched bfloat16 × bfloat16 → float32 dot.)
    "ops/": "attn",
    # the nn-level counterparts of ops.softmax_attention, float32 likewise: Titans
    # MAG/MAC's sliding-window attention core, DiagAttention's token-by-token softmax
    "masked_attention": "titans-mag",
    "TransNormer._diag_recurrent.<locals>.step": "transnormer-diag",
    # Titans MAC's read-out M(q) with the memory's weights, float32 state as in the ops
    "TitansMAC.one_segment": "titans-mac",
    # Mixture-of-Memories' router: float32 logits, so the top-k choice does not flip
    # with bfloat16 (Switch Transformer's "selective precision"); d × M, negligible
    "MixtureOfMemories.route > Dense.__call__": "mom",
}

#: transcendental primitives that may run on bfloat16 values, by the innermost function
#: of this package: elementwise activations between bfloat16 matmuls (nothing is
#: accumulated, normalised or exponentiated into a decay).
BFLOAT16_ACTIVATIONS = {
    ("logistic", "OutputHead.__call__"): "the SiLU / sigmoid output gate",
    ("logistic", "silu_stream"): "SiLU on q, k, v after the short convolution",
    ("logistic", "MLP.__call__"): "SwiGLU's SiLU, GLU's sigmoid",
    ("tanh", "MLP.__call__"): "GELU (tanh approximation)",
    ("logistic", "LightningAttention.prepare.<locals>.<genexpr>"): "SiLU on q, k, v",
    ("logistic", "LightNet.prepare"): "SiLU on q",
    ("expm1", "FeatureMap.__call__"): "the elu+1 feature map",
}
TRANSCENDENTAL = {
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "logistic",
    "rsqrt",
    "sqrt",
    "tanh",
    "erf",
    "pow",
    "cumsum",
    "cumprod",
    "cumlogsumexp",
}


def user_frames(source_info) -> list:
    """The frames outside jax of a traced equation, innermost first (jax's own filter)."""
    try:  # recent jax takes the traceback, older versions the source info
        return list(source_info_util.user_frames(source_info.traceback))
    except (AttributeError, TypeError):
        return list(source_info_util.user_frames(source_info))


def equations(jaxpr, inherited=()) -> Iterator[tuple[jax.extend.core.JaxprEqn, tuple]]:
    """Every equation of ``jaxpr`` and its sub-programs (scan, while, cond, jit,
    custom_vjp bodies), with the qualified names ``(file, function)`` of its stack in
    this package, innermost first. An equation without a stack of its own (the body of
    a cached ``jax.nn`` function) gets its caller's."""
    for eqn in jaxpr.eqns:
        frames = tuple(
            (frame.file_name.split("/xformjax/", 1)[-1], frame.function_name)
            for frame in user_frames(eqn.source_info)
            if "/xformjax/" in frame.file_name
        )
        frames = frames or inherited
        yield eqn, frames
        for param in eqn.params.values():
            for value in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(value, jax.extend.core.ClosedJaxpr):
                    yield from equations(value.jaxpr, frames)
                elif isinstance(value, jax.extend.core.Jaxpr):
                    yield from equations(value, frames)


def site(frames: tuple) -> str:
    """``outer > inner`` function names of the two innermost frames."""
    names = [function for _, function in frames[:2]]
    return " > ".join(reversed(names)) if names else "<outside xformjax>"


def float32_matmul_entry(frames: tuple) -> str | None:
    """The :data:`FLOAT32_MATMULS` entry that allows a float32 matmul at ``frames``."""
    if frames and frames[0][0].startswith("ops/"):
        return "ops/"
    if frames and frames[0][1] in FLOAT32_MATMULS:
        return frames[0][1]
    return site(frames) if site(frames) in FLOAT32_MATMULS else None


def policy_violations(jaxpr) -> dict[str, collections.Counter]:
    """The ``dot_general`` s with a non-bfloat16 operand outside :data:`FLOAT32_MATMULS`
    and the bfloat16 transcendental primitives outside :data:`BFLOAT16_ACTIVATIONS`,
    by site; and the :data:`FLOAT32_MATMULS` entries that allowed the others."""
    found = collections.defaultdict(collections.Counter)
    for eqn, frames in equations(jaxpr):
        name = eqn.primitive.name
        dtypes = [str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")]
        if name == "dot_general" and dtypes != ["bfloat16", "bfloat16"]:
            entry = float32_matmul_entry(frames)
            if entry is None:
                found["matmul"][f"{site(frames)}: {'×'.join(dtypes)}"] += 1
            else:
                found["allowed"][entry] += 1
        elif name in TRANSCENDENTAL and "bfloat16" in dtypes:
            function = frames[0][1] if frames else "<outside xformjax>"
            if (name, function) not in BFLOAT16_ACTIVATIONS:
                found["bfloat16"][f"{name} in {site(frames)}"] += 1
    return found


def assert_policy(jaxpr, where: str) -> collections.Counter:
    found = policy_violations(jaxpr)
    assert not found["matmul"], f"{where}: float32 matmul operands: {dict(found['matmul'])}"
    assert not found["bfloat16"], f"{where}: bfloat16 gate/norm math: {dict(found['bfloat16'])}"
    return found["allowed"]


def param_dtypes(module: nnx.Module) -> set[str]:
    return {str(leaf.dtype) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))}


def abstract(build) -> nnx.Module:
    """``build()`` with shapes and dtypes only: nothing is initialised or computed."""
    return nnx.eval_shape(build)


def trace(module: nnx.Module, fn, *args) -> jax.extend.core.ClosedJaxpr:
    """The program of ``fn(module, *args)``; an abstract module's state enters as inputs."""
    graphdef, state = nnx.split(module)
    return jax.make_jaxpr(lambda state, *args: fn(nnx.merge(graphdef, state), *args))(state, *args)


def lm(**overrides) -> nnx.Module:
    """A two-layer LM (gated DeltaNet, attention), bfloat16 compute, float32 parameters:
    the model-level parts (embedding, norms, MLPs, logits); the mixers are covered one by
    one below."""
    config = models.LMConfig(
        vocab_size=19, num_layers=2, layer_pattern="gated_deltanet,attn", mixer=BASE
    )
    return abstract(lambda: models.LanguageModel(config.replace(**overrides), rngs=nnx.Rngs(0)))


def test_parameters_are_stored_in_param_dtype():
    assert param_dtypes(lm(tie_embeddings=False)) == {"float32"}
    # a bfloat16 param_dtype reaches every parameter of every mixer (one layer of each)
    every_mixer = dataclasses.replace(BASE, param_dtype="bfloat16")
    pattern = ",".join(sorted(nn.MIXERS))
    model = lm(mixer=every_mixer, num_layers=len(nn.MIXERS), layer_pattern=pattern)
    assert param_dtypes(model) == {"bfloat16"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_embeddings": False},  # an output head; RMSNorm, SwiGLU, Pre-LN
        {"tie_embeddings": True, "norm": "layer", "mlp": "gelu", "norm_placement": "peri"},
    ],
    ids=["head-rms-swiglu-pre", "tied-layernorm-gelu-peri"],
)
def test_lm_forward_follows_the_policy_and_returns_float32_logits(overrides):
    model = lm(**overrides)
    closed = trace(model, lambda model, tokens: model(tokens)[0], jnp.zeros((2, 11), jnp.int32))
    (logits,) = closed.out_avals
    assert logits.dtype == jnp.float32 and logits.shape == (2, 11, 19)
    assert_policy(closed.jaxpr, "LM forward")
    # the logits: the last matmul, bfloat16 operands accumulated into float32
    last = [eqn for eqn, _ in equations(closed.jaxpr) if eqn.primitive.name == "dot_general"][-1]
    assert [str(v.aval.dtype) for v in last.invars] == ["bfloat16", "bfloat16"]
    assert last.outvars[0].aval.dtype == jnp.float32
    assert last.outvars[0].aval.shape == (2, 11, 19)


def test_lm_decoding_step_follows_the_policy():
    def decode(model, token):
        return model(token, model.init_cache(2, 16))[0]

    closed = trace(lm(), decode, jnp.zeros((2, 1), jnp.int32))
    assert closed.out_avals[0].dtype == jnp.float32
    assert_policy(closed.jaxpr, "LM decoding step")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_mixer_variant_follows_the_policy(variant):
    """Each variant of ``tests/nn/test_mixers.py`` in each of its forms."""
    name, overrides, layer_index, num_layers = VARIANTS[variant]
    config = dataclasses.replace(BASE, **overrides)
    mixer = nn.MIXERS[name]
    layer = abstract(
        lambda: mixer(config, layer_index=layer_index, num_layers=num_layers, rngs=nnx.Rngs(0))
    )
    assert param_dtypes(layer) == {"float32"}
    x = jnp.zeros((2, 13, BASE.d_model), jnp.bfloat16)
    used = collections.Counter()
    for mode in layer.modes:
        closed = trace(layer, lambda layer, x, mode=mode: layer(x, mode=mode)[0], x)
        assert closed.out_avals[0].dtype == jnp.bfloat16
        used += assert_policy(closed.jaxpr, f"{variant} {mode}")
    for entry, user in FLOAT32_MATMULS.items():
        if user == variant:  # the entry is still needed
            assert used[entry], f"{entry!r} is not used by {variant}: {dict(used)}"


def test_the_checker_catches_a_bfloat16_gate_and_a_float32_matmul():
    def bad(x, w):
        gate = jax.nn.log_sigmoid(x)  # bfloat16 gate math
        return jnp.einsum("ij,jk->ik", x.astype(jnp.float32), w) * jnp.exp(gate[:, :1])

    closed = jax.make_jaxpr(bad)(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4)))
    found = policy_violations(closed.jaxpr)
    assert sum(found["matmul"].values()) == 1
    assert {key.split(" in ")[0] for key in found["bfloat16"]} >= {"exp", "log1p"}
