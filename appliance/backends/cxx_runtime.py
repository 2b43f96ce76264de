"""The C++ runtime made global before llama.cpp's libraries load (the runner's segfault on CUDA builds).

llama-cpp-python opens libllama.so with ctypes (RTLD_LOCAL): each std:: symbol its libraries use is looked up
in the global scope first, then in the objects that dlopen brought in, in load order. On a CUDA build of
llama.cpp the runner crashed in llama_model_load_from_file (std::regex's collate<char> facet called through a
wrong vtable) unless libstdc++ was preloaded: see bench/results/load/runs/2026-12-05-h200-preload/notes.md and
bench/stdcxx_probe.py for what binds where. Opening the system's libstdc++ with RTLD_GLOBAL first puts its
definitions in the global scope, as LD_PRELOAD did, so every library loaded after it binds std:: to that one
runtime. It is the libstdc++ the process would load anyway (already mapped by numpy in the runner), so this
adds no library; where none is found (a musl or macOS box), nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)
_done = False


def preload_cxx_runtime() -> str | None:
    """Open libstdc++ with RTLD_GLOBAL once per process; the name opened, or None."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return None
    _done = True
    name = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
    try:
        ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as exc:
        log.debug("libstdc++ not preloaded (%s)", exc)
        return None
    return name
