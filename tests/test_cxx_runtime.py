"""The C++ runtime is made global before llama.cpp's libraries load (the runner's segfault on CUDA builds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the dynamic linker's scopes: Linux")
SYMBOL = "_ZNSt6locale7classicEv"  # std::locale::classic(), defined by libstdc++


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_preload_puts_libstdcxx_in_the_global_scope_once():
    out = python("import ctypes\n"
                 "from appliance.backends import cxx_runtime as c\n"
                 "name = c.preload_cxx_runtime()\n"
                 f"print(bool(name), hasattr(ctypes.CDLL(None), {SYMBOL!r}), c.preload_cxx_runtime())")
    assert out == ["True", "True", "None"]  # dlsym over the global scope finds it; the second call does nothing


def test_the_llama_cpp_engine_preloads_before_llama_cpp_loads():
    pytest.importorskip("llama_cpp")
    out = python("import ctypes, sys\n"
                 "import appliance.backends.llama_cpp\n"
                 f"print(hasattr(ctypes.CDLL(None), {SYMBOL!r}))")
    assert out == ["True"]
