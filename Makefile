# Two commands matter: `make demo` (the study on the offline shapes10 world) and
# `make test`. Both create .venv on first use; nothing needs installing by hand.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# Exact torch pins are for this project's own machines only (pip finds these wheels on
# their disk). GPU/Jetson users: `make TORCH_PINS= test` keeps the torch already in .venv.
ifeq ($(ARCH),x86_64)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
endif
DEMO_ARGS ?=

.PHONY: demo test test-long install bench clean
demo: $(VENV)/.installed
	$(BIN)/clipdistill demo $(DEMO_ARGS)

# ruff first (seconds): lint and import order, configured in pyproject.toml.
test: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# The tests that train a student to convergence (about 18 min more on two cores; not in `make test`).
test-long: $(VENV)/.installed
	$(BIN)/python -m pytest -q --long -m long

install: $(VENV)/.installed

# .[test] = the train, device, video and compress extras + the suite's tools (pyproject.toml): `demo`
# trains, so it needs `train`. The base install alone (`pip install clipdistill`) is the device's: predict.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(if $(strip $(TORCH_PINS)),$(BIN)/pip install -q $(TORCH_PINS))
	$(BIN)/pip install -q -e '.[test]'
	touch $@

bench: $(VENV)/.installed
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
