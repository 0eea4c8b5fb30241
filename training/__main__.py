"""python -m erde.training: the erde-train command."""

from .cli import main

main()
