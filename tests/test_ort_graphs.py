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


# -- the decoder graph changed to pick the positions whose logits it computes ---------------------------------------
def _lm_head_graph(head_op: str = "MatMul", opset: int = 17) -> bytes:
    """hidden [batch, seq, 4] -> logits [batch, seq, 6]: an LM head (MatMul) or something else (Identity)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32), "w")
    relu = helper.make_node("Relu", ["hidden"], ["h"])  # something before the head, as a final norm would be
    head = (helper.make_node("MatMul", ["h", "w"], ["logits"]) if head_op == "MatMul"
            else helper.make_node("Identity", ["h"], ["logits"]))
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", 4])
    graph = helper.make_graph([relu, head], "g", [hidden], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def test_picking_logits_computes_the_chosen_positions_logits_as_the_whole_graph_does():
    from appliance.backends.ort_graphs import LOGIT_POSITIONS, LOGITS_ARGMAX, picking_logits

    original = _lm_head_graph()
    hidden = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    everything = ort.InferenceSession(original, providers=["CPUExecutionProvider"]).run(None, {"hidden": hidden})[0]
    picking = ort.InferenceSession(picking_logits(original), providers=["CPUExecutionProvider"])
    assert LOGIT_POSITIONS in [i.name for i in picking.get_inputs()]
    last = np.array([4, 0, 2])  # each row its own position, as right-padded prompts of different lengths
    got, best = picking.run(["logits", LOGITS_ARGMAX], {"hidden": hidden, LOGIT_POSITIONS: last.reshape(3, 1, 1)})
    assert got.shape == (3, 1, 6) and np.array_equal(got[:, 0], everything[np.arange(3), last])
    assert np.array_equal(best, got.argmax(-1))
    every = np.tile(np.arange(5), (3, 1))[..., None]
    got, best = picking.run(["logits", LOGITS_ARGMAX], {"hidden": hidden, LOGIT_POSITIONS: every})
    assert np.array_equal(got, everything) and np.array_equal(best, everything.argmax(-1))


def test_the_picked_logits_argmax_is_the_first_of_equal_maxima_as_numpy_s():
    from appliance.backends.ort_graphs import LOGIT_POSITIONS, LOGITS_ARGMAX, picking_logits

    picking = ort.InferenceSession(picking_logits(_lm_head_graph()), providers=["CPUExecutionProvider"])
    hidden = np.zeros((1, 2, 4), np.float32)  # every logit 0: all tied
    (best,) = picking.run([LOGITS_ARGMAX], {"hidden": hidden, LOGIT_POSITIONS: np.array([[[1]]])})
    assert best.tolist() == [[0]]


def test_picking_logits_leaves_a_graph_it_cannot_change_as_it_is():
    from appliance.backends.ort_graphs import picking_logits

    assert picking_logits(_lm_head_graph("Identity")) is None  # logits not straight from an LM head
    assert picking_logits(_lm_head_graph(opset=11)) is None  # GatherND has no batch_dims before opset 12


def test_picking_logits_serves_a_graph_it_cannot_read_as_it_is():
    from appliance.backends.ort_graphs import picking_logits

    whole = _lm_head_graph()
    assert picking_logits(whole[: len(whole) // 2]) is None  # cut short: a field runs past the end
    assert picking_logits(b"") is None  # no graph at all
