"""Which folders and files erde wrote, and the one rule for replacing them (no third-party imports).

Every folder an erde tool writes (a model folder, an int8 copy, a benchmark
record) holds ``.erde-owner.json``: the tool that made it and the sha256 of
every file it wrote. A tool that later adds to the folder (a calibration, a
latency profile) records its files there too.

The rule, for every tool:
- a folder is replaced (``--force``) only when it is empty, or when its record
  names one of the tools whose folders this tool may replace and *every* entry
  in it is a file the record lists, unchanged. A user's file, a changed file, a
  sub-folder or a stray ``manifest.json`` without a matching record: refused,
  naming what erde did not write;
- a file in an existing folder is overwritten only when it is absent, recorded
  unchanged, or (for folders of older erde versions) passes the caller's check
  that it is the file erde writes there (``may_update``).

Folders are built in a temporary sibling ``.NAME.erde-tmp-PID.TOKEN`` and
swapped into place, so a crash leaves the old folder or the new one, never a
mix. Each temporary folder is also registered in the per-user folder
(``$ERDE_CACHE/pending``); every run of a tool that builds folders removes the
temporary folders of processes that no longer run, wherever they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .files import PathLike, UnsafePathError, write_json_atomic

OWNER_NAME = ".erde-owner.json"
OWNER_FORMAT = "erde-owner"
TMP_TAG = ".erde-tmp-"
MODEL_TOOLS = ("erde-export", "erde-quantize", "erde-calibrate")  # tools whose folders are model folders
BENCH_TOOLS = ("erde-bench", "erde-record")  # benchmark folders; erde-record: a record a maintenance script wrote


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- the record ---------------------------------------------------------------------------------


def read_record(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The folder's ownership record ({"tool", "files": {name: sha256}}), or None if absent or unreadable."""
    path = Path(folder) / OWNER_NAME
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > (1 << 20):
            return None
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(d, dict) and d.get("format") == OWNER_FORMAT and isinstance(d.get("tool"), str)
          and isinstance(d.get("files"), dict) and all(isinstance(v, str) for v in d["files"].values()))
    return d if ok else None


def record_files(folder: PathLike, tool: str, names: Iterable[str]) -> None:
    """Record ``names`` (files in ``folder``) as written by erde; the folder's creator stays as it was."""
    folder = Path(folder)
    record = read_record(folder) or {"format": OWNER_FORMAT, "version": 1, "tool": tool, "files": {}}
    for name in names:
        record["files"][name] = sha256_file(folder / name)
    write_json_atomic(folder / OWNER_NAME, record)


def _leftover_write(name: str, listed: Dict[str, str]) -> bool:
    """``.NAME.XXXX.tmp``: what an interrupted atomic write of a listed file leaves (files.write_atomic)."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in listed)


def foreign_entries(folder: Path, record: Dict[str, Any]) -> List[str]:
    """Entries of ``folder`` that erde did not write, or that changed since it wrote them."""
    listed = record["files"]
    foreign = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if name == OWNER_NAME or (_leftover_write(name, listed) and p.is_file() and not p.is_symlink()):
            continue
        if name not in listed or p.is_symlink() or not p.is_file():
            foreign.append(name)
        elif sha256_file(p) != listed[name]:
            foreign.append(f"{name} (changed since erde wrote it)")
    return foreign


def may_update(folder: PathLike, name: str, is_erde_file: Callable[[Path], bool] = lambda p: False) -> bool:
    """Whether a tool may overwrite ``folder/name``: absent, recorded unchanged, or ``is_erde_file`` says so."""
    path = Path(folder) / name
    if not path.exists() and not path.is_symlink():
        return True
    if path.is_symlink() or not path.is_file():
        return False
    record = read_record(folder)
    if record is not None and record["files"].get(name) == sha256_file(path):
        return True
    return is_erde_file(path)


# ---- replacing a folder -------------------------------------------------------------------------


def check_replaceable(out: PathLike, force: bool, tool: str, replaces: Sequence[str],
                      protect: Iterable[PathLike] = ()) -> Path:
    """Check that ``out`` may be written by ``tool``; return it resolved.

    It may be absent; with ``force`` it may be an empty folder or one that a tool of ``replaces`` wrote,
    unchanged and with nothing added. It may never be, or contain, a path of ``protect`` or the current folder.
    """
    given = Path(out)
    if str(out) in ("", ".", "..") or given.name in ("", ".", ".."):
        raise UnsafePathError(f"{out or repr(out)}: not a folder name; pass a new folder, e.g. --out model_onnx")
    out = given.resolve()
    for p in list(protect) + [Path.cwd()]:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise UnsafePathError(f"{given}: holds {p}, which {tool} must not replace; choose another output folder")
    if given.is_symlink() or (out.exists() and not out.is_dir()):
        raise UnsafePathError(f"{given}: exists and is not a folder; choose another output path")
    if not out.exists():
        if not out.parent.is_dir():
            raise UnsafePathError(f"{out.parent}: the output folder's parent does not exist; create it first")
        return out
    if not force:
        raise UnsafePathError(f"{given}: already exists; pass --force to replace it (only if erde wrote it)")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UnsafePathError(f"{given}: cannot list ({e.strerror or e})") from None
    if empty:
        return out
    record = read_record(out)
    if record is None:
        raise UnsafePathError(f"{given}: not written by erde (no {OWNER_NAME}); --force replaces only a folder "
                              "erde wrote: choose a new folder, or empty this one yourself")
    if record["tool"] not in replaces:
        raise UnsafePathError(f"{given}: written by {record['tool']}, not a folder {tool} writes; choose another folder")
    foreign = foreign_entries(out, record)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UnsafePathError(f"{given}: holds {shown}, which erde did not write; --force replaces only what erde "
                              "wrote: move those out, or choose a new folder")
    return out


def build_folder(out: PathLike, force: bool, tool: str, replaces: Sequence[str], build: Callable[[Path], Any],
                 protect: Iterable[PathLike] = ()) -> Any:
    """Check ``out``, call ``build(tmp)`` in a temporary sibling, record its files, swap it into place.

    Returns build's value. On any failure nothing is left behind and an existing ``out`` is untouched.
    """
    out = check_replaceable(out, force, tool, replaces, protect)
    tmp = new_temp_dir(out)
    try:
        result = build(tmp)
        record_files(tmp, tool, sorted(p.name for p in tmp.iterdir() if p.name != OWNER_NAME))
        swap_into_place(tmp, out)
    finally:
        _remove_temp(tmp)
    return result


# ---- temporary folders --------------------------------------------------------------------------


def _pending_dir() -> Path:
    from .datasets import cache_dir

    return cache_dir() / "pending"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _register(path: Path) -> None:
    """Note ``path`` in the per-user folder, so any later run can remove it if this process dies."""
    try:
        pending = _pending_dir()
        pending.mkdir(parents=True, exist_ok=True)
        (pending / f"{os.getpid()}.{secrets.token_hex(6)}").write_bytes(os.fsencode(str(path.resolve())))
    except OSError:
        pass  # no per-user folder: the sibling clean-up of the next run to the same folder still applies


def _remove_temp(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_temps(out: Optional[Path] = None) -> None:
    """Remove temporary folders of erde processes that no longer run: those registered per user, and the
    ``.OUT.erde-tmp-PID.*`` siblings of ``out``."""
    candidates: List[Path] = []
    try:
        entries = list(_pending_dir().iterdir())
    except OSError:
        entries = []
    for entry in entries:
        pid = entry.name.split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            candidates.append(Path(os.fsdecode(entry.read_bytes())))
        except OSError:
            pass
        entry.unlink(missing_ok=True)
    if out is not None:
        try:
            candidates += [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_TAG}")]
        except OSError:
            pass
    for p in candidates:
        tag = p.name.split(TMP_TAG, 1)
        pid = tag[1].split(".", 1)[0] if len(tag) == 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove_temp(p)


def new_temp_dir(out: Path) -> Path:
    """A fresh temporary sibling of ``out``, registered so that a later run can remove it if this one dies."""
    clean_stale_temps(out)
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}.{secrets.token_hex(4)}"
    _register(tmp)
    try:
        tmp.mkdir(mode=0o755)
    except OSError as e:
        raise UnsafePathError(f"{out.parent}: cannot write there ({e.strerror or e})") from None
    return tmp


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}{TMP_TAG}{os.getpid()}.{secrets.token_hex(4)}.old")
        _register(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        _remove_temp(old)


# ---- files added to an existing model folder ----------------------------------------------------

from .. import BUNDLED_MODELS as PACKAGE_MODELS  # noqa: E402 (the model folders shipped inside the package)


def in_installed_package(folder: PathLike) -> bool:
    """Whether ``folder`` is a model folder shipped inside the erde package, which no tool ever changes."""
    real = Path(folder).resolve()
    return real.parent == PACKAGE_MODELS and TMP_TAG not in real.name


def check_updatable(folder: PathLike, files: Dict[str, Callable[[Path], bool]], tool: str, elsewhere: str) -> None:
    """Raise UnsafePathError unless ``tool`` may write each of ``files`` (name -> "is it the file erde writes
    there?") into ``folder``: not the installed package, and each file absent, recorded or of erde's format.
    ``elsewhere`` says how to write the result somewhere else instead (e.g. "pass --out DIR")."""
    folder = Path(folder)
    if in_installed_package(folder):
        raise UnsafePathError(f"{folder}: a model folder inside the installed erde package, which {tool} never "
                              f"changes; {elsewhere}")
    for name, is_erde_file in files.items():
        if not may_update(folder, name, is_erde_file):
            raise UnsafePathError(f"{folder / name}: not written by erde, and {tool} does not replace what erde did "
                                  f"not write; move it away, or {elsewhere}")
    if not os.access(folder, os.W_OK):
        raise UnsafePathError(f"{folder}: read-only here; {elsewhere}")


def write_record(out: PathLike, files: Dict[str, str]) -> Path:
    """A record folder of the scripts (``benchmarks/results/NAME``): these files (name -> text), built and
    swapped in whole; an existing ``out`` is replaced only if ``erde-record`` (or ``erde-bench``) wrote it."""

    def build(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).write_text(text)

    build_folder(out, True, "erde-record", BENCH_TOOLS, build)
    return Path(out)
