"""The two runners hold copies of one contract: the options the server passes and the phrases that
say a command ran out of memory. The server's suites run against both runners, but a phrase or an
option only one of them knows would pass them unnoticed; here each Rust list is read from its source
and must be the Python runner's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from atropos.sandbox.runner import hibernate, main, rlimits

CRATE = Path(__file__).resolve().parent.parent / "runner" / "src"


def rust_list(file: str, name: str) -> list[str]:
    """The string literals (and `module::CONSTANT`s, resolved) of `const NAME: [&str; N] = [...]`."""
    text = (CRATE / file).read_text(encoding="utf-8")
    found = re.search(rf"const {name}: \[&str; (\d+)\] = \[(.*?)\];", text, re.S)
    assert found is not None, f"no const {name} in runner/src/{file}"
    items = []
    for item in (part.strip() for part in found.group(2).split(",")):
        if item.startswith('"'):
            items.append(item.strip('"'))
        elif item:
            module, _, constant = item.partition("::")
            items.append(rust_const(f"{module}.rs", constant))
    assert len(items) == int(found.group(1)), (name, items)
    return items


def rust_const(file: str, name: str) -> str:
    found = re.search(rf'pub const {name}: &str = "([^"]*)";', (CRATE / file).read_text(encoding="utf-8"))
    assert found is not None, f"no const {name} in runner/src/{file}"
    return found.group(1)


@pytest.mark.parametrize(
    ("file", "name", "python"),
    [
        ("main.rs", "VALUE_OPTIONS", main.VALUE_OPTIONS),
        ("main.rs", "FLAGS", main.FLAGS),
        ("limits.rs", "NO_MEMORY", rlimits.NO_MEMORY),
    ],
)
def test_each_list_of_the_compiled_runner_is_the_python_runners(file: str, name: str, python: tuple[str, ...]) -> None:
    assert rust_list(file, name) == list(python)


def test_the_resume_flag_is_one() -> None:
    assert rust_const("hibernate.rs", "RESUME_FLAG") == hibernate.RESUME_FLAG
