"""Every README block marked `<!-- runnable ... -->` runs as written (from a scratch directory, with
this interpreter's environment standing in for the checkout's `.venv`) and succeeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- runnable[^>]*-->\n```(\w+)\n(.*?)\n```", re.DOTALL)


def runnable_blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer((REPO / "README.md").read_text())]


def test_the_readme_marks_its_runnable_examples() -> None:
    assert sorted(lang for lang, _ in runnable_blocks()) == ["bash", "python"]


@pytest.mark.parametrize(("lang", "code"), runnable_blocks(), ids=lambda v: v if v in ("bash", "python") else "")
def test_a_runnable_readme_example_runs(lang: str, code: str, tmp_path: Path) -> None:
    venv_bin = os.path.dirname(sys.executable)
    if lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code.replace(".venv/bin/", venv_bin + "/")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    if lang == "python":
        assert "2 True" in done.stdout and "1 bash call(s)" in done.stdout, done.stdout
    else:
        assert '"status":"ok"' in done.stdout.replace(" ", "") and "hi\\n" in done.stdout, done.stdout
