# udat-kernels: the two commands of a fresh machine are `make demo` and `make test`; both set up
# the virtual environment and build the extension first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
# Compute capabilities of the CUDA kernels, where a toolkit and a CUDA torch are present.
export UDAT_CUDA_ARCHS ?= 8.0;9.0
export MAX_JOBS ?= 2

DEPS_STAMP := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.ext-built
EXT_SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h python/*.cpp)

# The Triton of the GPU machine, beside the one installed, for the ahead-of-time compile check.
TRITON_GPU ?= triton==3.6.0
TRITON_GPU_VENV ?= .venv-triton-gpu
TRITON_LAUNCHES := build/triton-specs.jsonl

.PHONY: setup demo test pytest ctest triton-aot bench clean

setup: $(EXT_STAMP)

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The first build is the editable install (package, console scripts, udat_kernels._C in place);
# after a source change only the extension is rebuilt, after a change of pyproject.toml (console
# scripts, dependencies) the editable install is redone.
$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES) pyproject.toml
	if [ -f $(VENV)/.editable ] && [ $(VENV)/.editable -nt pyproject.toml ]; then \
	  $(PY) setup.py --quiet build_ext --inplace; \
	else \
	  $(PY) -m pip install --quiet --no-build-isolation --no-deps -e . && touch $(VENV)/.editable; \
	fi
	$(PY) -c "import udat_kernels; print('udat-kernels built:', udat_kernels.build_info())"
	touch $@

# The offline UDAT-AS experiment: mnist5k -> digits, five methods, three seeds, every setting at
# its default (the compact recipe: 10 epochs, lr 0.03, momentum 0.9, lambda 0.1; docs/experiments.md).
demo: setup
	$(PY) -m udat_kernels.udat.experiment --source mnist5k --target digits --threads 2 --out runs/demo

test: setup pytest ctest triton-aot

# The Triton kernels' launches are recorded (their specializations) for triton-aot.
# tests/cuda_emu and tests/cuda_build need the CMake build (emulation libraries, ptxas's
# reports): ctest runs them. The Triton tests run under the interpreter, a few seconds each,
# in two processes (pytest-xdist; each appends its launches to the record); the rest in one.
TRITON_TESTS := $(wildcard tests/test_triton*.py)
pytest: setup
	mkdir -p build && rm -f $(TRITON_LAUNCHES)
	UDAT_TRITON_LAUNCHES=$(abspath $(TRITON_LAUNCHES)) $(PY) -m pytest $(TRITON_TESTS) -q -ra \
	  -n 2
	UDAT_TRITON_LAUNCHES=$(abspath $(TRITON_LAUNCHES)) $(PY) -m pytest tests -q -ra \
	  --ignore=tests/cuda_emu --ignore=tests/cuda_build $(addprefix --ignore=,$(TRITON_TESTS))

# A second environment: the GPU machine's Triton over the main environment's packages.
$(TRITON_GPU_VENV)/.installed: $(DEPS_STAMP)
	rm -rf $(TRITON_GPU_VENV)
	$(PY) -m venv $(TRITON_GPU_VENV)
	$(TRITON_GPU_VENV)/bin/python -m pip install --quiet --no-deps "$(TRITON_GPU)"
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > $$($(TRITON_GPU_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/udat-main-env.pth
	touch $@

# Every recorded launch and every launch planned at the GPU target shapes, compiled for sm_90
# with both Tritons; fails on compile errors, spills, TF32 dots and occupancy below design.
triton-aot: setup $(TRITON_GPU_VENV)/.installed
	test -s $(TRITON_LAUNCHES) || { echo "$(TRITON_LAUNCHES): no recorded launches (run make pytest)"; exit 1; }
	env -u TRITON_INTERPRET $(PY) -m udat_kernels.triton_backend.aot --specs $(TRITON_LAUNCHES) \
	  --table build/triton-aot-installed.md
	env -u TRITON_INTERPRET $(TRITON_GPU_VENV)/bin/python -m udat_kernels.triton_backend.aot \
	  --specs $(TRITON_LAUNCHES) --table build/triton-aot-gpu.md

# The C++ tests, and the CUDA sources two ways: compiled by nvcc (the CMake CUDA target, where
# nvcc and a CUDA torch are present) and run on the CPU under the checking emulator
# (tests/cuda_emu: its tests, an AddressSanitizer build and the mutant builds).
ctest: setup
	cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DUDAT_WITH_CUDA=$$($(PY) -c "import shutil, torch; print('ON' if shutil.which('nvcc') and torch.version.cuda else 'OFF')") \
	  -DUDAT_CUDA_ARCHS="$(UDAT_CUDA_ARCHS)" > /dev/null
	cmake --build build-cmake -j $(MAX_JOBS)
	ctest --test-dir build-cmake --output-on-failure -j $(MAX_JOBS)

bench: setup
	$(PY) benchmarks/report.py

clean:
	rm -rf build build-cmake udat_kernels/_C*.so $(EXT_STAMP) $(VENV)/.editable $(TRITON_GPU_VENV)
