"""Versioned checkpoints that rebuild their own model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)``: no pickled code is ever run. It
carries the architecture config (``model_args``), class names, preprocessing,
training arguments, validation metrics and, while training, the optimizer state
needed by ``--resume``. Files are written to a temporary name, then renamed.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from erde.runtime.common.errors import ErdeError
from erde.runtime.common.files import UnsafePathError, check_regular

from .models import EarlyExitNet, build_model, config_from_dict

MAX_CHECKPOINT_BYTES = 2 << 30  # 2 GiB: far above any ERDE model

FORMAT = "erde-checkpoint"
VERSION = 1


class CheckpointError(ErdeError):
    """A file is not a readable ERDE checkpoint of this version."""


def make_checkpoint(
    model: EarlyExitNet,
    *,
    kind: str,
    class_names,
    preprocessing: Dict[str, Any],
    train_args: Dict[str, Any],
    metrics: Dict[str, Any],
    progress: Dict[str, Any],
    training_state: Dict[str, Any] | None = None,
) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,  # "teacher" or "student"
        "model_args": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "preprocessing": preprocessing,  # input_size, mean, std, channel_order, resize
        "train_args": train_args,
        "metrics": metrics,
        "progress": progress,  # epoch done, epochs planned, finished
        "training_state": training_state or {},  # optimizer etc., for --resume
        "torch_version": str(torch.__version__),
    }


def compact(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """A finished checkpoint for the repository: float16 weights, no optimizer state, paths made relative.

    ``load_model`` casts the weights back to float32; a compact checkpoint cannot be resumed.
    """
    if not ckpt.get("progress", {}).get("finished"):
        raise CheckpointError("only a finished run can be compacted (its optimizer state is dropped)")
    out = dict(ckpt)
    out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    out["training_state"] = {}
    args = dict(ckpt.get("train_args", {}))
    for key in ("data", "teacher"):  # absolute paths of the machine that trained it: keep the name only
        if args.get(key):
            args[key] = Path(args[key]).name
    out["train_args"] = args
    out["compact"] = True
    return out


def save_checkpoint(ckpt: Dict[str, Any], path) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path.parent}: output folder does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write checkpoint ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path) -> Dict[str, Any]:
    """Load and check a checkpoint file; never unpickles code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        check_regular(path, MAX_CHECKPOINT_BYTES, what="checkpoint")  # a FIFO would hang torch.load
    except UnsafePathError as e:
        raise CheckpointError(str(e)) from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a forbidden class or function: just not a pickle
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or not written by torch.save)") from None
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain data "
            "(it could run code); only ERDE checkpoints written by erde-train are accepted"
        ) from None
    except Exception as e:  # torch.load raises many types on damaged or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); is the file complete?") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ERDE checkpoint (written by erde-train)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')!r}, this erde reads version {VERSION}; "
            "use the erde release that wrote it, or retrain"
        )
    for key in ("model_args", "state_dict", "class_names", "preprocessing"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}; the file is damaged")
    return ckpt


def load_model(path, ckpt: Dict[str, Any] | None = None) -> Tuple[EarlyExitNet, Dict[str, Any]]:
    """Rebuild the model a checkpoint describes, in eval mode."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["model_args"])
        model = build_model(cfg)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    except (TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not match the stored architecture ({str(e).splitlines()[0]})") from None
    return model.eval(), ckpt
