"""The helper graphs of the ONNX backend's GPU path (appliance/backends/ort_graphs.py), run on the CPU execution
provider against the numpy they replace: CI has no GPU, so this is where the graphs themselves are checked."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from appliance.backends.onnx_runtime import _GraphHelpers, _HostHelpers, _Part  # noqa: E402


class Signature:
    def __init__(self, n_arrays: int, kv_dtype, logits_dtype):
        self.past_names = [f"past_key_values.{i}" for i in range(n_arrays)]
        self.kv_dtype, self.logits_dtype = kv_dtype, logits_dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pack_and_head_graphs_equal_numpy(dtype):
    rng = np.random.default_rng(0)
    graphs, host = _GraphHelpers(Signature(4, dtype, dtype), "cpu", threads=1), _HostHelpers()
    wide = [rng.standard_normal((3, 2, 7, 8)).astype(dtype) for _ in range(4)]  # a batch of 3 rows, 7 positions
    narrow = [rng.standard_normal((1, 2, 4, 8)).astype(dtype) for _ in range(4)]  # a slot's own cache
    cases = [
        ([_Part(wide, [2, 0], 2, 7, 0), _Part(narrow, [0], 0, 4, 1)], 5),  # two rows windowed, one padded, stacked
        ([_Part(wide, [1], 1, 4, 0)], 3),  # a detach of 3 positions
        ([_Part(narrow, [0], 0, 4, 3)], 7),  # padded only
    ]
    for parts, width in cases:
        got = [v.numpy() for v in graphs.pack(parts, width)]
        want = host.pack(parts, width)
        assert all(g.shape == w.shape and np.array_equal(g, w) for g, w in zip(got, want)), (parts, width)
    logits = rng.standard_normal((3, 5, 11)).astype(dtype)
    logits[1, -1, 4] = logits[1, -1, 9] = logits[1, -1].max() + 1  # a tie: the first, as numpy's argmax
    value = ort.OrtValue.ortvalue_from_numpy(logits)
    last, best = graphs.head(value, want_logits=True)
    host_last, host_best = host.head(value, want_logits=True)
    assert np.array_equal(last, host_last) and np.array_equal(best, host_best) and best[1] == 4
    assert graphs.head(value, want_logits=False)[0] is None
