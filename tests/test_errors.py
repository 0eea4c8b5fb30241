"""runtime/common/errors.py: the exit codes are defined once, and the reference's table says the same."""

import re
from pathlib import Path

from erde.runtime.common import errors
from erde.runtime.core.selftest import MismatchError


def test_the_reference_lists_exactly_the_exit_codes_in_code():
    text = (Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()
    table = text[text.index("## Errors and exit codes"):]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    defined = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert documented == defined


def test_error_types_carry_their_exit_code():
    assert errors.ErdeError("x").exit_code == errors.EXIT_USAGE == 2
    assert MismatchError("x").exit_code == errors.EXIT_MISMATCH == 3
