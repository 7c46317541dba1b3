# The two commands of the README: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in before everything else, or open_clip pulls a different build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test docs test-imagereward lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@echo "Installing into $(VENV): torch, then align-gen and its dependencies from PyPI (about 3 minutes the first time) ..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@
	@echo "Installed into $(VENV)."

demo: install
	@echo "Aligning the tiny world model with AWM (offline, on the CPU, a few minutes) ..."
	$(VENV)/bin/align-gen train configs/tiny/awm_world_preference.yaml

# The packages' layering (import-linter contracts in pyproject.toml), the docs (strict: a broken
# link or an undocumented config field fails), then the tests: one pytest-xdist worker per core
# (TEST_WORKERS=0 runs them in this process), each test file on one worker (its module fixtures
# are built once).
TEST_WORKERS ?= auto
test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

docs: install
	$(VENV)/bin/mkdocs build --strict

# The `imagereward` extra pins transformers < 4.56, so its tests run in a second environment
# (CI runs this after `make test`); they fail there, rather than skip, if the package does not import.
IR_VENV ?= .venv-imagereward
IR_PY := $(IR_VENV)/bin/python

$(IR_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(IR_VENV)
	$(IR_PY) -m pip install --quiet --upgrade pip
	$(IR_PY) -m pip install --quiet $(TORCH_SPEC)
	$(IR_PY) -m pip install --quiet -e '.[dev,imagereward]'
	touch $@

test-imagereward: $(IR_VENV)/.installed
	ALIGN_GEN_REQUIRE_IMAGEREWARD=1 $(IR_PY) -m pytest -q tests/test_imagereward.py tests/test_hpsv2.py

lint: install
	$(VENV)/bin/ruff check align_gen reward_models pipelines tests benchmarks
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/sampling_overhead.py
	$(PY) benchmarks/ddpo_update.py
	$(PY) benchmarks/rebel_memory.py
	$(PY) benchmarks/vlm_sampling.py
	$(PY) benchmarks/world_alignment.py

clean:
	rm -rf $(VENV) $(IR_VENV) outputs .pytest_cache site
