#!/usr/bin/env bash
# Makes sure the base images the Dockerfile and docker-compose.yml name exist for podman, so the
# container tests run on a machine that reaches no container registry (the package registries,
# PyPI and Debian's apt, are enough).
#
#   scripts/base-images.sh [IMAGE ...]   # default: python:3.11-slim redis:7 debian:bookworm-slim
#
# For each image: present already -> nothing; else `podman pull`; when the pull fails, a local
# stand-in is built from Debian packages and tagged under the image's Docker Hub name, so an
# unchanged `FROM python:3.11-slim` or `image: redis:7` resolves to it:
#   - a Debian bookworm root made with debootstrap (minbase), imported as localhost/debian-base;
#   - python:* -> that plus Debian's python3 (3.11), pip and venv (like the slim image, no
#     compiler); redis:* -> that plus Debian's redis-server; anything else -> the base itself.
# Stand-ins trust the CA certificates in /usr/local/share/ca-certificates, so pip inside a build
# reaches the package index the way the host does. Building them needs root (apt-get install
# debootstrap) and takes a few minutes once; later runs find them.
#
# Podman on small VMs also needs two settings the test suite cannot pass itself: runc (crun
# refuses hybrid cgroups) and ulimits below the default (no CAP_SYS_RESOURCE). When
# /etc/containers/containers.conf does not exist, this script writes one with them.
# Messages go to stderr; exit status 1 when an image can be neither pulled nor built.
set -euo pipefail

SUITE=bookworm
BASE=${COTS_DEBIAN_BASE:-localhost/debian-base:$SUITE}  # overridable to test a fresh build
WORK=${COTS_BASE_IMAGES_DIR:-/var/tmp/cots-base-images}
log() { printf 'base-images: %s\n' "$*" >&2; }

full_name() { # python:3.11-slim -> docker.io/library/python:3.11-slim
  local name=$1
  [[ $name == *:* ]] || name=$name:latest
  case $name in
    */*/*) echo "$name" ;;
    */*) echo "docker.io/$name" ;;
    *) echo "docker.io/library/$name" ;;
  esac
}

configure_podman() {
  [[ -e /etc/containers/containers.conf || $(id -u) -ne 0 ]] && return 0
  mkdir -p /etc/containers
  cat >/etc/containers/containers.conf <<'EOF'
# Written by scripts/base-images.sh (COTS Search): runc copes with hybrid cgroups, which crun
# refuses; the default ulimits fail without CAP_SYS_RESOURCE.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
  log "wrote /etc/containers/containers.conf (runc, lower ulimits)"
}

need_tools() {
  local missing=()
  for tool in debootstrap runc iptables; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || {
    log "building local base images needs ${missing[*]}: install them (root, apt-get)"
    return 1
  }
  log "installing ${missing[*]} (apt-get)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; }; } >&2
}

mirror() {
  local sources=/etc/apt/sources.list.d/debian.sources
  if [[ -f $sources ]]; then sed -n 's/^URIs: *//p' "$sources" | head -n1; else echo http://deb.debian.org/debian; fi
}

build_base() {
  podman image exists "$BASE" && return 0
  local root=$WORK/rootfs
  log "debootstrap $SUITE into $root (a minute or two)"
  rm -rf "$root"
  mkdir -p "$WORK"
  debootstrap --variant=minbase "$SUITE" "$root" "$(mirror)" >"$WORK/debootstrap.log" 2>&1 ||
    { log "debootstrap failed: see $WORK/debootstrap.log"; return 1; }
  # The host's apt sources and settings (a mirror or proxy it needs) go into the image too.
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    rm -f "$root/etc/apt/sources.list"
    cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/"
  fi
  cp /etc/apt/apt.conf.d/99* "$root/etc/apt/apt.conf.d/" 2>/dev/null || true
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  mkdir -p "$root/var/lib/apt/lists/partial"
  tar -C "$root" -c . | podman import --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$root"
}

build_standin() { # IMAGE TAG
  local image=$1 tag=$2 context
  context=$(mktemp -d)
  mkdir -p "$context/ca"
  cp /usr/local/share/ca-certificates/*.crt "$context/ca/" 2>/dev/null || true
  case $image in
    python:*)
      cat >"$context/Dockerfile" <<EOF
FROM $BASE
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      python3 python3-pip python3-venv ca-certificates \\
 && rm -rf /var/lib/apt/lists/* /usr/lib/python3.*/EXTERNALLY-MANAGED \\
 && ln -sf /usr/bin/python3 /usr/local/bin/python && ln -sf /usr/bin/pip3 /usr/local/bin/pip
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8
CMD ["python3"]
EOF
      ;;
    redis:*)
      cat >"$context/Dockerfile" <<EOF
FROM $BASE
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/*
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]
EOF
      ;;
    *) printf 'FROM %s\nCOPY ca/ /usr/local/share/ca-certificates/\n' "$BASE" >"$context/Dockerfile" ;;
  esac
  log "building a local stand-in for $image as $tag"
  podman build -q -t "$tag" "$context" >/dev/null
  rm -rf "$context"
}

main() {
  command -v podman >/dev/null || { log "podman is not installed (scripts/containers.sh installs it)"; return 1; }
  configure_podman
  local images=("$@") built=0
  ((${#images[@]})) || images=(python:3.11-slim redis:7 debian:bookworm-slim)
  for image in "${images[@]}"; do
    local tag
    tag=$(full_name "$image")
    podman image exists "$tag" && continue
    if podman pull -q "$tag" >/dev/null 2>&1; then
      log "pulled $tag"
      continue
    fi
    if ((built == 0)); then
      log "cannot pull $tag (no registry?): building local stand-ins from Debian packages"
      need_tools && build_base || return 1
      built=1
    fi
    build_standin "$image" "$tag" || { log "could not build a stand-in for $image"; return 1; }
  done
}

main "$@"
