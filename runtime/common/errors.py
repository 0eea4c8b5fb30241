"""Error types shared by every part of erde (training, export, runtime).

Library code raises these; each command-line tool turns them into one
``Error: ...`` line and a non-zero exit code. This module imports nothing, so
training, export and runtime may all depend on it.
"""

from __future__ import annotations

#: Exit codes of every erde command (docs/reference.md is tested against these).
EXIT_OK = 0  # success
EXIT_FAILED = 1  # some inputs failed and the others ran, a target was not met, or an unexpected internal error
EXIT_USAGE = 2  # bad input: option, file, folder, checkpoint or model; nothing was written
EXIT_MISMATCH = 3  # this machine's answers differ from the model folder's self-test; nothing ran
EXIT_INTERRUPTED = 130  # Ctrl-C


class ErdeError(Exception):
    """Base class: a problem the user can fix (bad input, bad file, bad option)."""

    exit_code = EXIT_USAGE


class ManifestError(ErdeError):
    """A model folder's manifest is missing, malformed or of another version."""


class ModelFolderError(ErdeError):
    """A model folder does not match its manifest (missing, altered or extra files)."""


class ImageError(ErdeError):
    """An input image is missing, unreadable, truncated or too large."""
