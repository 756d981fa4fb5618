"""The slot runner runs as `python -S -I` inside the sandbox: it may load the standard library, its
own package and the standard-library-only ground modules (`atropos.host`, `atropos.units`), nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

from atropos.sandbox.server.isolation import runner_command

RUNNER_PACKAGES = ("atropos.sandbox.runner", "atropos.host")
RUNNER_MODULES = ("__main__", "atropos", "atropos.sandbox", "atropos.units", *RUNNER_PACKAGES)
_ENTRY = "sys.exit(main())"


def loaded_by_the_runner() -> list[str]:
    """Every module the runner's own command line has loaded when its main() would start."""
    argv = runner_command("/work", 1024, 1024)
    bootstrap = argv[argv.index("-c") + 1]
    assert bootstrap.endswith(_ENTRY), bootstrap
    probe = bootstrap.removesuffix(_ENTRY) + "import json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([*argv[: argv.index("-c")], "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def outside_the_rule(modules: list[str]) -> list[str]:
    stdlib = set(sys.stdlib_module_names)
    return [
        m
        for m in modules
        if m.split(".")[0] not in stdlib
        and m not in RUNNER_MODULES
        and not m.startswith(tuple(p + "." for p in RUNNER_PACKAGES))
    ]


def test_the_runner_loads_only_the_standard_library_and_itself() -> None:
    loaded = loaded_by_the_runner()
    assert "atropos.sandbox.runner.main" in loaded and "atropos.host.procs" in loaded
    assert outside_the_rule(loaded) == []


def test_the_check_catches_what_the_rule_forbids() -> None:
    # what the runner would load if it imported the server's wire models (pydantic) or the server
    assert outside_the_rule(["atropos.sandbox.runner.main", "pydantic", "json"]) == ["pydantic"]
    assert outside_the_rule(["atropos.sandbox.models", "atropos.sandbox.server.app"]) == [
        "atropos.sandbox.models",
        "atropos.sandbox.server.app",
    ]


def test_the_runner_command_keeps_site_packages_out() -> None:
    argv = runner_command("/work", 1024, 1024)
    assert argv[1:3] == ["-S", "-I"]
