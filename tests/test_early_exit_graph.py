"""export/early_exit_graph.py: one graph with nested If nodes gives the chain's answers at batch 1."""

import numpy as np
import onnx

from erde.export.early_exit_graph import FILE
from erde.runtime.core.engine import Engine


def test_every_branch_holds_its_own_weights(exported):
    out, manifest = exported
    model = onnx.load(str(out / FILE))
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 1  # nested: one If at each level
    else_branch = next(a.g for a in ifs[0].attribute if a.name == "else_branch")
    assert len(else_branch.initializer) > 0  # segment 1's weights live inside its branch
    assert {i.name for i in model.graph.input} == {"image", "thresholds", "criterion"}


def test_forced_exits_and_thresholds_per_exit(exported):
    out, _ = exported
    eng = Engine.load(out, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    chain = eng.exit_probs(x)
    for k in range(eng.num_exits):
        probs, taken = eng.single_graph_probs(x, k)
        assert taken == k and np.abs(probs[0] - chain[k, 0]).max() < 1e-5
    p = eng.predict_array(x, 0.0, "max-prob")[0]  # everyone leaves at exit 1
    assert p.exit_index == 0 and len(p.segment_latency_ms) == 1
    p = eng.predict_array(x, early_exit=False)[0]
    assert p.exit_index == eng.num_exits - 1


def test_every_criterion_leaves_where_the_chain_does(exported):
    """The single graph's nodes for each registered criterion (erde.runtime.core.criteria) decide as numpy does."""
    from erde.runtime.core.criteria import CRITERIA, exit_indices, get

    out, _ = exported
    eng = Engine.load(out, threads=1)
    x = np.random.default_rng(1).standard_normal((12, 3, 32, 32)).astype(np.float32)
    probs = eng.exit_probs(x)
    for criterion in CRITERIA:
        scores = np.sort(get(criterion).score(probs[:-1]).ravel())
        for t in (scores[len(scores) // 4], scores[len(scores) // 2], scores[3 * len(scores) // 4]):
            want = exit_indices(probs, criterion, float(t)).tolist()
            have = [eng.predict_array(x[i:i + 1], float(t), criterion)[0].exit_index for i in range(len(x))]
            assert have == want, (criterion, t)
            assert eng.single_graph
        per_exit = tuple(float(scores[(k + 1) * len(scores) // (eng.num_exits + 1)]) for k in range(eng.num_exits - 1))
        want = exit_indices(probs, criterion, per_exit).tolist()  # one threshold per early exit
        assert [eng.predict_array(x[i:i + 1], per_exit, criterion)[0].exit_index for i in range(len(x))] == want
