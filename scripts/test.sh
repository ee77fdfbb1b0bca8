#!/usr/bin/env bash
# The test command: installs everything the tests need into .venv, then runs the whole suite
# (slow tests included). Extra arguments go to pytest, e.g. `./scripts/test.sh -k synth`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh "serving,training,distributed,dev"
# clip-retrieval's real ClipClient for tests/test_clip_retrieval.py, without its dependencies
# (they pin numpy<2 and torch; the test loads clip_client.py alone, which needs only requests).
.venv/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("clip-retrieval") != "2.45.0")' 2>/dev/null || .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "clip-retrieval==2.45.0"
# The integration tests run a real Redis; scripts/redis.sh finds or installs one (no root).
COTS_REDIS_SERVER="${COTS_REDIS_SERVER:-$(scripts/redis.sh)}"
export COTS_REDIS_SERVER
# The browser tests drive a headless Chromium; scripts/chromium.sh finds or installs one.
COTS_CHROMIUM="${COTS_CHROMIUM:-$(scripts/chromium.sh)}"
export COTS_CHROMIUM
# The container tests build the images and run the compose stack; scripts/containers.sh finds
# Docker or podman, or installs podman. When it cannot, those tests fail saying why, the rest run.
preset_compose=${COTS_COMPOSE:-}
if compose=$(scripts/containers.sh); then
  export COTS_COMPOSE="$compose"
  # With podman (no Docker engine here), the base images the Dockerfile and compose file name
  # are pulled or, where no registry answers, built locally from Debian packages.
  if [[ -z $preset_compose && $compose != "docker compose" ]]; then
    scripts/base-images.sh ||
      echo "warning: base images missing (see above): the container tests will fail" >&2
  fi
else
  echo "warning: no container engine (see above): the container tests will fail" >&2
fi
exec .venv/bin/python -m pytest "$@"
