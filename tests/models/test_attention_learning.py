"""Softmax and sigmoid attention learn what a two-layer transformer is known to learn,
with the library's default initialisation and optimiser.

Three probes of the circuit that associative recall needs (Olsson et al. 2022), each
small enough to train in seconds on a CPU:

- **previous token** (one layer): copy the token before. Attention has to find a
  fixed relative position through RoPE alone.
- **induction** (two layers): a random sequence repeated; in the repeat, predict the
  next token from where the current one appeared before (a previous-token head in
  layer 1, a content-matching head in layer 2).
- **MQAR** (two layers, through the trainer as ``xformjax train`` runs it): 4
  key-value pairs over 32 keys and 32 values at d_model 64, 2 heads.

With the GPT-2 convention the model used before (token embeddings of std 0.02, not
scaled, next to fan-in-scaled projections whose outputs are ~1 per coordinate), the
token signal was 1/50 of the first block's output in the residual stream, and two
attention layers stayed at 28–31 % on 4-pair MQAR after 2000–3000 steps (the 25 % of
guessing among the in-context values) and learned induction on one seed of two. With
the default (Gemma's: embeddings of std 1/√d scaled by √d, so the residual stream
starts at unit scale) they reach 99.85–100 % in 400 steps on seeds 0–4. Sigmoid
attention needed a second change, its default bias (see :mod:`xformjax.nn.attention`):
with the old ``−log(max_seq_len)`` it stayed at 28–32 % (seeds 0–4), with the new
per-query ``1 − log n_i`` it reaches 99.4–100 %. Measured on a 2-core CPU with the
test session's 8 host devices; the measurements are in ``docs/development.md``.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from xformjax import train
from xformjax.models import LanguageModel, LMConfig
from xformjax.nn import MixerConfig
from xformjax.train.config import TrainConfig
from xformjax.train.optimizer import make_optimizer
from xformjax.train.trainer import loss_and_metrics

# learning runs: the time goes to running the compiled steps
pytestmark = pytest.mark.optimized

VOCAB = 32


def previous_token_batch(rng: np.random.Generator, batch: int, length: int = 16):
    tokens = rng.integers(0, VOCAB, (batch, length))
    targets = np.concatenate([np.zeros((batch, 1), int), tokens[:, :-1]], 1)
    mask = np.ones((batch, length))
    mask[:, 0] = 0
    return {"inputs": tokens, "targets": targets, "mask": mask}


def induction_batch(
    rng: np.random.Generator, batch: int, segment: int = 8, length: int = 24, jitter: int = 4
):
    """A segment of distinct tokens that occurs twice, at random places, among filler
    tokens that are not in it; within the second occurrence the target at each token
    is the token that followed it the first time. The random gap rules out a
    fixed-offset head: only matching the earlier occurrence's previous token works."""
    inputs = np.zeros((batch, length), int)
    targets = np.zeros((batch, length), int)
    mask = np.zeros((batch, length))
    for row in range(batch):
        tokens = rng.permutation(VOCAB)
        piece, filler = tokens[:segment], tokens[segment:]
        first = rng.integers(0, jitter + 1)
        second = first + segment + rng.integers(0, jitter + 1)
        inputs[row] = rng.choice(filler, length)
        inputs[row, first : first + segment] = piece
        inputs[row, second : second + segment] = piece
        targets[row, second : second + segment - 1] = piece[1:]
        mask[row, second : second + segment - 1] = 1
    return {"inputs": inputs, "targets": targets, "mask": mask}


def train_on(make_batch, layers: int, steps: int, seed: int = 0) -> float:
    """Accuracy on 256 held-out examples after ``steps`` AdamW steps (the library's
    defaults: learning rate 3e-3, 100 warm-up steps, weight decay 0.1) of 64
    examples, for ``layers`` softmax-attention layers at d_model 64, 2 heads."""
    config = LMConfig(
        num_layers=layers,
        layer_pattern="attn",
        vocab_size=VOCAB,
        mixer=MixerConfig(d_model=64, num_heads=2),
    )
    model = LanguageModel(config, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(
        model, make_optimizer(TrainConfig(steps=steps, batch_size=64)), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, optimizer, batch):
        grads = nnx.grad(lambda m: loss_and_metrics(m, batch, 0.0)[0])(model)
        optimizer.update(model, grads)

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        step(model, optimizer, make_batch(rng, 64))
    held_out = make_batch(np.random.default_rng(10_000 + seed), 256)
    return float(nnx.jit(lambda m, b: loss_and_metrics(m, b, 0.0)[1])(model, held_out)["accuracy"])


def test_one_attention_layer_learns_the_previous_token():
    # 100 % on seeds 0 and 1 after 150 steps (also with the old initialisation)
    assert train_on(previous_token_batch, layers=1, steps=150) > 0.98


def test_two_attention_layers_learn_induction():
    # 100 % and 99.7 % on seeds 0 and 1 after 300 steps (the old initialisation: 98.3 %
    # and 51.4 % after 600; sigmoid attention with the old bias: 26–31 % after 600)
    assert train_on(induction_batch, layers=2, steps=300) > 0.98


def mqar_accuracy(pattern: str, seed: int, tmp_root: str) -> float:
    """The user's path: the ``tiny`` preset through the trainer, only the task, the
    depth and the width changed; 400 steps of 64 sequences."""
    config = train.load_config(
        "tiny",
        [
            "data.name=mqar",
            "data.options.num_pairs=4",
            "data.options.num_queries=4",
            "data.options.num_keys=32",
            "data.options.num_values=32",
            f"model.layer_pattern={pattern}",
            "model.num_layers=2",
            "model.mixer.d_model=64",
            "model.mixer.num_heads=2",
            "train.steps=400",
            f"train.seed={seed}",
            "train.batch_size=64",
            "train.log_every=1000",
            "train.eval_every=100000",
            "train.eval_batches=8",
            "train.checkpoint_every=100000",
        ],
    )
    trainer = train.Trainer(config, f"{tmp_root}/{pattern}", progress=False)
    return trainer.run()["accuracy"]


# Just under the worst of seeds 0–4: attn 99.85 % (seed 3), sigmoid_attn 99.41 % (seed 0).
MQAR_FLOOR = 0.99


@pytest.mark.parametrize("pattern", ["attn", "sigmoid_attn"])
def test_two_attention_layers_recall_four_pairs(pattern, tmp_path):
    accuracy = mqar_accuracy(pattern, 0, str(tmp_path))
    assert accuracy > MQAR_FLOOR, (pattern, accuracy)
