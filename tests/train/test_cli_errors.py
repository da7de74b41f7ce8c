"""The command's config errors (issue 24): each is one line on stderr,
``xformjax: error: ...``, and exit code 2, never a traceback; ``--set`` accumulates
when repeated and refuses a key given twice. In-process (``cli.main``), nothing trains
or compiles: the trainer and the compiler are replaced by spies."""

from __future__ import annotations

import pathlib

import pytest

from xformjax.train import aot, cli, trainer

TRAIN = ["train", "--config", "tiny", "--workdir", "/nonexistent/never", "--distributed", "off"]
AOT = ["aot", "--config", "tiny", "--topology", "v5e:2x2"]


@pytest.fixture
def spies(monkeypatch):
    """Record the config ``train`` and ``aot`` would run, and stop there."""
    seen = []

    class Trainer:
        def __init__(self, config, workdir, progress=True):
            seen.append(config)
            raise ValueError("spy: stopped before training")

    def compile_train_step(config, topology, libtpu=None):
        seen.append(config)
        raise aot.AotError("spy: stopped before compiling")

    monkeypatch.setattr(trainer, "Trainer", Trainer)
    monkeypatch.setattr(aot, "compile_train_step", compile_train_step)
    return seen


def _error_line(capsys, argv) -> str:
    """Run ``argv``; it must exit 2 with exactly one line on stderr."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("xformjax: error: "), err
    assert "Traceback" not in err
    return err.removeprefix("xformjax: error: ").rstrip("\n")


YAML = {
    "broken": (
        "train: {steps: 3\n",
        "invalid YAML at line 2, column 1: expected ',' or '}', but got '<stream end>'",
    ),
    "list": (
        "- train\n- data\n",
        "a config must be a mapping with the sections model, train, data, mesh; got a list",
    ),
    "python-tag": (
        "train: !!python/object/apply:os.mkdir [MARKER]\n",
        "invalid YAML at line 1, column 8: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.mkdir'",
    ),
    "repeated-key": (
        "train: {steps: 3, steps: 4}\n",
        "invalid YAML at line 1, column 19: duplicate key 'steps'",
    ),
    "model-not-a-section": ("model: 3\n", "'model' is a section: a mapping of its keys; got 3"),
    "bad-value": (
        "model: {preset: tiny}\ntrain: {steps: 10, warmup_steps: 20}\n",
        "train.warmup_steps must be ≤ train.steps (10); got 20",
    ),
}


@pytest.mark.parametrize("case", YAML)
def test_a_bad_yaml_file_is_one_line_naming_the_file(case, tmp_path, capsys, spies):
    text, message = YAML[case]
    marker = tmp_path / "created-by-the-tag"
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("MARKER", str(marker)))
    for command in (TRAIN, AOT):
        argv = [*command]
        argv[argv.index("tiny")] = str(path)
        assert _error_line(capsys, argv) == f"{path}: {message}"
    assert not marker.exists()  # safe_load constructed nothing: os.mkdir never ran
    assert spies == []


CONFIG_ERRORS = {
    "learning-rate-nan": (
        ["--set", "train.learning_rate=nan"],
        "train.learning_rate must be finite and > 0; got nan",
    ),
    "validation-fraction": (
        ["--set", "data.validation_fraction=1.5"],
        "data.validation_fraction must be finite and in (0, 1); got 1.5",
    ),
    "warmup-after-steps": (
        ["--set", "train.warmup_steps=31"],
        "train.warmup_steps must be ≤ train.steps (30); got 31",
    ),
    "unknown-key": (
        ["--set", "train.stepz=3"],
        "unknown key 'train.stepz'; valid keys under 'train': steps, batch_size, seq_len, "
        "learning_rate, warmup_steps, min_lr_ratio, weight_decay, grad_clip, grad_accum, "
        "log_every, eval_every, eval_batches, checkpoint_every, keep_checkpoints, seed, "
        "aux_loss_weight, sample_prompt, sample_tokens, tensorboard, profile",
    ),
    "wrong-type": (["--set", "train.steps=abc"], "train.steps: expected int, got 'abc'"),
    "task-option": (
        ["--set", "data.name=mqar", "data.options.num_pairs=0"],
        "data.options: MQAR: `num_pairs` must be ≥ 1; got 0",
    ),
    "no-equals": (["--set", "train.steps"], "--set expects key=value; got 'train.steps'"),
    "no-key": (["--set", "=3"], "--set expects key=value with a dotted key before '='; got '=3'"),
    "key-twice-in-one-set": (
        ["--set", "train.steps=300", "train.steps=50"],
        "--set gives 'train.steps' twice ('train.steps=300' and 'train.steps=50'); "
        "give each key once",
    ),
    "key-twice-in-two-sets": (
        ["--set", "train.steps=300", "--set", "train.log_every=5", "--set", "train.steps=50"],
        "--set gives 'train.steps' twice ('train.steps=300' and 'train.steps=50'); "
        "give each key once",
    ),
    "unknown-preset": (
        ["--config", "huge"],
        "unknown config 'huge'; presets: ['base', 'default', 'tiny'] "
        "(or give a path to a .yaml file)",
    ),
    "missing-file": (
        ["--config", "/nonexistent/run.yaml"],
        "config file '/nonexistent/run.yaml' does not exist",
    ),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_every_config_error_is_one_line_and_exit_code_2(case, capsys, spies):
    extra, message = CONFIG_ERRORS[case]
    for command in (TRAIN, AOT):
        argv = [*command]
        if extra[0] == "--config":  # replaces the preset
            argv[argv.index("--config") : argv.index("--config") + 2] = extra
        else:
            argv += extra
        assert _error_line(capsys, argv) == message, argv
    assert spies == []


@pytest.mark.parametrize(
    "command,stage", [(TRAIN, "training"), (AOT, "compiling")], ids=["train", "aot"]
)
def test_repeated_set_flags_accumulate(command, stage, capsys, spies):
    argv = [*command, "--set", "train.steps=300", "--set", "train.checkpoint_every=50"]
    argv += ["--set", "train.warmup_steps=250", "mesh.data=2"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.endswith(f"xformjax: error: spy: stopped before {stage}\n")
    (config,) = spies
    train = config.train
    assert (train.steps, train.checkpoint_every, train.warmup_steps) == (300, 50, 250)
    assert config.mesh.data == 2 and train.seq_len == 64  # the rest from the preset


GENERATE = ["generate", "--workdir", "/nonexistent/never", "--prompt", "x"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--temperature", "-1"], "--temperature must be a finite number ≥ 0; got '-1'"),
        (["--temperature", "hot"], "--temperature must be a number; got 'hot'"),
        (["--top-k", "0"], "--top-k must be an int ≥ 1 or None; got '0'"),
        (["--top-k", "2.5"], "--top-k must be an int; got '2.5'"),
        (["--top-p", "1.5"], "--top-p must be a finite number > 0 and ≤ 1; got '1.5'"),
        (["--min-p", "nan"], "--min-p must be a finite number ≥ 0 and ≤ 1; got 'nan'"),
        (
            ["--repetition-penalty", "0"],
            "--repetition-penalty must be a finite number > 0; got '0'",
        ),
        (["--seed", "x"], "--seed must be an int; got 'x'"),
        (["--stop", ""], "--stop must not be empty"),
    ],
)
def test_bad_generate_flags_are_one_line_before_loading_the_run(flags, message, capsys):
    assert _error_line(capsys, [*GENERATE, *flags]) == message


def test_generate_cuts_each_sample_at_its_stop_text():
    sequences = [list(b"ab\ncd\n"), list(b"abc"), list("é!".encode())]
    assert cli._continuations(sequences, b"\n") == ["ab", "abc", "é!"]
    assert cli._continuations(sequences, b"c") == ["ab\n", "ab", "é!"]
    assert cli._continuations(sequences, None) == ["ab\ncd\n", "abc", "é!"]


def test_a_bad_run_directory_or_environment_is_one_line(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    for command in ("eval", "generate"):
        argv = [command, "--workdir", str(missing)] + (["--prompt", "x"] * (command == "generate"))
        assert (
            _error_line(capsys, argv)
            == f"{missing / 'config.yaml'} not found: is {missing} a training run directory?"
        )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: [1, 2\n")
    assert _error_line(capsys, ["eval", "--workdir", str(run)]).startswith(
        f"{pathlib.Path(run, 'config.yaml')}: invalid YAML at line 2"
    )
    monkeypatch.setenv("XFORMJAX_DISTRIBUTED", "maybe")
    argv = [*TRAIN]
    argv[argv.index("off")] = "auto"
    assert _error_line(capsys, argv) == "XFORMJAX_DISTRIBUTED='maybe': use 1 or 0"
