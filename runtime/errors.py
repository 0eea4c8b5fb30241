"""Error types shared by every ERDE stage.

Library code raises these; each command-line tool turns them into one
``Error: ...`` line and a non-zero exit code. This module imports nothing, so
training, export and runtime may all depend on it.
"""

from __future__ import annotations


class ErdeError(Exception):
    """Base class: a problem the user can fix (bad input, bad file, bad option)."""


class ManifestError(ErdeError):
    """A model folder's manifest is missing, malformed or of another version."""


class ModelFolderError(ErdeError):
    """A model folder does not match its manifest (missing, altered or extra files)."""


class ImageError(ErdeError):
    """An input image is missing, unreadable, truncated or too large."""
