#!/usr/bin/env bash
# Creates .venv with Python 3.11 (if missing) and installs this project into it, editable,
# with the extras given as the first argument (comma-separated, e.g. "serving,training,dev").
# Needs only Python 3.11 on the machine; works as root or as a normal user. Re-running it is
# cheap: the install is skipped when pyproject.toml and the extras have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
venv="${COTS_VENV:-.venv}"

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.11 python3 python; do
    [[ -n $candidate ]] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [[ ! -x $venv/bin/python ]]; then
  python=$(find_python) || {
    echo "error: Python 3.11 not found (tried \$PYTHON, python3.11, python3, python)." >&2
    echo "Install Python 3.11, or set PYTHON=/path/to/python3.11." >&2
    exit 1
  }
  echo "creating $venv with $($python --version)"
  "$python" -m venv "$venv" || {
    echo "error: '$python -m venv' failed; on Debian/Ubuntu install the python3.11-venv package." >&2
    exit 1
  }
fi

stamp="$venv/.cots-install-stamp"
want="$(cat pyproject.toml; echo "extras=$extras")"
want_hash=$(printf '%s' "$want" | "$venv/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [[ -f $stamp && $(cat "$stamp") == "$want_hash" ]]; then
  exit 0
fi

echo "installing cots-search[${extras}] into $venv (the training extra pulls PyTorch, a few GB, once)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
echo "$want_hash" >"$stamp"
