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
# a block may say what it prints, line by line: `<!-- runnable ...; it prints: A | B -->`
_BLOCK = re.compile(r"<!-- runnable([^>]*)-->\n```(\w+)\n(.*?)\n```", re.DOTALL)


def runnable_blocks() -> list[tuple[str, str, list[str]]]:
    blocks = []
    for m in _BLOCK.finditer((REPO / "README.md").read_text()):
        _, _, prints = m.group(1).partition("it prints:")
        blocks.append((m.group(2), m.group(3), [p.strip() for p in prints.split("|") if p.strip()]))
    return blocks


def test_the_readme_marks_its_runnable_examples() -> None:
    assert sorted(lang for lang, _, _ in runnable_blocks()) == ["bash", "python", "python"]


@pytest.mark.parametrize(
    ("lang", "code", "prints"), runnable_blocks(), ids=lambda v: v if v in ("bash", "python") else ""
)
def test_a_runnable_readme_example_runs(lang: str, code: str, prints: list[str], tmp_path: Path) -> None:
    venv_bin = os.path.dirname(sys.executable)
    if lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code.replace(".venv/bin/", venv_bin + "/")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    if prints:
        # whole lines, in this order: lines that interleave (threads printing at once) fail
        assert [line for line in done.stdout.splitlines() if line in prints] == prints, done.stdout
    elif lang == "python":
        assert "2 True" in done.stdout and "1 bash call(s)" in done.stdout, done.stdout
    else:
        assert '"status":"ok"' in done.stdout.replace(" ", "") and "hi\\n" in done.stdout, done.stdout
