#!/usr/bin/env bash
# bench.load on a CUDA machine (the lent H200), the appliance against llama.cpp's llama-server, one GGUF.
#
# Nothing can be fetched there, so what it needs travels in an ignored folder .gpu/ (see below), and the
# machine keeps /tmp between calls while it is warm. Stages, one per call:
#   build   unpack llama-cpp-python's sdist (.gpu/a/sdist.tar.gz: vendor/llama.cpp without .git, tests and
#           the backends CUDA does not use), build llama.cpp with CUDA as shared libraries plus llama-server
#           and llama-batched-bench, install the service's missing wheels (.gpu/a/wheels) into /tmp/site,
#           unpack this commit (.gpu/a/repo.tar, from `git archive HEAD`) to /tmp/gpu/repo; keep the model's
#           first part (.gpu/a/model.part*)
#   model   keep the model's other parts (.gpu/b/model.part*) and join them into /tmp/gpu/model.gguf
#   bench   python -m bench.load against both servers; its run folder comes back in $OUT/results/load/runs/: copy it
#           into bench/results/load/runs/ and run `python -m bench.results`
# llama-cpp-python's Python package runs from the sdist over those libraries (LLAMA_CPP_LIB_PATH). BENCH_COMMIT
# names the commit of .gpu/a/repo.tar (the unpacked tree has no git).
set -euo pipefail
stage=${1:?usage: bench/gpu_load.sh build|model|bench [bench.load options]}
shift
work=/tmp/gpu
sdist=$work/llama_cpp_python-0.3.36
mkdir -p "$work"

case "$stage" in
build)
    tar xzf .gpu/a/sdist.tar.gz -C "$work"
    mkdir -p "$work/repo" && tar xf .gpu/a/repo.tar -C "$work/repo"
    cp .gpu/a/model.part* "$work/"
    python3 -m pip install -q --no-index --find-links .gpu/a/wheels --target /tmp/site \
        flask waitress 'sqlite-utils>=4.0' 'pydantic>=2.5'
    cmake -S "$sdist/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_OPENMP=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_OPENSSL=OFF > "$work/cmake.log"
    time cmake --build "$work/build" --target llama llama-server llama-batched-bench -j "$(nproc)" > "$work/build.log"
    ls -la "$work/build/bin"
    ;;
model)
    cp .gpu/b/model.part* "$work/"
    cat "$work"/model.part* > "$work/model.gguf"
    sha256sum "$work/model.gguf"
    ;;
bench)
    export PYTHONPATH=/tmp/site:$sdist:$work/repo LLAMA_CPP_LIB_PATH=$work/build/bin
    export LD_LIBRARY_PATH=$work/build/bin:${LD_LIBRARY_PATH:-}
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    cd "$work/repo"
    BENCH_RESULTS=${OUT:?}/results python3 -m bench.load --model "$work/model.gguf" --servers appliance llama-server \
        --llama-server "$work/build/bin/llama-server" "$@"
    ;;
*)
    echo "unknown stage $stage: use build, model or bench" >&2
    exit 2
    ;;
esac
