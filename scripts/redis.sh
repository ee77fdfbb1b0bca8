#!/usr/bin/env bash
# Prints the path of a usable redis-server, installing one without root if needed: the one on
# PATH; else $venv/redis/bin/redis-server from an earlier run; else Debian's redis-tools
# package (and its libraries) downloaded with `apt-get download` and unpacked with `dpkg -x`
# into $venv/redis/root. Only the path goes to stdout; messages go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${COTS_VENV:-.venv}"
[[ $venv == /* ]] || venv="$(pwd)/$venv"
home="$venv/redis"
wrapper="$home/bin/redis-server"

if found=$(command -v redis-server 2>/dev/null); then
  echo "$found"
  exit 0
fi
if [[ -x $wrapper ]] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"
  exit 0
fi

for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "error: no redis-server on PATH and no '$tool' to fetch one (this needs a Debian or" >&2
    echo "Ubuntu machine). Install Redis 7 yourself and put redis-server on PATH, or set" >&2
    echo "COTS_REDIS_SERVER=/path/to/redis-server." >&2
    exit 1
  }
done

# Debian ships the server in redis-tools (redis-server is a symlink package); the rest are
# its shared libraries, which a non-root user cannot install, so they are unpacked too.
packages=(redis-tools libjemalloc2 liblzf1 liblua5.1-0)
echo "installing a local redis-server into $home (apt-get download ${packages[*]})" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "${packages[@]}" >&2) || {
  echo "error: 'apt-get download ${packages[*]}' failed. If the package lists are missing," >&2
  echo "run 'apt-get update' as root (or install redis-server and put it on PATH)." >&2
  exit 1
}
rm -rf "$home/root"
mkdir -p "$home/root" "$home/bin"
for deb in "$work"/*.deb; do
  dpkg -x "$deb" "$home/root"
done
server="$home/root/usr/bin/redis-check-rdb"
[[ -x $server ]] || {
  echo "error: the redis-tools package has no usr/bin/redis-check-rdb; install Redis 7" >&2
  echo "yourself and put redis-server on PATH." >&2
  exit 1
}

# The libraries' folders, found rather than hard-coded so another architecture works too.
libs=$(find "$home/root" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
# Debian's redis-server is the redis-check-rdb binary: it picks its mode from argv[0]
# (bash, not sh, for `exec -a`).
cat >"$wrapper" <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec -a redis-server "$server" "\$@"
EOF
chmod +x "$wrapper"

version=$("$wrapper" --version) || {
  echo "error: the unpacked redis-server does not run ($wrapper --version failed)." >&2
  exit 1
}
echo "installed: $version" >&2
echo "$wrapper"
