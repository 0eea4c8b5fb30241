"""README.md: a first page (at most 150 lines) whose Python example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_is_a_first_page():
    assert len(README.splitlines()) <= 150
    for section in ("## Two commands", "## Results", "## Python API", "## The pipeline"):
        assert section in README


def test_the_python_example_runs(tmp_path):
    code = re.search(r"## Python API\s+```python\n(.*?)```", README, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"ERDE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("passed on ") and re.match(r"ship \d\.\d+ exit [123] \d+\.\d\d ms", lines[1]), r.stdout
