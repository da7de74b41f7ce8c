# The README's commands: `make train` (the default run) and `make test` (`make test-fast`
# leaves out the slowest files while iterating). `make test` builds .venv from the lock once, then
# only re-installs when pyproject.toml or requirements.lock change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# libtpu for the TPU compile gate, outside the venv (importable, it makes every JAX process
# on a CPU host probe for a TPU); the tests find it through TPU_LIBRARY_PATH.
LIBTPU := .libtpu
LIBTPU_STAMP := $(LIBTPU)/.installed
PYTEST_ARGS ?= -n auto --durations=25
BENCH_ARGS ?=

.PHONY: train test test-fast test-gate test-tpu-gate lint format lock bench

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The pinned libtpu (requirements-tpu.lock) in its own directory. Where no wheel exists for
# this platform the directory stays empty and the TPU gate's tests say why they skip.
$(LIBTPU_STAMP): requirements-tpu.lock $(STAMP)
	rm -rf $(LIBTPU) && mkdir -p $(LIBTPU)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target $(LIBTPU) \
	  -r requirements-tpu.lock || echo "libtpu is not installable here: the TPU gate will skip"
	touch $(LIBTPU_STAMP)

# Train the default config (a small hybrid LM on the standard library's sources);
# running it again resumes from runs/default's latest checkpoint.
train: $(STAMP)
	$(VENV)/bin/xformjax train --config default --workdir runs/default

test: $(STAMP) $(LIBTPU_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Lint and type checks (CI runs them before the tests): ruff's rules and formatting over
# the whole checkout, pyright (basic) over the package and its kernels. `make format`
# applies ruff's fixes and formatting.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# For iteration: everything but the longest files (learning, CLI, notebooks, the wheel, the
# TPU train-step compiles, the kernel device-check rehearsal).
test-fast: $(STAMP) $(LIBTPU_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

# The GPU compile gate alone: every Pallas kernel compiled for an H100 (sm_90) with the pip
# triton on this CPU — shared memory, registers, spills and compile time (make test runs it too).
test-gate: $(STAMP)
	$(PY) -m pytest -n 2 -m sm90 tests/kernels

# The TPU compile gate alone: every Pallas kernel and the sharded train step compiled for
# TPU v5e/v6e slices by libtpu on this CPU (make test runs it too).
test-tpu-gate: $(STAMP) $(LIBTPU_STAMP)
	$(PY) -m pytest -n 2 -m tpu_aot tests

# The op and layer benchmarks (experiments/bench), results in experiments/results/;
# e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--only layers".
bench: $(STAMP)
	$(PY) -m experiments.bench $(BENCH_ARGS)

# Re-resolve the newest allowed versions and rewrite the lock.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet -e ".[dev]"
	{ echo "# Exact versions for a reproducible environment (core + train + dev extras)."; \
	  echo "# Regenerate: make lock   (after changing pyproject.toml dependencies)"; \
	  .lockenv/bin/pip freeze --exclude-editable | grep -v '^xformjax' \
	    | sed 's/^triton==\(.*\)$$/triton==\1 ; sys_platform == "linux" and platform_machine == "x86_64"/'; \
	} > requirements.lock
	{ echo "# libtpu for the TPU compile gate: the version jax's own [tpu] extra pins."; \
	  echo "# Installed into .libtpu (not the venv). Regenerate: make lock"; \
	  .lockenv/bin/python -c 'import importlib.metadata as m; \
	    spec = next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")); \
	    print(spec)' | xargs -I{} .lockenv/bin/pip download --quiet --no-deps -d .lockenv/tpu "{}"; \
	  ls .lockenv/tpu | sed -n 's/^libtpu-\([^-]*\)-.*/libtpu==\1 ; sys_platform == "linux" and platform_machine == "x86_64"/p'; \
	} > requirements-tpu.lock
	rm -rf .lockenv
