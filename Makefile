# Two commands do everything on a fresh clone (Debian/Ubuntu, Python >= 3.11):
#   make train   set up, then train the default experiment (LeNet-5 on Fashion-MNIST)
#   make test    set up, then run the test suite (in TEST_JOBS=2 processes)
# Extra arguments go through ARGS, e.g. make train ARGS="model=alexnet_lite data=cifar10".
# Set-up creates .venv (cnnlab installed editable, with its dev tools and the CPU build of
# PyTorch that cnnlab-bench compares against) and, where apt is there, installs Debian's
# dataset-fashion-mnist package and, without a C++ compiler, g++. Use the tools directly
# afterwards with `source .venv/bin/activate`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: train test setup data compiler lint
train: setup
	$(BIN)/cnnlab-train $(ARGS)

# The suite runs in TEST_JOBS pytest-xdist workers, each test file in one worker (its module
# fixtures computed once); TEST_JOBS=0 runs it in this process.
TEST_JOBS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

setup: $(VENV)/.installed data compiler

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

data:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist into $(FMNIST)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "note: no apt-get; Fashion-MNIST will come through TFDS (needs internet once)"; fi

# cnnlab compiles its oneDNN kernels (cnnlab/kernels) with $(CXX) on first use.
CXX ?= g++
compiler:
	@if command -v $(CXX) >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "installing Debian's g++ (cnnlab compiles its oneDNN kernels with it)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq g++ >/dev/null; \
	else echo "note: no C++ compiler; cnnlab will train with XLA's slower CPU convolutions"; fi
