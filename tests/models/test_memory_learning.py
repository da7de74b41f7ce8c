"""Learning on MQAR: Mixture-of-Memories and Titans recall far better than plain linear
attention of the same width (one layer, d_model 32, 1000 steps of 32 sequences).

Multi-query associative recall with 6 key-value pairs over 16 keys and 16 values;
chance is 1/16; the score is the query accuracy on 4 validation batches (768
queries, so one query is 0.13 points). The trainer's mesh is its default, every axis
1: it trains on one device even with the test session's 8 host devices (the device
count still changes XLA:CPU's rounding a little, hence the second table). Measured
with these exact settings, training seeds 0–7 (the test trains seed 0), 8 host
devices, jax 0.10.2 on a 2-core CPU:

    seed          0      1      2      3      4      5      6      7     worst
    linear_attn 29.17  30.34  28.91  30.99  31.51  28.26  30.99  29.17   31.51 (max)
    mom        100.00  99.87 100.00  99.87 100.00 100.00  99.74 100.00   99.74
    titans      98.96 100.00 100.00  99.48 100.00 100.00  99.74  99.48   98.96

One host device: mom seeds 1, 2, 4 → 99.74, 100, 100; titans seed 0 → 99.22. (An
earlier note recorded 60 % for MoM seed 1 on one host device; that does not
reproduce with the current code.) Every seed reaches the phase
transition by step ~500 (training accuracy per 100 steps, mom seed 6: 6, 21, 51, 78,
98, 99, 99, 96, 99, 100 %), so the floors sit just under the worst seed of each
layer, and the ceiling just over linear attention's best. One case takes ~30 s of
wall time on an idle 2-core machine.
"""

from __future__ import annotations

import pytest

from xformjax import train

STEPS = 1000


def mqar_accuracy(pattern: str, tmp_root: str) -> float:
    config = train.load_config(
        "tiny",
        [
            "data.name=mqar",
            "data.options.num_pairs=6",
            "data.options.num_queries=6",
            "data.options.num_keys=16",
            "data.options.num_values=16",
            f"model.layer_pattern={pattern}",
            "model.num_layers=1",
            "model.mixer.d_model=32",
            "model.mixer.num_heads=2",
            "model.mixer.chunk_size=8",
            f"train.steps={STEPS}",
            "train.batch_size=32",
            "train.learning_rate=5e-3",
            "train.warmup_steps=20",
            "train.log_every=1000",
            "train.eval_every=100000",
            "train.eval_batches=4",
            "train.checkpoint_every=100000",
        ],
    )
    trainer = train.Trainer(config, f"{tmp_root}/{pattern}", progress=False)
    return trainer.run()["accuracy"]


# Plain linear attention's accuracy stays under the ceiling (its best seed: 31.5 %); each
# memory layer clears its floor, just under its worst seed (see the module docstring).
# Each run is its own test, so the three train side by side under pytest-xdist.
BASELINE_CEILING = 0.35
MEMORY_FLOORS = {"mom": 0.99, "titans": 0.98}


def test_linear_attention_cannot_recall_six_pairs(tmp_path):
    baseline = mqar_accuracy("linear_attn", str(tmp_path))
    assert baseline < BASELINE_CEILING, f"linear attention reached {baseline:.3f}: too easy"


@pytest.mark.parametrize("pattern", sorted(MEMORY_FLOORS))
def test_memory_layer_recalls_far_better_than_linear_attention(pattern, tmp_path):
    accuracy = mqar_accuracy(pattern, str(tmp_path))
    assert accuracy > MEMORY_FLOORS[pattern], (pattern, accuracy)
