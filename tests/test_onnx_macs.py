import onnx

from erde.export.onnx_macs import onnx_macs
from erde.runtime.core.manifest import load_manifest


def test_fvcore_and_onnx_counts_agree_within_one_percent(exported):
    out, _ = exported
    manifest = load_manifest(out)
    for seg in manifest.segments:
        counted = onnx_macs(onnx.load(str(out / seg.file)))
        fvcore = seg.backbone_macs + seg.head_macs
        assert abs(counted - fvcore) <= 0.01 * fvcore, seg.file
    assert abs(onnx_macs(onnx.load(str(out / "full.onnx"))) - manifest.full.macs) <= 0.01 * manifest.full.macs


def test_hand_made_graph():
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.zeros((10, 8), np.float32), "fc")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["y"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["out"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 10])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_macs(model) == 8 * 3 * 9 * 16 * 16 + 8 * 10
