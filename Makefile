# Two commands on a fresh machine: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 CPU is looked up in pip's configured wheel folder when there is one.
FIND_LINKS := $(shell pip config get global.find-links 2>/dev/null || echo /opt/wheels)
UV_FIND_LINKS := $(if $(wildcard $(FIND_LINKS)),--find-links $(FIND_LINKS),)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install vllm browser test fuzz demo bench bench-scale lint clean

install: $(STAMP)

# The vLLM CPU server venv (annotate tests, benchmark): ~/.cache/facemllm/vllm-<hash>, built once.
# The demo does not need it (it annotates with the template annotator).
vllm:
	@PYTHON=$(PYTHON) bash scripts/install_vllm.sh

$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	@test -x $(BIN)/python || uv venv -q --seed --python $(PYTHON) $(VENV)
	uv pip install -q --compile-bytecode --python $(BIN)/python $(UV_FIND_LINKS) -e '.[test]'
	$(BIN)/python -m facemllm.annotators.model_store
	@rm -f $(VENV)/.installed-* && touch $@

# Debian's chromium, for the test that opens the run report headless (apt-get when missing).
browser:
	@bash scripts/install_browser.sh

test: install vllm browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The parser fuzz tests with the large hypothesis profile (`make test` runs them with the small one).
fuzz: install
	FACEMLLM_FUZZ_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_fuzz.py

demo: install
	$(BIN)/facemllm demo --out demo-out

# The cluster job's figures side by side in one run (about 30 minutes on 2 cores): the scale chain
# (ours direct and dask against img2dataset + bare SCRFD, memory at 2,000 and 20,000 rows), the
# select worker on the published 50M-id container, publish against boto3, and annotate against a
# bare AsyncOpenAI client on the vLLM CPU server and on a fixed-latency loopback server.
bench-scale: install vllm
	$(BIN)/python -m benchmarks.bench_scale
	$(BIN)/python -m benchmarks.bench_select_ids
	$(BIN)/python -m benchmarks.bench_publish
	$(BIN)/python -m benchmarks.bench_annotate --faces 32 --repeats 8 --out benchmarks/results/annotate_vllm.json
	$(BIN)/python -m benchmarks.bench_annotate --latency-server 0.2 --faces 512 --concurrency 64 \
		--repeats 4 --out benchmarks/results/annotate_latency.json

bench: install vllm
	$(BIN)/python -m benchmarks.bench_download
	$(BIN)/python -m benchmarks.bench_faces
	$(BIN)/python -m benchmarks.bench_dedup
	$(BIN)/python -m benchmarks.bench_reformat
	$(BIN)/python -m benchmarks.bench_annotate
	$(BIN)/python -m benchmarks.bench_publish
	$(BIN)/python -m benchmarks.bench_train
	$(BIN)/python -m benchmarks.bench_eval
	$(BIN)/python -m benchmarks.bench_select_ids
	$(BIN)/python -m benchmarks.bench_report
	$(BIN)/python -m benchmarks.bench_scale

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-out .pytest_cache
