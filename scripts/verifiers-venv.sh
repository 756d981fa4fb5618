#!/usr/bin/env bash
# Make .venv-verifiers: verifiers (Prime Intellect's environments) and this project with its
# `verifiers` extra, for the verifiers adapter's tests (tests/test_integration_verifiers.py finds it
# there). A virtualenv of its own: verifiers pins versions (openai, mcp, transformers) the main
# one does not need. Also fetches, while the registry is reachable, the wheels verifiers' agent
# program needs inside a slot (uv and its chat program's packages) into .cache/slot-wheels, so
# that the test's task image holds them and no test sends a byte to the internet.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${ATROPOS_VERIFIERS_PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "verifiers-venv: $python is not Python >= 3.11 (set ATROPOS_VERIFIERS_PYTHON): the verifiers adapter's tests will be skipped" >&2
    exit 0
fi
[ -x .venv-verifiers/bin/python ] || "$python" -m venv .venv-verifiers
.venv-verifiers/bin/python -m pip install --quiet --upgrade pip
.venv-verifiers/bin/python -m pip install --quiet -e '.[verifiers]'
# the packages of verifiers' chat program (verifiers.v1.harnesses.utils.launch.CHAT_PROGRAM), and uv
.venv-verifiers/bin/python - <<'PY' > .cache-slot-requirements.txt
import re
from verifiers.v1.harnesses.utils.launch import CHAT_PROGRAM
print("uv")
print("\n".join(re.findall(r'"([^"]+)"', CHAT_PROGRAM.split("dependencies =", 1)[1].splitlines()[0])))
PY
mkdir -p .cache/slot-wheels
.venv-verifiers/bin/python -m pip download --quiet --only-binary=:all: -d .cache/slot-wheels -r .cache-slot-requirements.txt
rm -f .cache-slot-requirements.txt
# verifiers' own test fixtures (its sdist's tests/v1/fixtures: small tasksets, one with an MCP toolset),
# which the adapter's test runs through our slots
version="$(.venv-verifiers/bin/python -c 'import verifiers; print(verifiers.__version__)')"
rm -rf .cache/verifiers-sdist .cache/verifiers-fixtures && mkdir -p .cache/verifiers-sdist .cache/verifiers-fixtures
.venv-verifiers/bin/python -m pip download --quiet --no-deps --no-binary=:all: -d .cache/verifiers-sdist "verifiers==$version"
tar -xzf ".cache/verifiers-sdist/verifiers-$version.tar.gz" -C .cache/verifiers-fixtures --strip-components=4 \
    "verifiers-$version/tests/v1/fixtures"
echo "verifiers-venv: .venv-verifiers ($("$python" --version), verifiers $(.venv-verifiers/bin/python -c 'import verifiers; print(verifiers.__version__)')), $(ls .cache/slot-wheels | wc -l) wheels for slots" >&2
