#!/usr/bin/env bash
# Build llama.cpp's own C++ llama-server and llama-batched-bench, the peers of bench/load.py.
#
# They come from the llama.cpp vendored in the sdist of the llama-cpp-python that is installed,
# built with the Makefile's CPU flags, so the peer runs the same engine as the appliance. A bench
# dependency, never part of the product: everything lands in a cache folder outside the repository.
#
#   bench/build_llama_server.sh                  # prints the two binary paths when done
#
# Environment:
#   APPLIANCE_BENCH_CACHE       cache folder (default ~/.cache/appliance-bench)
#   PYTHON                      the Python whose llama-cpp-python decides the version (default .venv/bin/python)
#   LLAMA_CPP_PYTHON_VERSION    build this version instead of the installed one
#   JOBS                        parallel compile jobs (default: nproc)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${APPLIANCE_BENCH_CACHE:-$HOME/.cache/appliance-bench}"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python=python3
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

version="${LLAMA_CPP_PYTHON_VERSION:-$("$python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)}"
if [ -z "$version" ]; then
    echo "llama-cpp-python is not installed for $python: run 'make serve' first, or set LLAMA_CPP_PYTHON_VERSION" >&2
    exit 1
fi

src="$cache/llama_cpp_python-$version"
tarball="$cache/llama_cpp_python-$version.tar.gz"
mkdir -p "$cache"
if [ ! -f "$tarball" ]; then
    # The sdist only: its build dependencies may be wheels (they are not built, only the metadata is read).
    "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$cache" "llama-cpp-python==$version"
fi
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
    tar -xzf "$tarball" -C "$cache"
fi

# The Makefile's llama.cpp flags (OpenMP off, AVX2 on x86-64, native elsewhere), read from the Makefile itself.
cpu_flags="$(make -s --no-print-directory -C "$repo" -f Makefile -f - print-llama-cmake-args <<'EOF'
print-llama-cmake-args:
	@echo $(LLAMA_CMAKE_ARGS)
EOF
)"

# Offline: no HTTPS support (nothing to fetch at run time), no web UI (its assets would be downloaded
# from Hugging Face at build time), libcurl is gone from this llama.cpp (LLAMA_CURL is ignored).
# Static, so the binaries need nothing from the build folder's libraries.
llama="$src/vendor/llama.cpp"
# shellcheck disable=SC2086
cmake -S "$llama" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release $cpu_flags -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$llama/build" --target llama-server llama-batched-bench -j "$jobs"

echo "$llama/build/bin/llama-server"
echo "$llama/build/bin/llama-batched-bench"
