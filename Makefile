# Two commands on a fresh machine: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 CPU is looked up in pip's configured wheel folder when there is one.
FIND_LINKS := $(shell pip config get global.find-links 2>/dev/null || echo /opt/wheels)
UV_FIND_LINKS := $(if $(wildcard $(FIND_LINKS)),--find-links $(FIND_LINKS),)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	@test -x $(BIN)/python || uv venv -q --seed --python $(PYTHON) $(VENV)
	uv pip install -q --python $(BIN)/python $(UV_FIND_LINKS) -e '.[test]'
	$(BIN)/python -m annotators.model_store
	@rm -f $(VENV)/.installed-* && touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/facemllm demo --out demo-out

bench: install
	$(BIN)/python -m benchmarks.bench_download
	$(BIN)/python -m benchmarks.bench_faces

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-out .pytest_cache
