# Two commands set everything up: `make demo` and `make test`. A GPU user overrides the torch pin,
# e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
VENV ?= .venv
BENCH_VENV ?= .venv-bench
PIP_QUIET ?= -q

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install $(PIP_QUIET) -e ".[test]"
	touch $@

# The benchmark environment also has the peers (torchao), which the test environment never sees.
$(BENCH_VENV)/.installed: pyproject.toml Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH_SPEC)
	$(BENCH_VENV)/bin/python -m pip install $(PIP_QUIET) -e ".[bench]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/formats_cpu.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .hypothesis
