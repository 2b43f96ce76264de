"""Where an ONNX Runtime CUDA decode step goes (the H100 run of 2026-12-05, bench/results/onnx_vs_llama): node
placement and Memcpy nodes from ONNX Runtime's verbose log, then 64 greedy steps of one sequence through the backend
with the decoder graph's and the helper graphs' run times.

    python bench/ort_step_profile.py PACKAGE_FOLDER [cuda|cpu] 2>&1 | grep -i "memcpy\\|placed on\\|median ms"
"""

from __future__ import annotations

import statistics
import sys
import time

import onnxruntime as ort

from appliance.backends import onnx_runtime
from appliance.backends.base import Feed, SamplingParams


def main() -> None:
    package, provider = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cuda")
    options = ort.SessionOptions()
    options.log_severity_level = options.log_verbosity_level = 0  # node placement, Memcpy nodes added
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    ort.InferenceSession(package + "/model.onnx", sess_options=options, providers=providers)
    backend = onnx_runtime.OnnxRuntimeBackend(package, threads=8, context_length=1024, n_slots=1, provider=provider)
    backend.facts = backend.load()
    times: dict[str, list[float]] = {"decoder graph": [], "helper graphs": [], "whole step": []}
    run = ort.InferenceSession.run_with_iobinding

    def timed(session, binding, *args):
        start = time.perf_counter()
        out = run(session, binding, *args)
        times["decoder graph" if session is backend.session else "helper graphs"].append(time.perf_counter() - start)
        return out

    ort.InferenceSession.run_with_iobinding = timed
    prompt = backend.tokenize("Write a story about a lighthouse keeper.", True, True)
    for _ in range(2):  # the first pass warms up
        for series in times.values():
            series.clear()
        backend.start_sequence(0, 0, SamplingParams(temperature=0))
        token = backend.step([Feed(0, prompt, 0, sample=True)])[0]
        for i in range(64):
            start = time.perf_counter()
            token = backend.step([Feed(0, [token], len(prompt) + i, sample=True)])[0]
            times["whole step"].append(time.perf_counter() - start)
    print("median ms per decode step:", {k: round(statistics.median(v) * 1000, 3) for k, v in times.items()})


if __name__ == "__main__":
    main()
