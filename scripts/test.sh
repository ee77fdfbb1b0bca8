#!/usr/bin/env bash
# The test command: installs everything the tests need into .venv, then runs the whole suite
# (slow tests included). Extra arguments go to pytest, e.g. `./scripts/test.sh -k synth`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh "serving,training,dev"
exec .venv/bin/python -m pytest "$@"
