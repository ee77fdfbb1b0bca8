#!/usr/bin/env bash
# Prints the path of a usable Chromium for the browser tests: $COTS_CHROMIUM when set; else
# `chromium` on PATH; else Debian's chromium package, installed with apt-get (as root).
# Only the path goes to stdout; messages go to stderr.
set -euo pipefail

if [[ -n ${COTS_CHROMIUM:-} ]]; then
  found=$(command -v "$COTS_CHROMIUM" 2>/dev/null) || {
    echo "error: COTS_CHROMIUM=$COTS_CHROMIUM is not an executable." >&2
    exit 1
  }
  echo "$found"
  exit 0
fi
if found=$(command -v chromium 2>/dev/null); then
  echo "$found"
  exit 0
fi

advice="Install Chromium yourself and put chromium on PATH, or set COTS_CHROMIUM=/path/to/chromium."
if [[ $(id -u) -ne 0 ]]; then
  echo "error: no chromium on PATH, and installing Debian's chromium package needs root." >&2
  echo "$advice" >&2
  exit 1
fi
command -v apt-get >/dev/null 2>&1 || {
  echo "error: no chromium on PATH and no apt-get to install one (this needs a Debian or" >&2
  echo "Ubuntu machine). $advice" >&2
  exit 1
}

log=$(mktemp)
trap 'rm -f "$log"' EXIT
install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium 2>&1 |
    tee "$log" >&2
}
echo "installing Debian's chromium package (apt-get install chromium)" >&2
if ! install; then
  # A fresh image often has no package lists; that failure alone is worth an `apt-get update`.
  if ! grep -qE "Unable to locate package|has no installation candidate" "$log"; then
    echo "error: 'apt-get install chromium' failed (see above). $advice" >&2
    exit 1
  fi
  echo "no package lists for chromium: running apt-get update and trying again" >&2
  if ! { apt-get update >&2 && install; }; then
    echo "error: 'apt-get install chromium' failed (see above). $advice" >&2
    exit 1
  fi
fi

found=$(command -v chromium 2>/dev/null) || {
  echo "error: the chromium package installed no chromium on PATH. $advice" >&2
  exit 1
}
echo "installed: $("$found" --version 2>/dev/null || echo chromium)" >&2
echo "$found"
