#!/usr/bin/env bash
# Prints the compose command the container tests (tests/test_container_stack.py) should run:
# $COTS_COMPOSE when set; else `docker compose` when Docker with its compose plugin and a running
# engine is here; else podman with podman-compose, installing them when missing: Debian's podman
# (and runc) with apt-get (as root, as scripts/chromium.sh does for the browser) and
# podman-compose from PyPI into the venv (Debian's 1.0.3 predates the `--scale` handling the
# test uses). Only the command goes to stdout; messages go to stderr.
#
# Base images (python:3.11-slim, redis:7, debian:bookworm-slim): Docker pulls them as usual; with
# podman, scripts/test.sh runs scripts/base-images.sh, which pulls them or, with no registry,
# builds local stand-ins from Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${COTS_VENV:-.venv}"
[[ $venv == /* ]] || venv="$(pwd)/$venv"
# The version the container test was last run with (the sandbox CI uses installs the newest).
podman_compose_version="1.6.0"

if [[ -n ${COTS_COMPOSE:-} ]]; then
  echo "$COTS_COMPOSE"
  exit 0
fi
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 &&
  docker info >/dev/null 2>&1; then
  echo "docker compose"
  exit 0
fi

advice="Install Docker with its compose plugin, or podman and podman-compose, yourself; or set
COTS_COMPOSE to a compose command; or leave the container tests out with -m 'not container'."

podman_works() { command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; }

if ! podman_works; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: no working Docker or podman, and installing Debian's podman needs root." >&2
    echo "$advice" >&2
    exit 1
  fi
  command -v apt-get >/dev/null 2>&1 || {
    echo "error: no working Docker or podman, and no apt-get to install podman (this needs a" >&2
    echo "Debian or Ubuntu machine). $advice" >&2
    exit 1
  }
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  # runc beside crun: crun refuses hosts with hybrid cgroups (some VMs), runc copes. Compose
  # services find each other by name only with a DNS plugin: aardvark-dns for netavark, dnsname
  # for CNI (Debian leaves both to Recommends).
  install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      podman runc netavark aardvark-dns golang-github-containernetworking-plugin-dnsname \
      uidmap slirp4netns fuse-overlayfs catatonit 2>&1 | tee "$log" >&2
  }
  echo "no Docker engine or podman here: installing Debian's podman (apt-get install podman)" >&2
  if ! install; then
    if ! grep -qE "Unable to locate package|has no installation candidate" "$log"; then
      echo "error: 'apt-get install podman' failed (see above). $advice" >&2
      exit 1
    fi
    echo "no package lists for podman: running apt-get update and trying again" >&2
    if ! { apt-get update >&2 && install; }; then
      echo "error: 'apt-get install podman' failed (see above). $advice" >&2
      exit 1
    fi
  fi
  podman_works || {
    echo "error: podman is installed but 'podman info' fails:" >&2
    podman info 2>&1 | tail -n 5 >&2 || true
    echo "$advice" >&2
    exit 1
  }
  echo "installed: $(podman --version)" >&2
fi

compose="$venv/bin/podman-compose"
if found=$(command -v podman-compose 2>/dev/null); then
  compose=$found
elif [[ ! -x $compose ]]; then
  echo "installing podman-compose $podman_compose_version into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "podman-compose==$podman_compose_version" >&2 || {
    echo "error: 'pip install podman-compose' failed (see above). $advice" >&2
    exit 1
  }
fi
echo "$compose"
