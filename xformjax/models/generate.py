"""Autoregressive generation with the mixers' recurrent states as the cache.

The prompts are run once (prefill) into a cache allocated for ``prompt +
max_new_tokens`` tokens; every new token is then one step of each layer's
recurrence: the linear and delta-rule families carry a constant-size memory, the
softmax layers a KV cache. Prefill and decoding are one jitted program, the decoding
loop a ``lax.scan`` over the new tokens (compiled once per model structure, batch,
prompt width, length and options, then reused).

Prompts of different lengths are left-padded with ``pad_id`` to the longest and
decode exactly as each would alone: the padding is a document of its own (segment id
0, the prompt and its continuation segment 1; :mod:`xformjax.nn.packing`), so the
recurrences start the prompt from the empty state, the short convolutions and
attention do not read the padding, and positions (RoPE) count from each prompt's
first token, in the prefill and in every decoding step. A batch of equal lengths runs
without segment ids.

A row that emits one of ``stop_tokens`` is finished: the positions after it hold
``pad_id`` (default 0), and :attr:`Generation.lengths` counts its tokens up to and
including the stop token. The scan still runs ``max_new_tokens`` steps (the finished
rows are fed ``pad_id``; their logits past their length mean nothing).

How each token is chosen: :mod:`xformjax.models.sampling`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xformjax import config as library_config
from xformjax.models.lm import LanguageModel
from xformjax.models.sampling import SamplingOptions, sample_token

__all__ = ["Generation", "complete", "generate", "sample_token"]


@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`complete` returns.

    Attributes:
      tokens: int32 ``[B, N]`` (``N = max_new_tokens``), ``pad_id`` after a row's stop
        token.
      lengths: int32 ``[B]``: the tokens each row generated, its stop token included
        (``N`` for a row that never stopped).
      stopped: bool ``[B]``: the row emitted a stop token.
      logits: float32 ``[B, N, vocab]``, the model's logits each token was drawn from
        (before the penalty, temperature and filters), or ``None`` unless asked for.
    """

    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    logits: jax.Array | None = None

    def sequences(self) -> list[np.ndarray]:
        """Each row's generated tokens up to its length (stop token included)."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        return [row[:length] for row, length in zip(tokens, lengths, strict=True)]


def _prompt_rows(prompt_tokens: Any, prompt_lengths: Any) -> list[np.ndarray]:
    """The prompts as a list of 1-D int arrays (``ValueError``/``TypeError`` naming
    the argument)."""
    is_matrix = hasattr(prompt_tokens, "shape") or (
        isinstance(prompt_tokens, Sequence)
        and len(prompt_tokens) > 0
        and not isinstance(prompt_tokens[0], Sequence | np.ndarray | jax.Array)
    )
    if is_matrix or prompt_lengths is not None:
        matrix = np.asarray(prompt_tokens)
        if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
            raise ValueError(
                "generate: `prompt_tokens` must be [B, P] with B, P ≥ 1 or a list of "
                f"token sequences; got shape {matrix.shape}"
            )
        if prompt_lengths is None:
            return list(matrix)
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (matrix.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(
                f"generate: `prompt_lengths` must be {matrix.shape[0]} integers (one per "
                f"row); got {prompt_lengths!r}"
            )
        if np.any(lengths < 1) or np.any(lengths > matrix.shape[1]):
            raise ValueError(
                f"generate: `prompt_lengths` must lie in [1, P={matrix.shape[1]}]; "
                f"got {lengths.tolist()}"
            )
        return [row[:length] for row, length in zip(matrix, lengths, strict=True)]
    if not isinstance(prompt_tokens, Sequence) or len(prompt_tokens) == 0:
        raise ValueError(
            "generate: `prompt_tokens` must be [B, P] or a non-empty list of token "
            f"sequences; got {type(prompt_tokens).__name__}"
        )
    rows = [np.asarray(row) for row in prompt_tokens]
    for index, row in enumerate(rows):
        if row.ndim != 1 or row.shape[0] < 1:
            raise ValueError(
                f"generate: `prompt_tokens[{index}]` must be a non-empty 1-D token "
                f"sequence; got shape {row.shape}"
            )
    return rows


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"generate: `{name}` must hold integer token ids; got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"generate: `{name}` must lie in [0, vocab_size={vocab_size}); got {bad}")


@functools.lru_cache(maxsize=32)
def _decoder(
    graphdef,
    batch: int,
    width: int,
    max_new_tokens: int,
    options: SamplingOptions,
    ragged: bool,
    return_logits: bool,
):
    """The jitted prefill + decoding program for these static settings (the stop
    tokens, ``[S]`` with ``-1`` for none, and the pad id are arguments: changing them
    does not compile again)."""

    def run(params, prompt, lengths, stops, pad_id, key):
        module = nnx.merge(graphdef, params)
        module.eval()  # a copy: σReparam estimates stay fixed while decoding
        cache = module.init_cache(batch, width + max_new_tokens)
        rows = jnp.arange(batch)
        pad = width - lengths  # [B] leading padding tokens
        if ragged:
            index = jnp.arange(width, dtype=jnp.int32)[None]
            real = index >= pad[:, None]
            packing = {
                "segment_ids": real.astype(jnp.int32),
                "positions": jnp.maximum(index - pad[:, None], 0),
            }
        else:
            real = jnp.ones((batch, width), bool)
            packing = {}
        logits, cache = module(prompt, cache, **packing)
        first_logits = logits[:, -1]
        seen = None
        if options.repetition_penalty != 1:
            size = first_logits.shape[-1]
            seen = jnp.zeros((batch, size), jnp.int32).at[rows[:, None], prompt].max(real)
            seen = seen.astype(bool)
        key, step_key = jax.random.split(key)
        first = sample_token(first_logits, step_key, options, seen=seen)
        done = jnp.isin(first, stops)
        count = jnp.ones((batch,), jnp.int32)
        if seen is not None:
            seen = seen.at[rows, first].set(True)

        def step(carry, offset):
            token, cache, key, done, count, seen = carry
            if ragged:  # the prompt's document continues at its own positions
                step_packing = {
                    "segment_ids": jnp.ones((batch, 1), jnp.int32),
                    "positions": (lengths + offset)[:, None],
                }
            else:
                step_packing = {}
            logits, cache = module(token[:, None], cache, **step_packing)
            key, step_key = jax.random.split(key)
            next_token = sample_token(logits[:, -1], step_key, options, seen=seen)
            next_token = jnp.where(done, pad_id, next_token)
            count = count + (~done).astype(jnp.int32)
            done = done | jnp.isin(next_token, stops)
            if seen is not None:
                seen = seen.at[rows, next_token].set(True)
            out = (next_token, logits[:, -1] if return_logits else None)
            return (next_token, cache, key, done, count, seen), out

        carry = (first, cache, key, done, count, seen)
        offsets = jnp.arange(max_new_tokens - 1, dtype=jnp.int32)
        (_, _, _, done, count, _), (step_tokens, step_logits) = jax.lax.scan(step, carry, offsets)
        tokens = jnp.concatenate([first[:, None], jnp.moveaxis(step_tokens, 0, 1)], axis=1)
        all_logits = None
        if step_logits is not None:
            all_logits = jnp.concatenate(
                [first_logits[:, None], jnp.moveaxis(step_logits, 0, 1)], axis=1
            )
        return tokens, count, done, all_logits

    return jax.jit(run)


def complete(
    model: LanguageModel,
    prompt_tokens: Any,
    max_new_tokens: int,
    *,
    sampling: SamplingOptions | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    prompt_lengths: Any = None,
    return_logits: bool = False,
) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: a :class:`LanguageModel`; decoding runs a copy in eval mode (σReparam
        estimates fixed), the model itself is not changed.
      prompt_tokens: int ``[B, P]`` (``P ≥ 1``), or a list of ``B`` non-empty token
        sequences of any lengths (left-padded with ``pad_id`` to the longest; module
        docstring).
      max_new_tokens: tokens to generate per row (int ≥ 1).
      sampling: how each token is chosen (default :class:`SamplingOptions()`:
        temperature 1, no filter).
      seed: PRNG seed of the sampler.
      stop_tokens: ids that finish a row (e.g. an end-of-text id).
      pad_id: the id that fills a row after its stop token and pads short prompts.
      prompt_lengths: with ``prompt_tokens`` ``[B, P]``: the first ``prompt_lengths[b]``
        tokens of row ``b`` are its prompt (``[B]`` ints in ``[1, P]``).
      return_logits: also return the logits each token was drawn from.

    Returns:
      a :class:`Generation`.
    """
    vocab_size = model.config.vocab_size
    rows = _prompt_rows(prompt_tokens, prompt_lengths)
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"generate: `max_new_tokens` must be an int ≥ 1; got {max_new_tokens!r}")
    sampling = SamplingOptions() if sampling is None else sampling
    if not isinstance(sampling, SamplingOptions):
        raise TypeError(
            f"generate: `sampling` must be a SamplingOptions; got {type(sampling).__name__}"
        )
    sampling.check_vocab(vocab_size)
    stops = np.asarray(list(stop_tokens))
    _check_ids("stop_tokens", stops, vocab_size)
    _check_ids("pad_id", np.asarray([pad_id]), vocab_size)
    for index, row in enumerate(rows):
        _check_ids(f"prompt_tokens[{index}]", row, vocab_size)
    lengths = np.array([row.shape[0] for row in rows], np.int32)
    width = int(lengths.max())
    prompt = np.full((len(rows), width), pad_id, np.int32)
    for index, row in enumerate(rows):
        prompt[index, width - row.shape[0] :] = row
    graphdef, params = nnx.split(model)
    run = _decoder(
        graphdef,
        len(rows),
        width,
        int(max_new_tokens),
        sampling,
        bool(np.any(lengths < width)),
        bool(return_logits),
    )
    decode = library_config.checked_if_on(run)
    # padded with -1 (never a token) to a multiple of 8: up to 7 stop ids share a program
    stops = np.pad(stops.astype(np.int32), (0, 8 - stops.size % 8), constant_values=-1)
    tokens, counts, done, logits = decode(
        params,
        jnp.asarray(prompt),
        jnp.asarray(lengths),
        jnp.asarray(stops),
        jnp.int32(pad_id),
        jax.random.key(seed),
    )
    return Generation(tokens, counts, done, logits)


def generate(
    model: LanguageModel,
    prompt_tokens: Any,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    *,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    sampling: SamplingOptions | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    prompt_lengths: Any = None,
    return_logits: bool = False,
):
    """:func:`complete` returning arrays: ``[B, max_new_tokens]`` int32 tokens, and with
    ``return_logits`` the ``[B, max_new_tokens, vocab]`` logits as well.

    The sampling settings come either as ``sampling`` or as the separate arguments
    ``temperature`` (``0``: greedy), ``top_k``, ``top_p``, ``min_p`` and
    ``repetition_penalty`` (:class:`SamplingOptions`), not both. With ``stop_tokens``
    a finished row is filled with ``pad_id``; :func:`complete` also gives the lengths.
    """
    separate = SamplingOptions(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
    )
    if sampling is not None and separate != SamplingOptions():
        raise ValueError(
            "generate: give either `sampling` or the separate options (temperature, "
            "top_k, top_p, min_p, repetition_penalty), not both"
        )
    result = complete(
        model,
        prompt_tokens,
        max_new_tokens,
        sampling=separate if sampling is None else sampling,
        seed=seed,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
        prompt_lengths=prompt_lengths,
        return_logits=return_logits,
    )
    return (result.tokens, result.logits) if return_logits else result.tokens
