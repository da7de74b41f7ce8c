"""The ``titans`` (MAL, MAG, MAC) and ``atlas`` mixers beyond the registry's checks
(tests/nn/test_mixers.py: forms agree, decoding reproduces the chunked forward,
gradients, bfloat16): one-token chunks are the exact rule, ATLAS reduces to Titans,
and the MAG/MAC attention matches a float64 numpy reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.ops.helpers import assert_close
from xformjax import nn
from xformjax.nn.sliding_attention import sliding_window_attention

BASE = nn.MixerConfig(d_model=32, num_heads=2, chunk_size=8, max_seq_len=64, conv_size=3)
BATCH, LENGTH = 2, 19
VARIANTS = {
    "titans-mal": ("titans", {"memory_depth": 2}),
    "titans-mal-linear": ("titans", {"memory_depth": 1, "conv_size": 0}),
    "titans-mag": ("titans", {"titans_variant": "mag", "memory_window": 5, "persistent_tokens": 2}),
    "titans-mac": ("titans", {"titans_variant": "mac", "persistent_tokens": 2, "memory_depth": 1}),
    "atlas": ("atlas", {}),  # muon, omega_window 4, poly_degree 2
    "atlas-momentum": (
        "atlas",
        {"memory_optimizer": "momentum", "poly_degree": 3, "omega_window": 2},
    ),
}


def build(variant: str, **extra) -> nn.Mixer:
    name, overrides = VARIANTS[variant]
    config = dataclasses.replace(BASE, **overrides, **extra)
    return nn.MIXERS[name](config, rngs=nnx.Rngs(0))


def inputs(length: int = LENGTH, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, length, BASE.d_model))


@pytest.mark.parametrize("variant", ["titans-mal", "atlas"])
def test_chunk_size_changes_results_but_one_token_chunks_are_the_exact_rule(variant, monkeypatch):
    """With chunk_size=1 the layer equals the same layer whose memory runs the op's
    exact token-by-token form; with larger chunks it is the paper's approximation."""
    import xformjax.nn.neural_memory as memory_module

    x = inputs()
    one_token = build(variant, chunk_size=1)
    y_one, _ = one_token(x)
    y_approx, _ = build(variant)(x)
    assert float(jnp.linalg.norm(y_one - y_approx)) > 1e-3 * float(jnp.linalg.norm(y_one))

    chunked_op = memory_module.neural_memory

    def exact_op(*args, **kwargs):
        return chunked_op(*args, **{**kwargs, "mode": "recurrent"})

    monkeypatch.setattr(memory_module, "neural_memory", exact_op)
    y_exact, _ = one_token(x)
    assert_close(y_one, y_exact, 1e-5, f"{variant} chunk_size=1 vs the exact rule")


@pytest.mark.parametrize("variant", ["titans-mal", "titans-mac", "atlas"])
def test_the_surprise_clip_reaches_the_memory(variant):
    """``max_surprise_norm`` is passed to the op by every variant: a tight clip changes
    the output, ``None`` (the papers' rule) and a loose one agree at initialisation."""
    x = inputs()
    y_free, _ = build(variant, max_surprise_norm=None)(x)
    y_loose, _ = build(variant, max_surprise_norm=1e6)(x)
    y_tight, _ = build(variant, max_surprise_norm=1e-3)(x)
    assert_close(y_loose, y_free, 1e-5, f"{variant}: a clip that never bites")
    assert float(jnp.linalg.norm(y_tight - y_free)) > 1e-3 * float(jnp.linalg.norm(y_free))


def test_the_config_rejects_a_bad_surprise_clip():
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="`max_surprise_norm` must be a finite number > 0"):
            dataclasses.replace(BASE, max_surprise_norm=bad)
    with pytest.raises(TypeError, match="`max_surprise_norm` must be a finite number > 0"):
        dataclasses.replace(BASE, max_surprise_norm=True)


def test_atlas_reduces_to_titans_with_the_same_parameters():
    overrides = {"omega_window": 1, "poly_degree": 1, "memory_optimizer": "momentum"}
    config = dataclasses.replace(BASE, memory_depth=2, **overrides)
    titans = nn.MIXERS["titans"](config, rngs=nnx.Rngs(0))
    atlas = nn.MIXERS["atlas"](config, rngs=nnx.Rngs(1))
    titans_params = nnx.state(titans, nnx.Param)
    assert sorted(map(str, nnx.to_flat_state(titans_params).paths)) == sorted(
        map(str, nnx.to_flat_state(nnx.state(atlas, nnx.Param)).paths)
    )
    nnx.update(atlas, titans_params)
    x = inputs()
    y_titans, s_titans = titans(x)
    y_atlas, s_atlas = atlas(x)
    assert_close(y_atlas, y_titans, 1e-6, "atlas (c=1, p=1, momentum) vs titans")
    atlas_leaves = dict(jax.tree_util.tree_leaves_with_path(s_atlas))
    for path, leaf in jax.tree_util.tree_leaves_with_path(s_titans):
        key = jax.tree_util.keystr(path)
        assert_close(atlas_leaves[path], leaf, 1e-6, key)
    different = nn.MIXERS["atlas"](
        dataclasses.replace(config, memory_optimizer="muon"), rngs=nnx.Rngs(1)
    )
    nnx.update(different, titans_params)
    assert float(jnp.linalg.norm(different(x)[0] - y_titans)) > 1e-6


def reference_local_attention(q, k, v, persistent_k, persistent_v, window, segment=None):
    """float64, one query at a time: softmax over the persistent keys and the keys at
    positions t−W+1 … t (or, with ``segment``, the segment's positions ≤ t)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    pk, pv = np.asarray(persistent_k, np.float64), np.asarray(persistent_v, np.float64)
    batch, length, heads, key_dim = q.shape
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                first = max(0, t - window + 1) if segment is None else t - t % segment
                keys = np.concatenate([pk[:, h], k[b, first : t + 1, h]])
                values = np.concatenate([pv[:, h], v[b, first : t + 1, h]])
                scores = keys @ q[b, t, h] / np.sqrt(key_dim)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ values / weights.sum()
    return out


@pytest.mark.parametrize("window, persistent", [(4, 3), (3, 0), (1, 2)])
def test_sliding_window_attention_matches_a_reference_and_continues_from_its_cache(
    window, persistent
):
    keys = jax.random.split(jax.random.key(3), 5)
    length, heads = 11, 2
    q, k, v = (jax.random.normal(key, (2, length, heads, 4)) for key in keys[:3])
    pk, pv = (jax.random.normal(key, (persistent, heads, 4)) for key in keys[3:])
    pk, pv = (pk, pv) if persistent else (None, None)
    expected = reference_local_attention(
        q,
        k,
        v,
        np.zeros((0, heads, 4)) if pk is None else pk,
        np.zeros((0, heads, 4)) if pv is None else pv,
        window,
    )
    empty = jnp.zeros((2, window - 1, heads, 4))
    o, cache_k, _cache_v = sliding_window_attention(
        q,
        k,
        v,
        window=window,
        cache_k=empty,
        cache_v=empty,
        cached=0,
        persistent_k=pk,
        persistent_v=pv,
    )
    assert_close(o, expected, 1e-5, f"window {window} one call")
    split = 6  # a prefix, then the rest from the cache
    _, ck, cv = sliding_window_attention(
        q[:, :split],
        k[:, :split],
        v[:, :split],
        window=window,
        cache_k=empty,
        cache_v=empty,
        cached=0,
        persistent_k=pk,
        persistent_v=pv,
    )
    rest, ck, cv = sliding_window_attention(
        q[:, split:],
        k[:, split:],
        v[:, split:],
        window=window,
        cache_k=ck,
        cache_v=cv,
        cached=min(split, window - 1),
        persistent_k=pk,
        persistent_v=pv,
    )
    assert_close(rest, expected[:, split:], 1e-5, f"window {window} continued")
    if window > 1:
        assert_close(ck, cache_k, 1e-6, "cache after two calls")
        assert_close(cache_k, k[:, -(window - 1) :], 1e-6, "cache holds the last W-1 keys")


def test_mag_and_mac_parameters_and_the_attention_branch():
    """MAL's parameters are unchanged by the new variants' code; MAG/MAC add persistent
    tokens [P, d_model] and a gated read-out; MAG's output depends on tokens outside
    the window only through the memory."""
    mal = build("titans-mal")
    mag = build("titans-mag")
    mal_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(mal, nnx.Param))}
    mag_flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(mag, nnx.Param))}
    assert "head/gate/kernel" in mal_paths and "head/gate/kernel" not in mag_flat
    assert mag_flat["attention/persistent"].shape == (2, BASE.d_model)
    assert mag_flat["attention/persistent"].get_metadata()["out_sharding"] == (None, "embed")
    assert {p for p in mal_paths if not p.startswith("head/")} <= set(mag_flat)
    mac = build("titans-mac")
    assert "context_proj/kernel" in {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(mac, nnx.Param))
    }
    mac_state = mac.init_state(BATCH)
    assert mac_state.segment.qa is not None and mac_state.conv.q is not None
    assert "weight_0" in mac_state.memory


def test_bad_modes_raise():
    with pytest.raises(ValueError, match="supports modes.*got mode='parallel'"):
        build("titans-mal")(inputs(), mode="parallel")
