"""Probe of the runner's segfault in llama_model_load_from_file on a CUDA build of llama.cpp (issue 27's run):
which shared objects define and bind libstdc++'s locale symbols, which import loads libstdc++ first, and whether
the model loads in each way of starting the runner.

    python bench/stdcxx_probe.py --model MODEL.gguf --lib LLAMA_CPP_LIB_PATH [--out DIR]

Run with PYTHONPATH and LLAMA_CPP_LIB_PATH as the runner has them (bench/gpu_onnx.sh stdcxx). Prints a short
table; the dynamic linker's full logs go to --out (default $OUT).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

LOCALE_SYMBOLS = ("_ZNSt7collateIcE2idE", "_ZNSt6locale7classicEv", "_ZNSt6locale2id5_M_idEv",
                  "_ZNKSt7collateIcE12do_transformEPKcS2_", "_ZTVSt7collateIcE")

LOAD = """
import appliance.runner.worker as wk
b = wk._generator({spec!r})
facts = b.load()
print("LOADED", facts.info.get("device"), facts.info.get("gpu_layers_offloaded"))
"""

VARIANTS = {
    # name: (code before the load, extra environment)
    "runner as shipped": ("", {}),
    "LD_PRELOAD libstdc++": ("", {"LD_PRELOAD": "/lib/x86_64-linux-gnu/libstdc++.so.6"}),
    "llama_cpp imported first": ("import llama_cpp\n", {}),
    "no log capture": ("import contextlib, appliance.backends.llama_report as r\n"
                       "r.captured_log = contextlib.contextmanager(lambda: (yield []))\n"
                       "import appliance.backends.llama_cpp as l; l.captured_log = r.captured_log\n", {}),
    "without the runner's libstdc++ fix": ("import appliance.backends.cxx_runtime as c\n"
                                           "c.preload_cxx_runtime = lambda: None\n", {}),
}
UNFIXED = "without the runner's libstdc++ fix"


def run(code: str, env: dict, timeout: int = 120) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ | env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def exported(lib: str) -> dict:
    out = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    return {"std": sum(1 for n in names if n.startswith(("_ZNSt", "_ZSt", "_ZNKSt", "_ZTVSt", "_ZTISt"))),
            "locale": [s for s in LOCALE_SYMBOLS if any(n.split("@")[0] == s for n in names)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lib", required=True)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = parser.parse_args()
    out = Path(args.out)
    spec = {"format": "gguf", "path": args.model, "threads": 8, "context_length": 4096, "parallel": 4,
            "provider": "auto", "engine": {"gpu_layers": "auto", "flash_attn": "auto", "main_gpu": 0,
                                           "tensor_split": [], "kv_cache_type": "f16"}}
    load = LOAD.format(spec=spec)

    print("== which objects export libstdc++ symbols, once the runner's modules and llama_cpp are imported")
    rc, text = run("import appliance.runner.worker, llama_cpp\n"
                   "print('\\n'.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if '.so' in l})))", {})
    for lib in [line for line in text.splitlines() if line.startswith("/")]:
        facts = exported(lib)
        if facts["std"] or facts["locale"]:
            print(f"{facts['std']:6d} std symbols  {' '.join(facts['locale']) or '-':60s} {lib}")
    cuda = Path(args.lib) / "libggml-cuda.so"
    if cuda.exists():
        needed = subprocess.run(["readelf", "-d", str(cuda)], capture_output=True, text=True).stdout
        print("libggml-cuda.so needs:", " ".join(line.split("[")[1].rstrip("]") for line in needed.splitlines()
                                                  if "NEEDED" in line))

    print("== who loads libstdc++ first (LD_DEBUG=libs, importing the runner's modules)")
    rc, text = run("import appliance.runner.worker", {"LD_DEBUG": "libs"})
    (out / "ld-libs.log").write_text(text)
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if "libstdc++" in line), None)
    for line in lines[max(0, (first or 0) - 2):(first or 0) + 6] if first is not None else []:
        print(line.split(":", 1)[-1].strip()[:200])

    print("== locale bindings while loading the model (LD_DEBUG=bindings, the runner as shipped)")
    rc, text = run(VARIANTS[UNFIXED][0] + load, {"LD_DEBUG": "bindings"})
    std_lines = [line for line in text.splitlines() if "`_ZNSt" in line or "`_ZNKSt" in line or "`_ZTVSt" in line]
    (out / "ld-bindings.log").write_text("\n".join(std_lines)[-15_000_000:])
    seen = set()
    for line in text.splitlines():
        if any(s in line for s in LOCALE_SYMBOLS[:3]) and "binding file" in line:
            key = line.split(":", 1)[1].strip()
            if key not in seen:
                seen.add(key)
                print(key[:220])
    print(f"(exit {rc})")

    print("== the model load, each way")
    for name, (before, env) in VARIANTS.items():
        try:
            rc, text = run(before + load, env)
        except subprocess.TimeoutExpired:
            rc, text = "timeout", ""
        loaded = next((line for line in text.splitlines() if line.startswith("LOADED")), "")
        print(f"{name:40s} exit {rc}  {loaded}")
        (out / f"load-{re.sub(r'[^A-Za-z0-9]+', '_', name)}.log").write_text(text[-20000:])


if __name__ == "__main__":
    main()
