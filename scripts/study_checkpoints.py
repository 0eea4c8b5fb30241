"""The study's committed checkpoints: reuse a finished run from the repository instead of training it again.

A study step is defined by what ``erde-train`` stores as ``train_args`` (architecture, exits,
recipe and schedule, loss, data split) and, for a student, by its teacher. The results folder
keeps compact copies of finished runs (``erde-train compact``: float16 weights, a few MB) and an
index, ``checkpoints.json``, with each file's sha256, its defining arguments and its teacher's
sha256. A committed checkpoint is reused only when all three match; otherwise the study says
which one differs and trains the step again. Nothing is reused silently.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from erde.export.exporter import sha256_file as sha256
from erde.runtime.common.files import write_json_atomic

INDEX = "checkpoints.json"
# train_args that define a run; data and teacher are paths of the machine that trained it.
DEFINING = ("kind", "arch", "exits", "limit", "val_fraction", "train", "loss")


def defining_args(train_args: Dict[str, Any]) -> Dict[str, Any]:
    """The defining part of ``train_args``, as JSON sees it (tuples become lists), so it compares with the index."""
    return json.loads(json.dumps({k: train_args.get(k) for k in DEFINING}))


@dataclass
class CommittedCheckpoints:
    folder: Path  # benchmarks/results/<study>/checkpoints
    log: Any = print

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX

    def index(self) -> Dict[str, Dict[str, Any]]:
        try:
            return json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self.log(f"warning: {self.index_path} is unreadable ({e}); no committed checkpoint is reused")
            return {}

    def reuse(self, name: str, want: Dict[str, Any], teacher_sha: Optional[str], dest: Path) -> bool:
        """Copy the committed ``name`` to ``dest`` when its hash, arguments and teacher match ``want``."""
        entry = self.index().get(name)
        path = self.folder / f"{name}.pt"
        if entry is None or not path.exists():
            return False
        problems = []
        if sha256(path) != entry.get("sha256"):
            problems.append("its sha256 differs from the index (the file changed)")
        have = entry.get("args", {})
        changed = [k for k in DEFINING if have.get(k) != want.get(k)]
        if changed:
            problems.append(f"{', '.join(changed)} differ from this study's")
        if teacher_sha is not None and entry.get("teacher_sha256") != teacher_sha:
            problems.append("it was distilled from another teacher")
        if problems:
            self.log(f"not reusing committed {path.name}: {'; '.join(problems)}; training it again")
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        self.log(f"reusing committed {path.name} (hash and config match)")
        return True

    def commit(self, name: str, compact_file: Path, args: Dict[str, Any], teacher_sha: Optional[str]) -> str:
        """Record ``compact_file`` (already at ``folder/name.pt``) in the index; returns its sha256."""
        digest = sha256(compact_file)
        index = self.index()
        index[name] = {"sha256": digest, "args": defining_args(args), "teacher_sha256": teacher_sha}
        write_json_atomic(self.index_path, index)
        return digest
