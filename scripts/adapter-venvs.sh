#!/usr/bin/env bash
# The virtualenvs of the framework adapters whose frameworks cannot share the main one: Harbor
# (Python >= 3.12) and verifiers (pins of its own). Each script says why it made nothing, if so.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/harbor-venv.sh
scripts/verifiers-venv.sh
