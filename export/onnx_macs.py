"""Count MACs (multiply-accumulates) in an ONNX graph: Conv, Gemm and MatMul nodes.

An independent check of fvcore's counts: it reads weight shapes from the graph's
initializers and activation shapes from ONNX shape inference, per image (the
batch axis is left out).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
from onnx import shape_inference


def _shapes(model: onnx.ModelProto) -> Dict[str, List[int]]:
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def onnx_macs(model: onnx.ModelProto) -> int:
    """MACs per image of the Conv, Gemm and MatMul nodes of ``model``."""
    shapes = _shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]  # [C_out, C_in/groups, kH, kW]
            out = shapes[node.output[0]]  # [N, C_out, H, W]
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            trans_b = any(att.name == "transB" and att.i == 1 for att in node.attribute)
            k, n_out = (b[1], b[0]) if trans_b else (b[-2], b[-1])
            rows = int(np.prod(a[1:-1])) if len(a) > 2 else 1  # per image: drop the batch axis
            total += rows * k * n_out
    return total
