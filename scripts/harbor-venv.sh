#!/usr/bin/env bash
# Make .venv-harbor: Harbor (Python >= 3.12) and this project with its `harbor` extra, for the Harbor
# adapter's tests (tests/test_integration_harbor.py finds it there). The Python is $PYTHON312, else
# python3.12 on PATH or under pyenv, else 3.13 the same way. Without one it says so and
# stops: the tests then skip with that reason (CI requires them: ATROPOS_REQUIRE_HARBOR=1).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON312:-}"
pyenv="${PYENV_ROOT:-$HOME/.pyenv}/versions"
for candidate in "$(command -v python3.12 || true)" "$(ls -d "$pyenv"/3.12*/bin/python3 2>/dev/null | sort -V | tail -n 1)" \
    "$(command -v python3.13 || true)" "$(ls -d "$pyenv"/3.13*/bin/python3 2>/dev/null | sort -V | tail -n 1)"; do
    if [ -z "$python" ] && [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        python="$candidate"
    fi
done
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    echo "harbor-venv: no Python >= 3.12 found (set PYTHON312): the Harbor adapter's tests will be skipped" >&2
    exit 0
fi
"$python" -m venv .venv-harbor
.venv-harbor/bin/python -m pip install --quiet --upgrade pip
.venv-harbor/bin/python -m pip install --quiet -e '.[harbor]'
echo "harbor-venv: .venv-harbor ($("$python" --version), $(.venv-harbor/bin/harbor --version 2>/dev/null || echo harbor))" >&2
