# dlmscope — `make demo` runs the main job, `make test` runs the suite CI runs.
SHELL := /bin/bash
PY ?= $(if $(VIRTUAL_ENV),python,$(if $(wildcard .venv/bin/python),.venv/bin/python,python3))
VENV_PY := .venv/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install test test-all test-slow bench bench-latent gpu-check cuda wheel demo demo-synthetic clean

# Create .venv (unless a virtualenv is active), install the CPU torch pin, the package and its test extras.
venv:
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x $(VENV_PY) ]; then python3 -m venv .venv; fi
	@$(PYBIN) -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v -i warning || true

PYBIN = $(if $(VIRTUAL_ENV),python,$(VENV_PY))

# pip's editable install compiles the C++ extension from scratch (~1.5 min on 2 cores), so it reruns only when its
# inputs change or the built extension is gone: a stamp in the venv records the last install.
INSTALL_STAMP = $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)/.dlmscope-installed
INSTALL_INPUTS = Makefile setup.py pyproject.toml csrc/bindings.cpp $(wildcard csrc/cpu/*)

install:
	@ls dlmscope/_C*.so >/dev/null 2>&1 || rm -f $(INSTALL_STAMP)
	@$(MAKE) --no-print-directory $(INSTALL_STAMP)

$(INSTALL_STAMP): $(INSTALL_INPUTS) | venv
	$(PYBIN) -m pip install -q "$(TORCH_PIN)"
	$(PYBIN) -m pip install -q pybind11 ninja
	$(PYBIN) -m pip install -q --no-build-isolation -e ".[test]"
	@touch $@

# The suite CI runs: everything but tests marked slow; Triton kernels run in the CPU interpreter.
test: install
	TRITON_INTERPRET=1 $(PYBIN) -m pytest -q -m "not slow and not gpu" tests

test-all: install
	TRITON_INTERPRET=1 $(PYBIN) -m pytest -q tests

# Only the tests marked slow (CI runs them after `make test`: today about 20 s)
test-slow: install
	TRITON_INTERPRET=1 $(PYBIN) -m pytest -q -m "slow and not gpu" tests

# The training step and op suites on the CPU, tables under benchmarks/results/ (`benchmarks/report.py --help`: the
# other suites the driver runs: sweep, pipeline, latent)
bench: install
	$(PYBIN) benchmarks/report.py step --device cpu

# Latent-parallel step time and memory per rank vs R (torchrun, gloo on CPU; --device cuda on a multi-GPU machine)
bench-latent: install
	$(PYBIN) benchmarks/report.py latent

gpu-check:
	bash scripts/gpu_check.sh

# The plain-CUDA kernels (csrc/cuda) as dlmscope/libdlmscope_cuda.so for sm_80/sm_90, and their ptxas report in
# benchmarks/results/cuda-compile.md; needs nvcc, not a GPU (the `cuda` backend loads the library on a GPU).
cuda:
	bash scripts/build_cuda.sh

wheel: venv
	$(PYBIN) -m pip install -q "$(TORCH_PIN)" build pybind11 ninja
	DLMSCOPE_MARCH=x86-64-v3 $(PYBIN) -m build --wheel --no-isolation

# The main job: Mask-/Unmask-SAEs on every layer of the embedded DLM and SAEs on its AR twin, evaluated
# (FVE, delta-LM, planted concepts), steering, decoding orders and base->instruct transfer, written up in
# runs/demo/report.md with plots (about 10 min on 2 cores).
demo: install
	$(PYBIN) -m dlmscope.cli demo --out runs/demo

# The synthetic known-dictionary job (no model): checks that training recovers the true directions.
demo-synthetic: install
	$(PYBIN) -m dlmscope.demo.synthetic

clean:
	rm -rf build dist *.egg-info dlmscope/*.so .pytest_cache .benchmarks $(INSTALL_STAMP)
