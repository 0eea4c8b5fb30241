"""Two rewrites of a quantized segment chain that make int8 early exit cheap (used by erde-quantize).

onnxruntime runs an int8 convolution in NHWC order on uint8 tensors. A QDQ segment graph, as onnxruntime's
quantizer writes it, hands its features on as float NCHW, so every boundary costs a transpose and a dequantize at
the end of segment k and a quantize and a transpose at the start of segment k+1; and an exit head (BatchNorm,
ReLU, average pool, Linear) runs as eleven small nodes, most of them layout changes. Both cost about as much as in
fp32 on graphs that are 2-3x faster (benchmarks/results/int8-exits-epyc). So:

1. **uint8 boundaries** (``pass_uint8``): segment k's features output becomes the uint8 tensor its last
   convolution already computes, in NHWC order, and segment k+1 reads it as it is. Both graphs keep an explicit
   Transpose, which onnxruntime cancels against its own layout change, so the graphs stay right on any runtime.
   The values crossing the boundary are bit-identical to what the QDQ pair computed.
2. **integer exit heads** (``integer_head``): ReLU(BatchNorm(x)) with x = s (u - z) is, for a positive
   BatchNorm scale a, a s max(u - t, 0) with a per-channel threshold t in units of u. onnxruntime's QLinearAdd
   (com.microsoft, in every CPU build; onnxruntime 1.19 on, and OpenVINO, read it) adds -t to u and rounds to
   uint8, saturating at 0: that is the ReLU, in one node, half a step off at most (like the rounding of u
   itself; t itself is kept to 1/255 of its largest value). The pool and the Linear fold into one int8 weight over
   its output, so the head is QLinearAdd, Flatten, MatMulInteger, DequantizeLinear (the int32 sums times each
   class's weight scale), Add and Softmax. Spelled with standard operators only (Cast, Sub, QuantizeLinear:
   uint8 Max needs onnxruntime 1.22) the head cost three times as much. The folded weights are int8 in
   [-64, 64], like every weight of an erde int8 graph (right on x86 CPUs without VNNI).

Each rewrite checks its pattern first and leaves the graphs as they were when it does not match (the chain then
stays correct, only slower); erde-quantize reports which ones it made, and compares every exit with fp32 after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

#: int8 weights of a folded head: the same 7-bit range as every weight of an int8 graph (quantize.py).
WEIGHT_LIMIT = 64


@dataclass(frozen=True)
class Boundary:
    """A feature map handed on as uint8 NHWC: the tensor's name, its quantization and its NCHW size."""

    name: str
    scale: float
    zero_point: int
    chw: Tuple[int, int, int]


def _helpers():
    import onnx
    from onnx import helper, numpy_helper

    return onnx, helper, numpy_helper


def _array(graph, name: str) -> Optional[np.ndarray]:
    """The value of initializer ``name``, or of a DequantizeLinear of initializers (as float32); else None."""
    _, _, numpy_helper = _helpers()
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = _producer(graph, name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    parts = [_array(graph, i) for i in node.input]
    if any(p is None for p in parts):
        return None
    q, scale = parts[0].astype(np.float64), parts[1].astype(np.float64)
    zero = parts[2].astype(np.float64) if len(parts) > 2 else np.zeros_like(scale)
    if scale.ndim == 1 and q.ndim > 1:  # per axis
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def _producer(graph, name: str):
    return next((n for n in graph.node if name in n.output), None)


def _consumers(graph, name: str) -> List:
    return [n for n in graph.node if name in n.input]


def _dims(value_info) -> List:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _rename_input(graph, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _replace_value(values, name: str, new) -> None:
    i = next(i for i, v in enumerate(values) if v.name == name)
    del values[i]
    values.insert(i, new)


def _scalar(graph, name: str) -> Optional[float]:
    v = _array(graph, name)
    return float(v) if v is not None and v.size == 1 else None


def pass_uint8(producer, consumer, name: str) -> Optional[Boundary]:
    """Hand ``name`` from the ``producer`` graph to the ``consumer`` graph as uint8 NHWC (both ModelProtos,
    changed in place). None, with both graphs untouched, unless the producer ends in QuantizeLinear then
    DequantizeLinear of a 4-D feature map and the consumer starts with a QuantizeLinear of the same scale and
    zero point."""
    onnx, helper, _ = _helpers()
    pg, cg = producer.graph, consumer.graph
    dq = _producer(pg, name)
    out = next((o for o in pg.output if o.name == name), None)
    inp = next((i for i in cg.input if i.name == name), None)
    if dq is None or dq.op_type != "DequantizeLinear" or out is None or inp is None or len(dq.input) < 3:
        return None
    q = _producer(pg, dq.input[0])
    dims = _dims(out)
    if q is None or q.op_type != "QuantizeLinear" or len(dims) != 4 or not all(isinstance(d, int) and d > 0
                                                                                for d in dims[1:]):
        return None
    scale, zero = _scalar(pg, dq.input[1]), _array(pg, dq.input[2])
    readers = _consumers(cg, name)
    if scale is None or zero is None or zero.dtype != np.uint8 or zero.size != 1 or len(readers) != 1:
        return None
    cq = readers[0]
    c_scale, c_zero = (_scalar(cg, cq.input[1]), _array(cg, cq.input[2])) if len(cq.input) == 3 else (None, None)
    if (cq.op_type != "QuantizeLinear" or c_scale is None or c_zero is None or c_zero.dtype != np.uint8
            or int(c_zero) != int(zero) or abs(c_scale - scale) > 1e-6 * scale):
        return None
    batch, c, h, w = dims
    # producer: the uint8 tensor, transposed to NHWC, is the output; the float copy stays for the head's old nodes
    float_name = f"{name}_float"
    dq.output[0] = float_name
    _rename_input(pg, name, float_name)
    pg.node.append(helper.make_node("Transpose", [dq.input[0]], [name], perm=[0, 2, 3, 1], name=f"{name}_to_nhwc"))
    _replace_value(pg.output, name, helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, [batch, h, w, c]))
    # consumer: reads it as it is; its dequantize takes the producer's exact scale
    nchw = f"{name}_nchw_uint8"
    _rename_input(cg, cq.output[0], nchw)
    cg.node.remove(cq)
    cg.node.insert(0, helper.make_node("Transpose", [name], [nchw], perm=[0, 3, 1, 2], name=f"{name}_to_nchw"))
    _replace_value(cg.input, name, helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, [batch, h, w, c]))
    _set_initializer(cg, cq.input[1], np.asarray(scale, dtype=np.float32))
    return Boundary(name, scale, int(zero), (c, h, w))


def _set_initializer(graph, name: str, value: np.ndarray) -> None:
    _, _, numpy_helper = _helpers()
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), name))


@dataclass(frozen=True)
class _Head:
    """An fp32 exit head: BatchNorm (scale a, shift b per channel), ReLU, average pool, Linear, Softmax."""

    a: np.ndarray  # [C]
    b: np.ndarray  # [C]
    pool: Tuple[int, int]
    weight: np.ndarray  # [K, C * Ho * Wo]
    bias: np.ndarray  # [K]


def _chain(graph, start: str, ops: List[str]) -> Optional[List]:
    """The nodes of ``ops`` in a row from tensor ``start``, each the only reader of the one before; else None."""
    nodes, name = [], start
    for op in ops:
        readers = _consumers(graph, name)
        if len(readers) != 1 or readers[0].op_type != op:
            return None
        nodes.append(readers[0])
        name = readers[0].output[0]
    return nodes


def _attrs(node) -> Dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fp32_head(graph, features: str, probs: str) -> Optional[_Head]:
    """The exit head from ``features`` to ``probs`` in an fp32 segment graph, if it is erde's ExitHead."""
    nodes = _chain(graph, features, ["BatchNormalization", "Relu", "AveragePool", "Flatten", "Gemm", "Softmax"])
    if nodes is None or nodes[-1].output[0] != probs:
        return None
    bn, _, pool, flat, gemm, soft = nodes
    values = [_array(graph, n) for n in list(bn.input[1:5]) + list(gemm.input[1:3])]
    if any(v is None for v in values) or len(gemm.input) < 3:
        return None
    gamma, beta, mean, var, weight, bias = values
    p, g = _attrs(pool), _attrs(gemm)
    kernel = tuple(p.get("kernel_shape", ()))
    if (len(kernel) != 2 or tuple(p.get("strides", kernel)) != kernel or any(p.get("pads", [0])) or p.get("ceil_mode", 0)
            or _attrs(flat).get("axis", 1) != 1 or g.get("transB", 0) != 1 or g.get("transA", 0) != 0
            or g.get("alpha", 1.0) != 1.0 or g.get("beta", 1.0) != 1.0 or _attrs(soft).get("axis", -1) not in (1, -1)):
        return None
    a = gamma / np.sqrt(var + _attrs(bn).get("epsilon", 1e-5))
    return _Head(a.astype(np.float64), (beta - a * mean).astype(np.float64), kernel, weight.astype(np.float64),
                 bias.astype(np.float64))


@dataclass(frozen=True)
class _Folded:
    """The integer head's constants: u - t as QLinearAdd computes it, the int8 weight and the float tail."""

    shift: np.ndarray  # uint8 [C]: QLinearAdd's B, with scale ``shift_scale`` and zero point 255: -t per channel
    shift_scale: float
    weight: np.ndarray  # int8 [H*W*C, K]
    scale: np.ndarray  # float32 [K]: one step of each class's weight
    bias: np.ndarray  # float32 [K]


def _folded(head: _Head, boundary: Boundary) -> Optional[_Folded]:
    """The integer head's constants, or None if it cannot be folded (a BatchNorm scale that is not positive, or
    shapes that do not fit)."""
    c, h, w = boundary.chw
    kh, kw = head.pool
    ho, wo = (h - kh) // kh + 1, (w - kw) // kw + 1
    k = head.weight.shape[0]
    if head.a.shape != (c,) or not np.all(head.a > 0) or head.weight.shape[1] != c * ho * wo or head.bias.shape != (k,):
        return None
    s, z = boundary.scale, boundary.zero_point
    t = z - head.b / (head.a * s)  # ReLU(a s (u - z) + b) = a s max(u - t, 0)
    # the pool and the Linear as one weight over the NHWC positions, times the BatchNorm scale a s
    per = head.weight.reshape(k, c, ho, wo).transpose(2, 3, 1, 0) / (kh * kw)  # [Ho, Wo, C, K]
    full = np.zeros((h, w, c, k))
    for dy in range(kh):
        for dx in range(kw):
            full[dy:ho * kh:kh, dx:wo * kw:kw] = per
    full *= (head.a * s)[None, None, :, None]
    full = full.reshape(h * w * c, k)
    step = np.abs(full).max(axis=0) / WEIGHT_LIMIT
    step[step == 0] = 1.0
    w8 = np.clip(np.round(full / step), -WEIGHT_LIMIT, WEIGHT_LIMIT)
    # QLinearAdd subtracts t in [0, 255] only: below 0 the ReLU never clips (max(u - t, 0) = u + |t|, the |t| a
    # constant of the bias), above 255 it always does (0, as t = 255 gives)
    kept = np.clip(t, 0.0, 255.0)
    shift_scale = max(float(kept.max()) / 255.0, 1.0 / 255.0)
    shift = 255 - np.round(kept / shift_scale)
    constant = np.tile(np.where(t < 0, -t, 0.0), h * w)  # per NHWC position
    bias = head.bias + (w8 * constant[:, None]).sum(axis=0) * step
    return _Folded(shift.astype(np.uint8), shift_scale, w8.astype(np.int8), step.astype(np.float32),
                   bias.astype(np.float32))


def integer_head(graph, head: _Head, boundary: Boundary, probs: str) -> bool:
    """Replace the QDQ exit head that computes ``probs`` from the boundary's features in ``graph`` (after
    ``pass_uint8``) by the integer head; False, with the graph untouched, when it cannot be folded."""
    _, helper, numpy_helper = _helpers()
    folded = _folded(head, boundary)
    if folded is None or not any(o.name == probs for o in graph.output) or _producer(graph, boundary.name) is None:
        return False
    stale = _producer(graph, probs)
    stale.output[0] = f"{probs}_replaced"  # the old head becomes dead code, pruned below
    pre = f"{probs}_head/"
    graph.node.extend([
        helper.make_node("QLinearAdd", [boundary.name, pre + "one", pre + "zero", pre + "shift", pre + "shift_scale",
                                        pre + "full", pre + "one", pre + "zero"], [pre + "relu"], domain="com.microsoft",
                         name=pre + "relu"),  # max(u - t, 0) rounded: uint8 saturates at 0
        helper.make_node("Flatten", [pre + "relu"], [pre + "relu_flat"], axis=1, name=pre + "flatten"),
        helper.make_node("MatMulInteger", [pre + "relu_flat", pre + "weight"], [pre + "sum"], name=pre + "matmul"),
        helper.make_node("DequantizeLinear", [pre + "sum", pre + "scale"], [pre + "scaled"], axis=1, name=pre + "scale"),
        helper.make_node("Add", [pre + "scaled", pre + "bias"], [pre + "logits"], name=pre + "bias"),
        helper.make_node("Softmax", [pre + "logits"], [probs], axis=1, name=pre + "softmax")])
    graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), pre + "one"),
                              numpy_helper.from_array(np.array(0, np.uint8), pre + "zero"),
                              numpy_helper.from_array(np.array(255, np.uint8), pre + "full"),
                              numpy_helper.from_array(folded.shift, pre + "shift"),
                              numpy_helper.from_array(np.array(folded.shift_scale, np.float32), pre + "shift_scale"),
                              numpy_helper.from_array(folded.weight, pre + "weight"),
                              numpy_helper.from_array(folded.scale, pre + "scale"),
                              numpy_helper.from_array(folded.bias, pre + "bias")])
    prune(graph)
    return True


def prune(graph) -> None:
    """Remove the nodes whose outputs nothing reads (nor the graph returns), then the unused initializers."""
    while True:
        wanted = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in wanted for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    del graph.value_info[:]  # stale after the rewrites; onnxruntime infers the shapes again


def rewrite_chain(int8_models: List, fp32_models: List, features: List[str], probs: List[str]) -> List[str]:
    """Both rewrites over a chain of int8 segment graphs (ModelProtos, changed in place), with the fp32 graphs
    they came from for the heads' weights. ``features[k]``: what segment k hands on; ``probs[k]``: its exit.
    Returns one line per boundary and head saying what was done."""
    onnx, _, _ = _helpers()
    done = []
    for k, name in enumerate(features):
        boundary = pass_uint8(int8_models[k], int8_models[k + 1], name)
        if boundary is None:
            done.append(f"exit {k + 1}: {name} stays float (not the QDQ pattern erde rewrites)")
            continue
        head = fp32_head(fp32_models[k].graph, name, probs[k])
        ok = head is not None and integer_head(int8_models[k].graph, head, boundary, probs[k])
        done.append(f"exit {k + 1}: {name} handed on as uint8 NHWC; "
                    + ("integer head" if ok else "QDQ head kept (not erde's ExitHead or a BatchNorm scale <= 0)"))
    for m in int8_models:
        if any(n.domain == "com.microsoft" for n in m.graph.node) and not any(
                o.domain == "com.microsoft" for o in m.opset_import):
            m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        prune(m.graph)
        onnx.checker.check_model(m)
    return done
