"""Turn an ERDE checkpoint into a model folder the torch-free runtime can run.

    out/
      segment_0.onnx ... segment_{E-1}.onnx   one graph per exit (backbone part + exit head)
      full.onnx                                the static network, for benchmarks
      manifest.json                            erde.runtime.core.manifest schema

The folder is built in a temporary sibling and renamed into place only after
every graph passed onnx.checker, the MAC cross-check and the parity check; an
existing folder is replaced only with ``force``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import onnx
import torch

from erde.runtime.common.cli import erde_version
from erde.runtime.common.errors import ErdeError
from erde.runtime.common.files import UnsafePathError
from erde.runtime.core.selftest import build_selftest
from erde.runtime.common.ownership import MODEL_TOOLS, build_folder, check_replaceable, sha256_file
from erde.runtime.core.manifest import (
    MANIFEST_NAME, FullGraph, Manifest, preprocessing_from_dict, Segment, TensorSpec, save_manifest,
)
from erde.training.checkpoint import load_model, read_checkpoint
from erde.training.macs import exit_macs
from erde.training.models import EarlyExitNet, keep_exits

from .early_exit_graph import write_early_exit_graph
from .onnx_macs import onnx_macs
from .parity import check_parity
from .segments import FullPath, Segment as SegmentModule, input_names, output_names

OPSET = 17  # loads in onnxruntime >= 1.19
MACS_RTOL = 0.01


class ExportError(ErdeError):
    """The export could not produce a model folder that passes its checks."""


def _export_graph(module: torch.nn.Module, x: torch.Tensor, path: Path, inputs: List[str], outputs: List[str],
                  metadata: Dict[str, str]) -> onnx.ModelProto:
    axes = {name: {0: "batch"} for name in inputs + outputs}
    buf = io.BytesIO()  # through memory: torch's exporter takes only UTF-8 paths, a user's folder may have any name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), buf, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())
    return proto


def _spec(name: str, shape) -> TensorSpec:
    return TensorSpec(name, ["batch"] + [int(d) for d in shape[1:]])


def default_out_dir(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + "_onnx")


def export_checkpoint(checkpoint: Path, out: Optional[Path] = None, force: bool = False,
                      parity_batch: int = 32, report: Optional[Callable[[str], None]] = None,
                      exits: Optional[Tuple[int, ...]] = None, single_graph: bool = False,
                      data: Optional[Path] = None) -> Manifest:
    """Export ``checkpoint`` into the model folder ``out``.

    With ``force`` an existing ``out`` is replaced only if an erde tool wrote it, unchanged and with nothing
    added (``erde.runtime.common.ownership``), and it does not hold the checkpoint itself.
    """
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    model, _ = load_model(checkpoint, ckpt)
    if exits is not None:
        model = keep_exits(model, tuple(exits))
    out = Path(out) if out is not None else default_out_dir(checkpoint)
    try:
        check_replaceable(out, force, "erde-export", MODEL_TOOLS, protect=[checkpoint])
    except UnsafePathError as e:
        raise ExportError(str(e)) from None
    return build_folder(out, force, "erde-export", MODEL_TOOLS,
                        lambda tmp: _build(model, ckpt, checkpoint, tmp, parity_batch, report, single_graph, data),
                        protect=[checkpoint])


def _build(model: EarlyExitNet, ckpt: Dict, checkpoint: Path, folder: Path, parity_batch: int,
           report: Optional[Callable[[str], None]] = None, single_graph: bool = False,
           data: Optional[Path] = None) -> Manifest:
    cfg = model.cfg
    num_exits = cfg.num_exits
    pre = ckpt["preprocessing"]
    h, w = cfg.input_size
    macs = exit_macs(model)
    essentials = {
        "erde_schema_version": "1",
        "erde_model_name": cfg.arch,
        "erde_num_exits": str(num_exits),
        "erde_class_names": json.dumps(ckpt["class_names"]),
        "erde_preprocessing": json.dumps(pre),
        "erde_cumulative_macs": json.dumps(list(macs.cumulative)),
    }
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w)
    segments, problems = [], []
    names_in = input_names(num_exits)
    traced = model.for_export()  # the same answers, arranged for inference; parity checks it against model
    for k in range(num_exits):
        module = SegmentModule(traced, k).eval()
        outs = output_names(k, num_exits)
        file = f"segment_{k}.onnx"
        proto = _export_graph(module, x, folder / file, [names_in[k]], outs, {**essentials, "erde_segment": str(k)})
        with torch.no_grad():
            y = module(x)
        y = y if isinstance(y, tuple) else (y,)
        counted = onnx_macs(proto)
        expected = macs.backbone[k] + macs.head[k]
        if abs(counted - expected) > MACS_RTOL * expected:
            problems.append(f"{file}: {counted} MACs in the ONNX graph vs {expected} from fvcore")
        segments.append(Segment(
            file=file, sha256=sha256_file(folder / file), inputs=[_spec(names_in[k], x.shape)],
            outputs=[_spec(n, t.shape) for n, t in zip(outs, y)], probs_output=f"probs_{k}",
            feature_output=None if k == num_exits - 1 else f"features_{k}",
            backbone_macs=macs.backbone[k], head_macs=macs.head[k], cumulative_macs=macs.cumulative[k],
        ))
        x = y[0] if k < num_exits - 1 else x
    image = torch.randn(2, 3, h, w)
    full_proto = _export_graph(FullPath(traced).eval(), image, folder / "full.onnx", ["image"], ["probs"],
                               {**essentials, "erde_segment": "full"})
    counted = onnx_macs(full_proto)
    if abs(counted - macs.full) > MACS_RTOL * macs.full:
        problems.append(f"full.onnx: {counted} MACs in the ONNX graph vs {macs.full} from fvcore")
    if problems:
        raise ExportError(f"{checkpoint}: export failed {len(problems)} check(s): " + "; ".join(problems))
    trained = list(ckpt["model_args"].get("exit_after", []))
    kept = [trained.index(b) for b in cfg.exit_after] + [len(trained)]  # exits left after --exits, and the last
    accs = ckpt.get("metrics", {}).get("val_exit_accuracy", [])
    metrics = {f"val_accuracy_exit_{k + 1}": float(accs[i]) for k, i in enumerate(kept) if i < len(accs)}
    manifest = Manifest(
        model_name=cfg.arch,
        class_names=list(ckpt["class_names"]),
        preprocessing=preprocessing_from_dict(pre),
        segments=segments,
        full=FullGraph("full.onnx", sha256_file(folder / "full.onnx"), "image", "probs", macs.full),
        opset=OPSET,
        metrics=metrics,
        source={"checkpoint": checkpoint.name, "checkpoint_sha256": sha256_file(checkpoint),
                "kind": str(ckpt.get("kind", "")), "val_fraction": str(ckpt.get("train_args", {}).get("val_fraction", 0.1)),
                "torch": str(torch.__version__), "onnx": onnx.__version__,
                "erde": erde_version()},
    )
    if single_graph and num_exits > 1:  # the whole model in one graph for batch 1 (the chain stays the portable form)
        manifest = dataclasses.replace(manifest, early_exit_graph=write_early_exit_graph(folder, manifest))
    save_manifest(folder, manifest)
    gen = torch.Generator().manual_seed(1)
    probe = torch.cat([torch.randn(parity_batch // 2, 3, h, w, generator=gen),
                       torch.randn(parity_batch - parity_batch // 2, 3, 1, 1, generator=gen).expand(-1, -1, h, w)])
    problems = check_parity(model, folder, probe, report)  # through Engine.load, as a board loads the folder
    if problems:
        raise ExportError(f"{checkpoint}: export failed {len(problems)} check(s): " + "; ".join(problems))
    line = build_selftest(folder, data)  # what erde-verify checks on the machine the folder lands on
    if report is not None:
        report(line)
    return manifest
