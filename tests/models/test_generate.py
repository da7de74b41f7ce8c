"""Generation: the cache-driven decoding against the full forward, prompts of mixed
lengths against each prompt alone, stop tokens, and every sampling filter against a
numpy reference of its rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.ops.helpers import assert_close
from xformjax import models
from xformjax.models import sampling

GREEDY = models.SamplingOptions(temperature=0)
PENALTY = 3.0
# greedy with CTRL's repetition penalty: the mixed-batch tests share one program
PENALISED = models.SamplingOptions(temperature=0, repetition_penalty=PENALTY)


def tiny(**overrides) -> models.LMConfig:
    return models.LMConfig.preset(
        "tiny", **{"mixer.d_model": 32, "mixer.chunk_size": 16, **overrides}
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the tiny preset: gated DeltaNet + attention
        {
            "num_layers": 5,
            "layer_pattern": "deltaproduct,sigmoid_attn,gla,lightning,transnormer",
            "norm_placement": "peri",
            "tie_embeddings": False,
            "mlp": "glu",
        },
        {"num_layers": 4, "layer_pattern": "mom,titans,atlas,aaren", "mixer.chunk_size": 8},
    ],
    ids=["gdn-attn", "five-families-peri-untied", "memory-families"],
)
def test_generation_logits_equal_the_full_forward(overrides):
    model = models.LanguageModel(tiny(**overrides), rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 7), 0, 256)
    new_tokens, logits = models.generate(model, prompt, 12, temperature=0, return_logits=True)
    assert new_tokens.shape == (2, 12) and logits.shape == (2, 12, 256)
    full, _ = model(jnp.concatenate([prompt, new_tokens], 1))
    assert_close(logits, full[:, 6 : 6 + 12], 1e-4, "step-by-step logits")
    assert np.array_equal(new_tokens, jnp.argmax(full[:, 6 : 6 + 12], -1))


# --- prompts of mixed lengths, stop tokens ---------------------------------------------

# Left-padded to 19 (> chunk_size 16: the padding's reset falls in the second chunk of
# the short rows); 2 < conv_size − 1, so the short rows' convolution caches hold padding
# after the prefill. Equal lengths alone run as one batch: two programs, not four. The
# options are greedy with a repetition penalty (which must not count the padding); the
# stop tokens and the pad id are arguments of the program, so the stop test reuses it.
PROMPT_LENGTHS = (19, 2, 19, 2)
NEW = 8


@pytest.fixture(scope="module")
def mixed():
    """The tiny hybrid (gated DeltaNet with short convolutions, attention, RoPE), the
    prompts, and their mixed-batch generation with logits."""
    model = models.LanguageModel(tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 256, n).astype(np.int32) for n in PROMPT_LENGTHS]
    batch = models.complete(model, prompts, NEW, sampling=PENALISED, return_logits=True)
    return model, prompts, batch


def test_each_row_of_a_mixed_length_batch_decodes_as_its_prompt_alone(mixed):
    model, prompts, batch = mixed
    assert batch.tokens.shape == (4, NEW) and batch.logits.shape == (4, NEW, 256)
    assert np.array_equal(batch.lengths, [NEW] * 4) and not np.any(batch.stopped)
    for length in sorted(set(PROMPT_LENGTHS)):
        rows = [b for b, n in enumerate(PROMPT_LENGTHS) if n == length]
        alone = models.complete(
            model,
            np.stack([prompts[b] for b in rows]),
            NEW,
            sampling=PENALISED,
            return_logits=True,
        )
        assert np.array_equal(batch.tokens[np.array(rows)], alone.tokens), length
        assert_close(batch.logits[np.array(rows)], alone.logits, 1e-5, f"prompts of {length}")
    # [B, P] with the prompts' lengths (right-padded rows) is the same batch
    matrix = np.zeros((4, 19), np.int32)
    for b, prompt in enumerate(prompts):
        matrix[b, : len(prompt)] = prompt
    again = models.complete(
        model, matrix, NEW, sampling=PENALISED, prompt_lengths=PROMPT_LENGTHS, return_logits=True
    )
    assert np.array_equal(again.tokens, batch.tokens)


def test_a_row_that_emits_a_stop_token_is_finished_and_padded(mixed):
    model, prompts, batch = mixed
    greedy = np.asarray(batch.tokens)
    stop, pad = int(greedy[0, 3]), 7
    stopped = models.complete(
        model, prompts, NEW, sampling=PENALISED, stop_tokens=[stop], pad_id=pad, return_logits=True
    )
    for b in range(4):
        hits = np.flatnonzero(greedy[b] == stop)
        length = hits[0] + 1 if hits.size else NEW
        assert int(stopped.lengths[b]) == length and bool(stopped.stopped[b]) == bool(hits.size)
        assert np.array_equal(stopped.tokens[b, :length], greedy[b, :length]), b
        assert np.all(np.asarray(stopped.tokens[b, length:]) == pad), b
        assert_close(stopped.logits[b, :length], batch.logits[b, :length], 1e-5, f"row {b}")
        assert np.array_equal(stopped.sequences()[b], greedy[b, :length])
    assert bool(stopped.stopped[0]) and int(stopped.lengths[0]) <= 4


def test_greedy_repetition_penalty_follows_the_reference(mixed):
    """Each greedy token is the argmax of the raw logits with CTRL's penalty on the
    tokens of the row's prompt (not its padding) and of its earlier tokens."""
    _, prompts, result = mixed
    penalty = PENALTY
    tokens, logits = np.asarray(result.tokens), np.asarray(result.logits)
    changed = 0
    for b, prompt in enumerate(prompts):
        seen = set(prompt.tolist())
        for t in range(NEW):
            z = logits[b, t].copy()
            index = np.array(sorted(seen))
            z[index] = np.where(z[index] > 0, z[index] / penalty, z[index] * penalty)
            assert tokens[b, t] == np.argmax(z), (b, t)
            changed += int(np.argmax(logits[b, t]) != tokens[b, t])
            seen.add(int(tokens[b, t]))
    assert changed > 0  # the penalty did change some choices


def test_sampling_is_seeded_and_respects_top_k():
    model = models.LanguageModel(tiny(), rngs=nnx.Rngs(0))
    prompt = jnp.zeros((3, 4), jnp.int32)
    first = models.generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    again = models.generate(model, prompt, 10, temperature=1.0, top_k=5, seed=3)
    other = models.generate(model, prompt, 10, temperature=1.0, top_k=5, seed=4)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((64, 50)))
    draws = jax.vmap(lambda k: models.sample_token(logits, k, 1.0, 3))(
        jax.random.split(jax.random.key(0), 20)
    )
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(np.isin(draws[:, i], top3[i]).all() for i in range(64))


def test_generation_input_errors():
    model = models.LanguageModel(tiny(), rngs=nnx.Rngs(0))
    prompt = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="prompt_tokens"):
        models.generate(model, jnp.zeros((2, 0), jnp.int32), 3)
    with pytest.raises(ValueError, match=r"prompt_tokens\[1\]"):
        models.generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match=r"prompt_tokens\[0\]` must lie in \[0, vocab_size"):
        models.generate(model, [[1, 256]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.generate(model, prompt, 0)
    with pytest.raises(ValueError, match="top_k"):
        models.generate(model, prompt, 2, top_k=1000)
    with pytest.raises(ValueError, match="top_p"):
        models.generate(model, prompt, 2, top_p=1.5)
    with pytest.raises(ValueError, match="prompt_lengths"):
        models.generate(model, prompt, 2, prompt_lengths=[3, 4])
    with pytest.raises(ValueError, match="stop_tokens"):
        models.generate(model, prompt, 2, stop_tokens=[-1])
    with pytest.raises(ValueError, match="pad_id"):
        models.generate(model, prompt, 2, pad_id=300)
    with pytest.raises(ValueError, match="either `sampling` or the separate options"):
        models.generate(model, prompt, 2, top_k=3, sampling=GREEDY)
    with pytest.raises(TypeError, match="tokens` must be int"):
        model(jnp.zeros((2, 3)))


# --- the sampling filters against numpy references -------------------------------------


def softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_p_reference(z: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest most-likely-first prefix of mass ≥ p and every token tied with
    its last one; asserts p is not within 1e-4 of a prefix mass (float32 safe)."""
    probs = softmax64(z)
    keep = np.zeros(z.shape, bool)
    for b, row in enumerate(probs):
        ordered = np.sort(row)[::-1]
        mass = np.cumsum(ordered)
        assert np.min(np.abs(mass - p)) > 1e-4
        threshold = ordered[np.argmax(mass >= p)]
        keep[b] = row >= threshold
    return keep


def min_p_reference(z: np.ndarray, min_p: float) -> np.ndarray:
    probs = softmax64(z)
    top = probs.max(-1, keepdims=True)
    bound = min_p * top
    assert not np.any((np.abs(probs - bound) < 1e-6) & (probs < top))  # float32 safe
    return probs >= bound


def filter_logits() -> np.ndarray:
    """8 rows over 12 tokens, logits on a 0.5 grid: many ties."""
    return np.random.default_rng(1).integers(-6, 5, (8, 12)).astype(np.float32) / 2


def test_top_k_keeps_the_k_largest_and_their_ties():
    z = filter_logits()
    for k in (1, 3, 12):
        kth = np.sort(z, -1)[:, -k][:, None]
        assert np.array_equal(sampling.top_k_mask(jnp.asarray(z), k), z >= kth), k


def test_top_p_keeps_the_smallest_nucleus_with_ties():
    z = filter_logits()
    for p in (0.05, 0.3, 0.55, 0.9, 0.99):
        expected = top_p_reference(z, p)
        assert np.array_equal(sampling.top_p_mask(jnp.asarray(z), p), expected), p
    # ties kept together: two equally likely tokens, p inside the first one's mass
    z = np.array([[2.0, 2.0, 0.0, -1.0]], np.float32)
    assert np.array_equal(sampling.top_p_mask(jnp.asarray(z), 0.1), [[True, True, False, False]])


def test_min_p_keeps_tokens_within_a_factor_of_the_most_likely():
    z = filter_logits() + 0.01 * np.arange(12, dtype=np.float32)  # no p on the bound
    for min_p in (0.0, 0.07, 0.3, 1.0):
        mask = sampling.min_p_mask(jnp.asarray(z), min_p)
        assert np.array_equal(mask, min_p_reference(z, min_p)), min_p


def test_processing_applies_penalty_temperature_and_filters_in_order():
    z = filter_logits() + 0.01 * np.arange(12, dtype=np.float32)
    seen = np.random.default_rng(2).random(z.shape) < 0.3
    options = models.SamplingOptions(
        temperature=0.7, top_k=8, top_p=0.83, min_p=0.05, repetition_penalty=1.3
    )
    out = np.asarray(sampling.process_logits(jnp.asarray(z), options, jnp.asarray(seen)))
    ref = np.where(seen, np.where(z > 0, z / 1.3, z * 1.3), z) / 0.7
    ref = np.where(ref >= np.sort(ref, -1)[:, -8][:, None], ref, -np.inf)
    ref = np.where(top_p_reference(ref, 0.83), ref, -np.inf)
    ref = np.where(min_p_reference(ref, 0.05), ref, -np.inf)
    assert np.array_equal(np.isinf(out), np.isinf(ref))
    assert_close(out[~np.isinf(out)], ref[~np.isinf(ref)], 1e-6, "kept logits")
    draw = jax.jit(
        jax.vmap(lambda key: sampling.sample_token(jnp.asarray(z), key, options, seen=seen))
    )
    draws = draw(jax.random.split(jax.random.key(0), 200))
    assert np.all(np.isfinite(ref[np.arange(8)[None], np.asarray(draws)]))
    greedy = models.SamplingOptions(temperature=0, top_k=2, repetition_penalty=1.3)
    penalised = np.where(seen, np.where(z > 0, z / 1.3, z * 1.3), z)
    assert np.array_equal(
        sampling.sample_token(jnp.asarray(z), jax.random.key(0), greedy, seen=seen),
        np.argmax(penalised, -1),
    )


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("temperature", -0.1, ValueError),
        ("temperature", float("nan"), ValueError),
        ("top_k", 0, ValueError),
        ("top_k", 2.5, TypeError),
        ("top_p", 0.0, ValueError),
        ("top_p", 1.01, ValueError),
        ("min_p", -0.5, ValueError),
        ("min_p", 1.5, ValueError),
        ("repetition_penalty", 0.0, ValueError),
        ("repetition_penalty", "2", TypeError),
    ],
)
def test_sampling_options_name_the_bad_field(field, value, error):
    with pytest.raises(error, match=f"SamplingOptions: `{field}` must be"):
        models.SamplingOptions(**{field: value})
