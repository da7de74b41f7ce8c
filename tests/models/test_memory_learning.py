"""Learning on MQAR: Mixture-of-Memories and Titans recall far better than plain linear
attention of the same width (one layer, d_model 32, 1000 steps of 32 sequences).

Multi-query associative recall with 6 key-value pairs over 16 keys and 16 values;
chance is 1/16. Measured on a 2-core CPU with the test session's 8 host devices,
with the default initialisation (unit-scale embeddings, since 0.2.0): linear
attention 29.2 %, MoM 100 %, Titans (MAL, surprise clipped at the default
``max_surprise_norm=4``) 99.0 % query accuracy (before: 29 %, 99.9 %, 99.7 %);
the file takes under a minute under ``pytest -n 2`` (three tests, run side by side).
MQAR training has a phase transition that some seeds reach late: with training
seeds 1, 2 and 4, MoM scored 60, 99.6 and 98 % (one host device), so the floor is
set 25 points above the baseline rather than near the typical result.
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


# Plain linear attention's accuracy stays under the ceiling; each memory layer clears
# the floor, which is the baseline's measured value (29 %) plus 25 points. Each run is
# its own test, so the three train side by side under pytest-xdist.
BASELINE_CEILING = 0.45
MEMORY_FLOOR = 0.55


def test_linear_attention_cannot_recall_six_pairs(tmp_path):
    baseline = mqar_accuracy("linear_attn", str(tmp_path))
    assert baseline < BASELINE_CEILING, f"linear attention reached {baseline:.3f}: too easy"


@pytest.mark.parametrize("pattern", ["mom", "titans"])
def test_memory_layer_recalls_far_better_than_linear_attention(pattern, tmp_path):
    accuracy = mqar_accuracy(pattern, str(tmp_path))
    assert accuracy > MEMORY_FLOOR, (pattern, accuracy)
