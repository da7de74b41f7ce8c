"""The mesh, the logical-axis rules, sharded creation, a hybrid LM under sequence
parallelism and one full sharded train step, against one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tests.ops.helpers import assert_close
from xformjax import parallel, train
from xformjax.models import LanguageModel, LMConfig
from xformjax.parallel.distributed import distributed_reason


def test_mesh_shapes_fill_and_errors():
    assert parallel.resolve_mesh_shape({"data": 2, "seq": -1}, 8) == {
        "data": 2,
        "fsdp": 1,
        "tensor": 1,
        "seq": 4,
    }
    assert parallel.resolve_mesh_shape({}, 8) == {"data": 1, "fsdp": 1, "tensor": 1, "seq": 1}
    with pytest.raises(ValueError, match="unknown mesh axes \\['gpu'\\]"):
        parallel.resolve_mesh_shape({"gpu": 2}, 8)
    with pytest.raises(ValueError, match="8 devices do not divide by the fixed axes' product 3"):
        parallel.resolve_mesh_shape({"data": 3, "seq": -1}, 8)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        parallel.resolve_mesh_shape({"data": -1, "seq": -1}, 8)
    with pytest.raises(ValueError, match="needs 16 devices; 8 available"):
        parallel.resolve_mesh_shape({"data": 4, "tensor": 4}, 8)
    mesh = parallel.make_mesh({"fsdp": 2, "tensor": -1})
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {
        "data": 1,
        "fsdp": 2,
        "tensor": 4,
        "seq": 1,
    }
    assert mesh.devices.size == 8


def test_logical_rules_drop_what_cannot_split():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2, "seq": 2}
    spec = parallel.logical_to_spec
    assert spec(("embed", "heads"), (64, 32), sizes) == PartitionSpec("fsdp", "tensor")
    assert spec(("batch", "length", None), (8, 64, 16), sizes) == PartitionSpec(
        ("data", "fsdp"), "seq"
    )
    # batch 2: only the first batch axis divides; odd heads: replicated
    assert spec(("batch", "length"), (2, 64), sizes) == PartitionSpec("data", "seq")
    assert spec(("embed", "heads"), (64, 3), sizes) == PartitionSpec("fsdp")
    # one mesh axis is used at most once per array
    assert spec(("heads", "mlp"), (4, 4), sizes) == PartitionSpec("tensor")
    assert spec(("vocab", "embed"), (256, 64), {"data": 8}) == PartitionSpec()
    custom = (("embed", "tensor"),)
    assert spec(("embed", "heads"), (64, 32), sizes, custom) == PartitionSpec("tensor")
    with parallel.axis_rules(custom):
        assert parallel.current_rules() == custom
    assert parallel.current_rules() == parallel.DEFAULT_RULES
    with pytest.raises(ValueError, match="2 logical names"):
        spec(("embed", "heads"), (64,), sizes)


CONFIG = LMConfig.preset(
    "tiny",
    layer_pattern="gated_deltanet,attn",
    vocab_size=64,
    **{"mixer.num_heads": 4, "mixer.chunk_size": 16, "mixer.d_model": 64},
)


def test_parameters_are_created_sharded_with_the_same_values():
    mesh = parallel.make_mesh({"fsdp": 2, "tensor": 2, "data": 2})
    model = parallel.create_sharded(lambda: LanguageModel(CONFIG, rngs=nnx.Rngs(0)), mesh)
    reference = LanguageModel(CONFIG, rngs=nnx.Rngs(0))
    specs = {}
    for (path, got), (_, want) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reference))
    ):
        # jitted initialisers may round the last bit differently from eager ones
        np.testing.assert_allclose(
            np.asarray(got[...]), np.asarray(want[...]), rtol=1e-6, atol=1e-8
        )
        specs["/".join(map(str, path))] = got[...].sharding.spec
    assert specs["embedding"] == PartitionSpec("tensor", "fsdp")  # (vocab, embed)
    assert specs["blocks/0/mixer/projections/q/kernel"] == PartitionSpec("fsdp", "tensor")
    assert specs["blocks/1/mixer/o_proj/kernel"] == PartitionSpec("tensor", "fsdp")
    assert specs["blocks/0/mlp/down/kernel"] == PartitionSpec("tensor", "fsdp")
    assert specs["blocks/0/mixer/a_log"] == PartitionSpec("tensor")
    # each device holds a quarter of an (embed, heads) kernel
    kernel = nnx.state(model)["blocks"][1]["mixer"]["q_proj"]["kernel"][...]
    assert kernel.addressable_shards[0].data.size == kernel.size // 4


def _loss(model, tokens):
    logits, _ = model(tokens)
    targets = jnp.roll(tokens, -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))


def test_hybrid_lm_forward_and_backward_under_seq_4_equal_one_device():
    model = LanguageModel(CONFIG, rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, CONFIG.vocab_size)
    logits_ref, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
    loss_ref, grads_ref = nnx.jit(nnx.value_and_grad(_loss))(model, tokens)
    mesh = parallel.make_mesh({"seq": 4}, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda t: model(t)[0])(tokens))
        logits, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
        loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, tokens)
    # both layers ran sequence-parallel: LASP-2's pair gather and LASP-2H's K/V gather
    assert jaxpr.count("shard_map[") == 2 and jaxpr.count(" all_gather[") == 2
    assert_close(logits, logits_ref, 1e-5, "logits")
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
    for (path, got), (_, want) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_ref)):
        assert_close(got[...], want[...], 1e-5, "d" + "/".join(map(str, path)))


TASK = [
    "data.name=mqar",
    "data.options.num_pairs=6",
    "data.options.num_queries=4",
    "model.mixer.num_heads=4",
    "model.mixer.chunk_size=8",
    "train.batch_size=8",
    "train.checkpoint_every=1000",
    "train.eval_every=1000",
]


def _one_step(tmp_path, mesh_overrides):
    config = train.load_config("tiny", TASK + mesh_overrides)
    trainer = train.Trainer(config, tmp_path, progress=False)
    batch = trainer._place([next(iter(trainer.datasets.train))])
    metrics = trainer.train_step(batch)
    return trainer, metrics


def test_one_train_step_on_data2_fsdp2_seq2_equals_one_device(tmp_path):
    single, metrics_ref = _one_step(tmp_path / "single", [])
    sharded, metrics = _one_step(tmp_path / "sharded", ["mesh.data=2", "mesh.fsdp=2", "mesh.seq=2"])
    assert sharded.datasets.sequence_length % 2 == 0
    for key in ("loss", "cross_entropy", "accuracy", "grad_norm"):
        assert float(metrics[key]) == pytest.approx(float(metrics_ref[key]), rel=1e-5), key
    # the updated parameters and optimiser moments are the same, and stay sharded
    pairs = zip(
        nnx.to_flat_state(nnx.state((sharded.model, sharded.optimizer))),
        nnx.to_flat_state(nnx.state((single.model, single.optimizer))),
    )
    for (path, got), (_, want) in pairs:
        # Adam's second moment is a squared gradient: twice the gradient's rounding
        # (and the norms under a mesh keep [B, T] rather than flattening rows, so the
        # sums over tokens are ordered differently: 2.02e-5 seen on a_log's).
        tol = 4e-5 if "nu" in path else 1e-5
        assert_close(got[...], want[...], tol, "/".join(map(str, path)))
    kernel = nnx.state(sharded.model)["blocks"][1]["mixer"]["q_proj"]["kernel"][...]
    assert kernel.sharding.spec == PartitionSpec("fsdp")
    assert int(sharded.optimizer.step[...]) == 1
    # the step traced the layers sequence-parallel (LASP-2 and LASP-2H)
    state = nnx.state((sharded.model, sharded.optimizer))
    batch = sharded._place([next(iter(sharded.datasets.train))])
    with jax.set_mesh(sharded.mesh):
        jaxpr = str(jax.make_jaxpr(sharded._step_fn)(state, batch))
    assert jaxpr.count("shard_map[") >= 2


def test_distributed_start_up_follows_the_environment():
    assert distributed_reason({}) is None
    assert distributed_reason({"XFORMJAX_DISTRIBUTED": "1"}) == "requested"
    assert distributed_reason({}, mode="on") == "requested"
    assert (
        distributed_reason({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
        == "JAX_COORDINATOR_ADDRESS"
    )
    assert distributed_reason({"SLURM_NTASKS": "16"}) == "SLURM_NTASKS"
    assert distributed_reason({"SLURM_NTASKS": "1"}) is None
    assert distributed_reason({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "TPU_WORKER_HOSTNAMES"
    assert distributed_reason({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed_reason({"SLURM_NTASKS": "16", "XFORMJAX_DISTRIBUTED": "0"}) is None
    assert distributed_reason({"SLURM_NTASKS": "16"}, mode="off") is None
    with pytest.raises(ValueError, match="XFORMJAX_DISTRIBUTED='maybe'"):
        distributed_reason({"XFORMJAX_DISTRIBUTED": "maybe"})
    assert parallel.initialize_distributed() is False  # this test process: one host


def test_importing_the_cli_leaves_the_backend_alone():
    """``jax.distributed.initialize()`` must come before any backend start-up, so
    importing the command (and everything it imports) must not start one."""
    import subprocess
    import sys

    code = (
        "import xformjax.train.cli, xformjax.train.trainer, xformjax.models\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, xla_bridge._backends\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
