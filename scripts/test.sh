#!/usr/bin/env bash
# The test command: installs everything the tests need into .venv, then runs the whole suite
# (slow tests included). Extra arguments go to pytest, e.g. `./scripts/test.sh -k synth`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh "serving,training,distributed,dev"
# The integration tests run a real Redis; scripts/redis.sh finds or installs one (no root).
COTS_REDIS_SERVER="${COTS_REDIS_SERVER:-$(scripts/redis.sh)}"
export COTS_REDIS_SERVER
exec .venv/bin/python -m pytest "$@"
