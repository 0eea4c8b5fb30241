"""One ONNX graph that runs the whole early-exit model at batch 1: nested ``If`` nodes, one per early exit.

    inputs:  image [1,3,H,W] float32; thresholds [E-1] float32 (one per early exit); criterion: int64, the
             position of the exit criterion in erde.runtime.core.criteria.CRITERIA
    outputs: probs [1,K] float32 (the exit that answered); exit [1] int64 (its 0-based index)

Segment k's nodes run; if its exit passes the rule (the criterion's own nodes, from erde.runtime.core.criteria,
against thresholds[k]) the graph answers there, else the ``else`` branch runs segment k+1.
Each branch holds its own weights (initializers inside the subgraph): with the weights in the
main graph, onnxruntime leaves the subgraph convolutions out of its blocked (NCHWc) layout and
runs them far slower. One ``session.run`` replaces the segment chain's Python loop and feature
copies; the per-segment graphs stay in the folder as the portable form (any batch size, any
runtime). Built from the segment graphs of a model folder, so it needs onnx, not torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Tuple

import onnx
from onnx import TensorProto, helper

from erde.runtime.core.criteria import CRITERIA, get as criteria_get
from erde.runtime.core.manifest import EarlyExitGraph, Manifest

FILE = "early_exit.onnx"


def _renamed(graph: onnx.GraphProto, k: int, outer_input: str) -> Tuple[List, List, dict]:
    """Segment k's nodes and initializers with names prefixed ``s{k}/``; its input becomes ``outer_input``."""
    prefix, inp = f"s{k}/", graph.input[0].name

    def name(n: str) -> str:
        return n if n == "" else outer_input if n == inp else prefix + n

    nodes = []
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(name(i) for i in node.input)
        del new.output[:]
        new.output.extend(name(o) for o in node.output)
        new.name = prefix + node.name
        nodes.append(new)
    inits = []
    for t in graph.initializer:
        new = onnx.TensorProto()
        new.CopyFrom(t)
        new.name = prefix + t.name
        inits.append(new)
    return nodes, inits, {o.name: name(o.name) for o in graph.output}


def _leave(k: int, probs: str, num_classes: int) -> Tuple[List, str]:
    """Nodes deciding whether the image leaves at exit k: every criterion's own nodes (``Criterion.onnx_nodes``),
    the one the ``criterion`` input names (its position in ``CRITERIA``) chosen with Equal/And/Or."""
    p = f"rule{k}/"
    nodes = [helper.make_node("Constant", [], [p + "k"], value_int=k),
             helper.make_node("Gather", ["thresholds", p + "k"], [p + "t"], axis=0)]
    chosen = []
    for i, name in enumerate(CRITERIA):
        q = f"{p}{name}/"
        specs, leave = criteria_get(name).onnx_nodes(q, probs, p + "t", num_classes)
        nodes += [helper.make_node(op, inputs, outputs, **attrs) for op, inputs, outputs, attrs in specs]
        nodes += [helper.make_node("Constant", [], [q + "index"], value_int=i),
                  helper.make_node("Equal", ["criterion", q + "index"], [q + "named"]),
                  helper.make_node("And", [q + "named", leave], [q + "chosen"])]  # Where has no bool kernel in ORT
        chosen.append(q + "chosen")
    while len(chosen) > 1:
        nodes.append(helper.make_node("Or", chosen[:2], [f"{p}or{len(chosen)}"]))
        chosen = [f"{p}or{len(chosen)}"] + chosen[2:]
    return nodes, chosen[0]


def _answer(tag: str, probs: str, k: int) -> List:
    return [helper.make_node("Identity", [probs], [f"{tag}/probs"]),
            helper.make_node("Constant", [], [f"{tag}/exit"],
                             value=helper.make_tensor(f"{tag}/exit", TensorProto.INT64, [1], [k]))]


def _outputs(tag: str) -> List:
    return [helper.make_tensor_value_info(f"{tag}/probs", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{tag}/exit", TensorProto.INT64, None)]


def _level(segs: List[onnx.ModelProto], k: int, outer_input: str, num_classes: int) -> Tuple[List, List, str]:
    """Nodes and initializers from segment k on; returns the tag of its (probs, exit) outputs."""
    nodes, inits, outs = _renamed(segs[k].graph, k, outer_input)
    probs = outs[f"probs_{k}"]
    if k == len(segs) - 1:
        return nodes + _answer(f"end{k}", probs, k), inits, f"end{k}"
    rule, leave = _leave(k, probs, num_classes)
    then_graph = helper.make_graph(_answer(f"then{k}", probs, k), f"leave_at_{k}", [], _outputs(f"then{k}"))
    else_nodes, else_inits, tag = _level(segs, k + 1, outs[f"features_{k}"], num_classes)
    else_graph = helper.make_graph(else_nodes, f"go_on_after_{k}", [], _outputs(tag), initializer=else_inits)
    nodes += rule + [helper.make_node("If", [leave], [f"if{k}/probs", f"if{k}/exit"],
                                      then_branch=then_graph, else_branch=else_graph)]
    return nodes, inits, f"if{k}"


def write_early_exit_graph(folder: Path, manifest: Manifest) -> EarlyExitGraph:
    """Build ``early_exit.onnx`` in ``folder`` from its segment graphs; return its manifest entry."""
    folder = Path(folder)
    segs = [onnx.load(str(folder / s.file)) for s in manifest.segments]
    k_classes = len(manifest.class_names)
    nodes, inits, tag = _level(segs, 0, "image", k_classes)
    nodes += [helper.make_node("Identity", [f"{tag}/probs"], ["probs"]),
              helper.make_node("Identity", [f"{tag}/exit"], ["exit"])]
    h, w = manifest.preprocessing.input_size
    graph = helper.make_graph(
        nodes, "erde_early_exit",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, h, w]),
         helper.make_tensor_value_info("thresholds", TensorProto.FLOAT, [max(1, manifest.num_exits - 1)]),
         helper.make_tensor_value_info("criterion", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, k_classes]),
         helper.make_tensor_value_info("exit", TensorProto.INT64, [1])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=list(segs[0].opset_import), producer_name="erde-export")
    model.ir_version = segs[0].ir_version
    onnx.checker.check_model(model, full_check=True)
    path = folder / FILE
    onnx.save(model, str(path))
    return EarlyExitGraph(FILE, hashlib.sha256(path.read_bytes()).hexdigest())
