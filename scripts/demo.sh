#!/usr/bin/env bash
# The main job: installs what the demo needs into .venv, then runs `cots demo` on the embedded
# synthetic corpus. Extra arguments go to `cots demo` (see `.venv/bin/cots demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh "serving,training"
exec .venv/bin/cots demo "$@"
