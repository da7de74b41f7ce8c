"""The trainer in-process: synthetic tasks, gradient accumulation, data-parallel mesh,
the non-finite stop, the schedule and the configuration rules."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from xformjax import train
from xformjax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask

TASK = [
    "data.name=parity",
    "data.options.max_length=12",
    "data.options.min_length=2",
    "model.vocab_size=3",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
]


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_task_training_with_accumulation_and_a_data_parallel_mesh(tmp_path):
    single = train.load_config("tiny", TASK + ["train.steps=6", "train.grad_accum=2"])
    final = train.Trainer(single, tmp_path / "single", progress=False).run()
    assert 0 <= final["accuracy"] <= 1 and "bits_per_byte" not in final
    records = _records(tmp_path / "single")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 7))
    assert all("accuracy" in r for r in records)

    # the same run on a 2-device data-parallel mesh gives the same losses
    sharded = train.load_config(
        "tiny", TASK + ["train.steps=6", "train.grad_accum=2", "mesh.data=2"]
    )
    assert jax.device_count() >= 2
    train.Trainer(sharded, tmp_path / "sharded", progress=False).run()
    losses = [r["loss"] for r in _records(tmp_path / "single") if r["split"] == "train"]
    sharded_losses = [r["loss"] for r in _records(tmp_path / "sharded") if r["split"] == "train"]
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-4)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = train.load_config(
        "tiny",
        TASK
        + [
            "train.steps=40",
            "train.checkpoint_every=2",
            "train.learning_rate=1e9",
            "train.grad_clip=0",
            "train.warmup_steps=0",
            "train.weight_decay=0",
        ],
    )
    trainer = train.Trainer(config, tmp_path / "run", progress=False)
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step (\d+)") as info:
        trainer.run()
    error = info.value
    assert error.last_checkpoint is not None and error.last_checkpoint < error.step
    assert trainer.checkpointer.latest_step() == error.last_checkpoint
    restored = train.Trainer(config, tmp_path / "run", progress=False)
    restored.checkpointer.restore_model(restored.model)
    import flax.nnx as nnx

    leaves = jax.tree.leaves(nnx.state(restored.model, nnx.Param))
    assert all(bool(np.all(np.isfinite(leaf))) for leaf in leaves)
    logged = [r["step"] for r in _records(tmp_path / "run") if r["split"] == "train"]
    assert max(logged) < error.step, "the bad step must not be logged"


def test_warmup_cosine_schedule():
    config = train.TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    schedule = learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(55)) == pytest.approx(0.55, rel=1e-3)
    assert float(schedule(100)) == pytest.approx(0.1)


def test_config_rules():
    config = train.load_config("tiny", {"model.mixer.num_heads": 4, "train.steps": 7})
    assert config.model.mixer.num_heads == 4 and config.train.steps == 7
    with pytest.raises(ValueError, match="'train' is a section"):
        train.load_config("tiny", ["train=3"])
    with pytest.raises(ValueError, match="not options of task 'parity'; valid:"):
        train.load_config("tiny", ["data.name=parity", "data.options.num_pairs=3"])
    with pytest.raises(ValueError, match="train.grad_accum must be ≥ 1"):
        train.load_config("tiny", ["train.grad_accum=0"])
    with pytest.raises(ValueError, match="expects key=value"):
        train.load_config("tiny", ["train.steps"])
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        train.load_config("tiny", ["mesh.data=-1", "mesh.seq=-1"])
    with pytest.raises(ValueError, match="mesh.tensor must be ≥ 1 or -1"):
        train.load_config("tiny", ["mesh.tensor=0"])
    with pytest.raises(ValueError, match="batch_size=4 must divide over mesh.data × mesh.fsdp = 3"):
        train.Trainer(
            train.load_config("tiny", TASK + ["mesh.data=3"]), "/tmp/never", progress=False
        )
    with pytest.raises(ValueError, match="sequence length 15 must divide over mesh.seq = 2"):
        train.Trainer(
            train.load_config("tiny", TASK + ["mesh.seq=2", "data.options.max_length=15"]),
            "/tmp/never",
            progress=False,
        )
    with pytest.raises(ValueError, match="needs 16 devices; 8 available"):
        train.Trainer(
            train.load_config("tiny", TASK + ["mesh.data=2", "mesh.seq=8"]),
            "/tmp/never",
            progress=False,
        )


def test_loss_is_masked_cross_entropy_plus_weighted_auxiliary_losses():
    import jax.numpy as jnp

    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))

    seen = []

    def model(tokens, *, segment_ids=None, positions=None):
        seen.append((segment_ids, positions))
        return logits, [
            SimpleNamespace(aux_loss=jnp.array(2.0)),
            SimpleNamespace(position=3),
            SimpleNamespace(aux_loss=1.0),
        ]

    batch = {
        "inputs": jnp.zeros((1, 3), jnp.int32),
        "targets": jnp.array([[0, 2, 1]]),
        "mask": jnp.array([[1.0, 1.0, 0.0]]),
    }
    loss, metrics = train.loss_and_metrics(model, batch, aux_weight=0.1)
    cross_entropy = -(np.log(0.5) + np.log(0.1)) / 2
    assert float(metrics["cross_entropy"]) == pytest.approx(cross_entropy, rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(cross_entropy + 0.1 * 3.0, rel=1e-6)
    # a packed batch's documents reach the model; a task batch has none
    packing = {"segment_ids": jnp.array([[1, 1, 2]]), "positions": jnp.array([[0, 1, 0]])}
    train.loss_and_metrics(model, {**batch, **packing}, aux_weight=0.1)
    assert seen[0] == (None, None) and seen[1][0] is packing["segment_ids"]
    assert seen[1][1] is packing["positions"]


def test_weight_decay_applies_to_the_matrices_but_not_norms_gates_or_the_embedding():
    import jax.numpy as jnp
    from flax import nnx

    from xformjax.models import LanguageModel, LMConfig

    model = LanguageModel(LMConfig.preset("tiny"), rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    decayed = {
        jax.tree_util.keystr(path): flag
        for path, flag in jax.tree_util.tree_flatten_with_path(weight_decay_mask(params))[0]
    }
    assert decayed["['blocks'][1]['mixer']['q_proj']['kernel']"]
    assert decayed["['blocks'][0]['mlp']['down']['kernel']"]
    assert not decayed["['embedding']"]
    assert not decayed["['final_norm']['scale']"]
    assert not decayed["['blocks'][0]['mixer']['dt_bias']"]
    # zero gradients: only weight decay moves parameters, and only the decayed ones
    config = train.TrainConfig(steps=10, learning_rate=1e-2, weight_decay=0.5, warmup_steps=1)
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, after)
    assert moved == weight_decay_mask(params)


def test_check_values_switch_checks_the_train_and_eval_steps_in_their_programs(tmp_path):
    """With ``check_values`` on, the trainer's jitted steps are functionalized by
    checkify (a step that was not would fail to trace: the model checks its tokens
    there) and train."""
    import xformjax

    config = train.load_config(
        "tiny", TASK + ["train.steps=2", "train.warmup_steps=1", "train.eval_every=2"]
    )
    with xformjax.config.override("check_values", True):
        train.Trainer(config, tmp_path, progress=False).run()
    records = _records(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"),
        (2, "train"),
        (2, "validation"),
    ]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_text_validation_batches_do_not_depend_on_the_training_seed(tmp_path):
    """Runs with different seeds train on differently shuffled bytes but are scored on
    the same validation bytes, so their scores differ by the model, not the sample."""
    from xformjax.train.trainer import build_datasets

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"doc_{i}.py").write_text(f"value_{i} = {i}\n" * (i % 9 + 1))

    def first_batches(seed: int):
        config = train.load_config(
            "tiny",
            [
                "data.name=text",
                f"data.path={corpus}",
                "data.validation_fraction=0.3",
                f"data.data_dir={tmp_path / 'tfds'}",
                f"train.seed={seed}",
                "train.seq_len=32",
                "train.batch_size=4",
            ],
        )
        datasets = build_datasets(config)
        return next(iter(datasets.train))["inputs"], next(iter(datasets.validation))["inputs"]

    train_0, validation_0 = first_batches(0)
    train_3, validation_3 = first_batches(3)
    np.testing.assert_array_equal(validation_0, validation_3)
    assert not np.array_equal(train_0, train_3)
