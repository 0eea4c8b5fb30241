"""python -m erde.training: the erde-train command."""

import sys

from .cli import entry

sys.exit(entry())
