#!/usr/bin/env bash
# bench.load on a CUDA machine (a lent H100 or H200), the appliance against llama.cpp's llama-server, one GGUF,
# with the load generator's ceiling (bench/canned_server.py) and llama-batched-bench (the engine's limit) beside.
#
# Nothing can be fetched there, so what it needs travels in ignored folders (a call carries at most 64 MiB),
# and the machine keeps /tmp between calls while it is warm (30 s idle). Stages, one per call, in this order:
#   model   keep the model's second part (.gpu/b/model.gguf.gz.part*) in /tmp/gpu
#   build   unpack llama-cpp-python's sdist (.gpu/a/sdist.tar.gz: without .git, models, docs, benches), install the
#           service's wheels (.gpu/a/wheels, every one, --no-deps: the machine has numpy) into /tmp/site, join the
#           model (.gpu/a holds its first part), build llama.cpp with CUDA as shared libraries plus llama-server and
#           llama-batched-bench, and run llama-batched-bench (/tmp/gpu/batched-bench.txt, and $OUT)
#   bench   unpack this commit (.gpu/r/repo.tar, from `git archive HEAD`) and run python -m bench.load against
#           the servers given (default: appliance, llama-server, canned), batched-bench's output attached
#   power   python -m bench.gpu_power: GPU memory loaded, idle, deep idle and after waking
#   onnxpart N  keep part N of ONNX Runtime's tar (.gpu/sN/part*: onnxruntime-gpu 1.31.1's wheel and the SmolLM2
#           ONNX INT4 package, gzipped and split in 62.5 MB parts) in /tmp/gpu/onnx
#   onnx    join it, install onnxruntime-gpu into /tmp/site, and run python -m bench.onnx_vs_llama on the ONNX
#           package and the GGUF with this build (ONNX Runtime CUDA against llama.cpp CUDA, one run)
#   kv      python -m bench.kv_cache_type --streams 64 (f16, q8_0, q4_0 through the service's backend), and
#           llama-batched-bench with each cache type beside it ($OUT/kv-batched-bench.txt: the engine's own figures)
# The runs are recorded under /tmp/gpu/results and each run folder is copied to $OUT/<benchmark>-<run>/ (what
# comes back from $OUT must lie at most two folders down): copy each into bench/results/<benchmark>/runs/<run>/
# and run `python -m bench.results`. llama-cpp-python's Python package runs from the sdist over the libraries built here
# (LLAMA_CPP_LIB_PATH). BENCH_COMMIT names the commit of repo.tar (the unpacked tree has no git). The bench and
# power stages preload nothing since the product's fix (GPU_LOAD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 puts
# the old workaround back): see setup_env.
set -euo pipefail
stage=${1:?usage: bench/gpu_load.sh model|build|bench|power|onnxpart N|onnx|kv [options]}
shift
work=/tmp/gpu
sdist=$work/llama_cpp_python-0.3.36
mkdir -p "$work"

setup_env() {
    export PYTHONPATH=/tmp/site:$sdist:$work/repo LLAMA_CPP_LIB_PATH=$work/build/bin
    export LD_LIBRARY_PATH=$work/build/bin:${LD_LIBRARY_PATH:-}
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    # The appliance's runner used to segfault loading a model on this CUDA build unless the system libstdc++ was
    # preloaded (bench/results/load/runs/2026-12-05-h200-preload/notes.md). Fixed in the product since ac31cf7
    # (appliance/backends/cxx_runtime.py; root cause in bench/results/onnx_vs_llama/runs/2026-12-05-h100-cuda/
    # notes.md), so nothing is preloaded unless GPU_LOAD_PRELOAD names a library; every server of a run gets it alike.
    export LD_PRELOAD=${GPU_LOAD_PRELOAD-}
    rm -rf "$work/repo" && mkdir -p "$work/repo" && tar xf .gpu/r/repo.tar -C "$work/repo"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
}

# Each run folder recorded under $work/results, flat in $OUT (deeper folders do not come back).
bring_back() {
    for run in "$work"/results/*/runs/*/; do
        benchmark=$(basename "$(dirname "$(dirname "$run")")")
        mkdir -p "${OUT:?}/$benchmark-$(basename "$run")" && cp "$run"* "$OUT/$benchmark-$(basename "$run")/"
    done
}

case "$stage" in
model)
    cp .gpu/b/model.gguf.gz.part* "$work/"
    ls -la "$work"
    ;;
build)
    tar xzf .gpu/a/sdist.tar.gz -C "$work"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
        $(ls .gpu/a/wheels/*.whl | grep -v '/pip-')
    cp .gpu/a/model.gguf.gz.part* "$work/"
    cat "$work"/model.gguf.gz.part* | gunzip > "$work/model.gguf"
    sha256sum "$work/model.gguf"
    python3 --version
    cmake -S "$sdist/vendor/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_OPENMP=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,libstdc++.a > "$work/cmake.log"
    start=$(date +%s)
    cmake --build "$work/build" --target llama llama-server llama-batched-bench -j "$(nproc)" > "$work/build.log"
    echo "build: $(( $(date +%s) - start )) s"
    ls "$work/build/bin"
    # The engine's own limit: prompts of 32 tokens, 128 generated, 1 to 64 sequences at once.
    "$work/build/bin/llama-batched-bench" -m "$work/model.gguf" -ngl 99 -c 20480 -b 2048 -ub 512 -npp 32 -ntg 128 \
        -npl 1,8,32,64 > "$work/batched-bench.txt" 2> "$work/batched-bench.log"
    grep '^|' "$work/batched-bench.txt"
    cp "$work/batched-bench.txt" "${OUT:-$work}/" || true
    ;;
bench)
    setup_env
    cd "$work/repo"
    BENCH_RESULTS=$work/results python3 -m bench.load --model "$work/model.gguf" \
        --llama-server "$work/build/bin/llama-server" --attach "$work/batched-bench.txt" "$@" ||
        { tail -n 40 /tmp/bench-load-*/*.log; exit 1; }
    bring_back
    ;;
power)
    setup_env
    cd "$work/repo"
    BENCH_RESULTS=$work/results python3 -m bench.gpu_power --model "$work/model.gguf" "$@" ||
        { tail -n 40 /tmp/bench-gpu-power-*/*.log; exit 1; }
    bring_back
    ;;
onnxpart)
    mkdir -p "$work/onnx"
    cp .gpu/s"${1:?part number}"/part* "$work/onnx/"
    ls -la "$work/onnx"
    ;;
onnx)
    if [ ! -d "$work/onnx/smol" ]; then
        cat "$work"/onnx/part? | tar xzf - -C "$work/onnx"
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$work"/onnx/onnxruntime_gpu-*.whl
        rm -f "$work"/onnx/part?
    fi
    setup_env
    cd "$work/repo"
    BENCH_RESULTS=$work/results python3 -m bench.onnx_vs_llama --onnx "$work/onnx/smol" --gguf "$work/model.gguf" "$@"
    bring_back
    ;;
kv)
    setup_env
    cd "$work/repo"
    BENCH_RESULTS=$work/results python3 -m bench.kv_cache_type --model "$work/model.gguf" "$@"
    for kv in f16 q8_0 q4_0; do
        echo "## -ctk $kv -ctv $kv"
        "$work/build/bin/llama-batched-bench" -m "$work/model.gguf" -ngl 99 -fa on -c 20480 -b 2048 -ub 512 \
            -npp 32 -ntg 128 -npl 1,64 -ctk "$kv" -ctv "$kv" 2>/dev/null | grep '^|'
    done | tee "$OUT/kv-batched-bench.txt"
    bring_back
    ;;
*)
    echo "unknown stage $stage: use model, build, bench, power, onnxpart, onnx or kv" >&2
    exit 2
    ;;
esac
