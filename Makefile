# The README's commands. `make train` and `make test` build the venv when it is missing.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: train test test-quick bench lint clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so that the package's `torch>=2.6` pulls nothing more.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,report,hf,data,serve]'
	touch $(VENV_STAMP)

train: $(VENV_STAMP)
	$(PY) -m moeforge train --out runs/tiny

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

test-quick: $(VENV_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV_STAMP)
	$(PY) -m moeforge bench moe --compile
	$(PY) -m moeforge bench ep
	$(PY) -m moeforge bench train --preset deepseek-v3-tiny --peers
	$(PY) -m moeforge bench decode
	$(PY) -m moeforge bench data
	$(PY) -m moeforge bench serve --compile --engine-process

lint: $(VENV_STAMP)
	$(PY) -m ruff check src tests

clean:
	rm -rf .venv runs
