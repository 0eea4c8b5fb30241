"""Safe file handling shared by every ERDE tool (no third-party imports).

- Reads: only regular files (a FIFO or a device would hang or never end), at
  most a stated number of bytes, and, for model files, only inside their
  folder (a symlink may not lead out of it).
- Writes: to a temporary file beside the target, then renamed into place, so a
  crash never leaves a half-written file.
- Folders: built, and replaced only where erde wrote them, by ``erde.runtime.common.ownership``.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ErdeError

PathLike = Union[str, "os.PathLike[str]"]

MiB = 1 << 20
MAX_MANIFEST_BYTES = 4 * MiB
MAX_GRAPH_BYTES = 1024 * MiB
MAX_IMAGE_BYTES = 256 * MiB
MAX_JSON_DEPTH = 64

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

class UnsafePathError(ErdeError):
    """A path is not a regular file, leaves its folder, is too large, or may not be replaced."""


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: PathLike, max_bytes: int, inside: Optional[PathLike] = None, what: str = "file") -> int:
    """Raise UnsafePathError unless ``path`` is a regular file of at most ``max_bytes`` (inside ``inside``).

    Returns the size in bytes. Symlinks are followed, but with ``inside`` the
    file they lead to must lie in that folder.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UnsafePathError(f"{path}: no such file") from None
    except OSError as e:
        raise UnsafePathError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path}: is {_describe(st.st_mode)}, not a regular {what}")
    if inside is not None:
        root = Path(inside).resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise UnsafePathError(f"{path}: a link that leads out of {inside} (to {real}); "
                                  "model files must be regular files inside the model folder")
    if st.st_size > max_bytes:
        raise UnsafePathError(f"{path}: {st.st_size:,} bytes, more than the {max_bytes:,}-byte limit for a {what}")
    return st.st_size


def read_capped(path: PathLike, max_bytes: int, inside: Optional[PathLike] = None, what: str = "file") -> bytes:
    """The bytes of a regular file, refusing FIFOs, devices, links out of ``inside`` and oversize files."""
    check_regular(path, max_bytes, inside, what)
    try:  # O_NONBLOCK: if the file was swapped for a FIFO after the check, open does not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UnsafePathError(f"{path}: cannot read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UnsafePathError(f"{path}: not a regular {what}")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafePathError(f"{path}: more than the {max_bytes:,}-byte limit for a {what}")
    return data


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether brackets nest at most ``limit`` deep (checked before json.loads, which recurses)."""
    depth = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_str = False
            continue
        if ch == '"':
            in_str, escaped = True, False
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


# ---- atomic writes --------------------------------------------------------------------------------


def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
    """Write text (UTF-8) or bytes to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: PathLike, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")
