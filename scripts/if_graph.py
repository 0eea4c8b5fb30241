"""Probe: one ONNX graph with nested If nodes (batch 1, threshold as an input) against the segment chain.

    python scripts/if_graph.py MODEL_DIR [--threads 1] [--calls 3000]

Builds the If graph of a model folder from its segment graphs (each subgraph holding its own
weights), checks it against the engine, and times, at batch 1 and interleaved: full.onnx, the If
graph with every segment running, the engine through every segment, and both leaving at exit 1.
A measurement for the design notes, not part of the product (issue 12 tried it: see the notes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from erde.runtime.engine import Engine
from erde.runtime.manifest import load_manifest
from erde.runtime.sessions import make_session


def build_if_graph(folder: Path, out: Path) -> None:
    m = load_manifest(folder)
    K = len(m.class_names)
    segs = [onnx.load(str(folder / s.file)) for s in m.segments]

    def rename_graph(g, k, in_name_outer):
        pre = f"s{k}/"
        inp = g.input[0].name
        def r(n):
            if n == "": return n
            if n == inp: return in_name_outer
            return pre + n
        nodes = []
        for nd in g.node:
            nn = onnx.NodeProto(); nn.CopyFrom(nd)
            del nn.input[:]; nn.input.extend([r(i) for i in nd.input])
            del nn.output[:]; nn.output.extend([r(o) for o in nd.output])
            nn.name = pre + nd.name
            nodes.append(nn)
        inits = []
        for t in g.initializer:
            tt = onnx.TensorProto(); tt.CopyFrom(t); tt.name = pre + t.name; inits.append(tt)
        outs = {o.name: r(o.name) for o in g.output}
        return nodes, inits, outs

    def leave_nodes(k, probs):
        p = f"L{k}/"
        return [
            helper.make_node("ReduceMax", [probs], [p+"conf"], keepdims=0, axes=[1]) if False else helper.make_node("ReduceMax", [probs], [p+"conf"], keepdims=0),
            helper.make_node("GreaterOrEqual", [p+"conf", "threshold"], [p+"leave"]),
        ], p+"leave"

    def level(k, in_name):
        """Nodes, initializers for segment k and everything after it; outputs probs/exit names."""
        g = segs[k].graph
        nodes, inits, outs = rename_graph(g, k, in_name)
        probs = outs[f"probs_{k}"]
        if k == len(segs) - 1:
            nodes.append(helper.make_node("Identity", [probs], [f"out{k}/probs"]))
            nodes.append(helper.make_node("Constant", [], [f"out{k}/exit"], value=helper.make_tensor("v", TensorProto.INT64, [1], [k])))
            return nodes, inits, f"out{k}/probs", f"out{k}/exit"
        feat = outs[f"features_{k}"]
        ln, leave = leave_nodes(k, probs)
        nodes += ln
        # then: leave here
        then_nodes = [helper.make_node("Identity", [probs], [f"then{k}/probs"]),
                      helper.make_node("Constant", [], [f"then{k}/exit"], value=helper.make_tensor("v", TensorProto.INT64, [1], [k]))]
        then_g = helper.make_graph(then_nodes, f"then{k}", [], [
            helper.make_tensor_value_info(f"then{k}/probs", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"then{k}/exit", TensorProto.INT64, None)])
        en, ei, eprobs, eexit = level(k + 1, feat)
        else_g = helper.make_graph(en, f"else{k}", [], [
            helper.make_tensor_value_info(eprobs, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(eexit, TensorProto.INT64, None)], initializer=ei)
        nodes.append(helper.make_node("If", [leave], [f"if{k}/probs", f"if{k}/exit"], then_branch=then_g, else_branch=else_g))
        return nodes, inits, f"if{k}/probs", f"if{k}/exit"

    nodes, inits, probs, ex = level(0, "image")
    nodes.append(helper.make_node("Identity", [probs], ["probs"]))
    nodes.append(helper.make_node("Identity", [ex], ["exit"]))
    h, w = m.preprocessing.input_size
    graph = helper.make_graph(nodes, "erde_if", [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, h, w]),
        helper.make_tensor_value_info("threshold", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, K]),
         helper.make_tensor_value_info("exit", TensorProto.INT64, [1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _time(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - t0) / calls * 1e6)
    return min(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "if.onnx"
        build_if_graph(args.model_dir, path)
        e = Engine.load(args.model_dir, threads=args.threads)
        s = make_session(path, threads=args.threads)
        x = np.random.default_rng(0).standard_normal((1,) + e._input_shape).astype(np.float32)
        never, always = np.array(1.01, dtype=np.float32), np.array(0.0, dtype=np.float32)
        p, ex = s.run(None, {"image": x, "threshold": never})
        diff = float(np.abs(p - e.exit_probs(x)[-1]).max())
        print(f"If graph vs engine, last exit: max |probability difference| {diff:.1e}, exit {int(ex[0]) + 1}")
        full = _time(lambda: e.run_full(x), args.calls)
        rows = [("full.onnx", full),
                ("If graph, every segment", _time(lambda: s.run(None, {"image": x, "threshold": never}), args.calls)),
                ("engine, every segment", _time(lambda: e.predict_array(x, early_exit=False), args.calls)),
                ("If graph, leaving at exit 1", _time(lambda: s.run(None, {"image": x, "threshold": always}),
                                                       args.calls)),
                ("engine, leaving at exit 1", _time(lambda: e.predict_array(x, 0.0), args.calls))]
        for name, us in rows:
            print(f"{name:30s} {us:8.1f} us  {us / full:5.2f}x full.onnx")


if __name__ == "__main__":
    main()
