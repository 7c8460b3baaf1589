# One-command set-up: `make demo` (train the tiny speech LM on CPU) and `make test` (the suite).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
# The CPU torch wheel ships on these machines; elsewhere pip's index is used.
FIND_LINKS := $(shell [ -d /opt/wheels ] && echo --find-links /opt/wheels)
PIP := $(BIN)/python -m pip
DEMO_RUN ?= runs/demo
DEMO_DATA ?= $(DEMO_RUN)/data
DEMO_STEPS ?= 300
NPROC ?= 2
# Test files run in parallel (pytest-xdist; tests/conftest.py keeps each file on one worker, and
# every file that uses the Slurm test cluster on the same one);
# most of a test's time is process start-up and waits.
TEST_WORKERS ?= 3

.PHONY: install demo test test-fast demo-data clean help

help:
	@echo "make demo   - install into .venv, build the demo token shards from espeak-ng audio, pretrain tiny (TP=2, CPU), stop, resume, speak"
	@echo "make test   - install into .venv and run the test suite"

install: $(STAMP)

$(STAMP):
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) "numpy" "packaging>=24.2" "psutil" "pyyaml"
	@# megatron-core >= 0.17 declares Requires-Python >= 3.12; the cp311 wheel works on 3.11.
	$(PIP) install -q --no-deps --ignore-requires-python megatron-core==0.19.2
	$(PIP) install -q $(FIND_LINKS) -e ".[dev]"
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@rm -f $(VENV)/.installed-*; touch $@

# Real audio: espeak-ng (Debian). Without it (and without root to install it) the committed,
# byte-identical data/demo is used.
demo-data: install
	@if ! command -v espeak-ng >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing espeak-ng (Debian)"; \
	  (apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null 2>&1)) || true; \
	fi
	@if command -v espeak-ng >/dev/null; then \
	  $(BIN)/python -m data_pipeline build-demo --out $(DEMO_DATA) --corpus $(DEMO_RUN)/corpus; \
	else \
	  echo "espeak-ng unavailable: using the committed data/demo shards"; \
	  mkdir -p $(DEMO_RUN) && rm -rf $(DEMO_DATA) && cp -r data/demo $(DEMO_DATA); \
	fi

demo: demo-data
	rm -rf $(DEMO_RUN)/checkpoints $(DEMO_RUN)/metrics.jsonl $(DEMO_RUN)/checkpoint_commits.jsonl
	@echo "== pretraining tiny, TP=2 on $(NPROC) CPU processes: first half, then stop =="
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node $(NPROC) --log-dir $(DEMO_RUN)/torchrun \
	  -m launch.pretrain --config configs/tiny.yaml parallel.tp=2 data.paths=[$(DEMO_DATA)] \
	  train.run_dir=$(DEMO_RUN) train.steps=$(DEMO_STEPS) train.stop_after=$$(( $(DEMO_STEPS) / 2 ))
	@echo "== resuming from its own checkpoint =="
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node $(NPROC) --log-dir $(DEMO_RUN)/torchrun \
	  -m launch.pretrain --config configs/tiny.yaml parallel.tp=2 data.paths=[$(DEMO_DATA)] \
	  train.run_dir=$(DEMO_RUN) train.steps=$(DEMO_STEPS) train.resume=auto
	$(BIN)/python -m launch.summary $(DEMO_RUN) --data $(DEMO_DATA)
	@echo "== hearing it: a training sentence, greedy, decoded by the demo codec =="
	OMP_NUM_THREADS=2 $(BIN)/python -m megatron_tts.generate.speak $(DEMO_RUN) --data $(DEMO_DATA) \
	  --out $(DEMO_RUN)/demo.wav

test: install
	$(BIN)/python -m pytest -q -ra --timeout 600 --durations=15 -n $(TEST_WORKERS) --dist loadgroup tests

clean:
	rm -rf $(VENV) runs .pytest_cache
