#!/usr/bin/env bash
# Make a Debian base image for docker/Dockerfile without any image registry: debootstrap a minimal
# Debian into a directory and `docker import` it. Idempotent: an image already in the engine is kept,
# and the root filesystem tarball is cached, so a fresh engine (new data root) imports it in seconds.
#   bash scripts/docker_base.sh                          # -> launcher-base:bookworm
#   bash scripts/docker_base.sh IMAGE [SUITE [MIRROR]]   # e.g. my-base:bookworm bookworm http://mirror/debian
# Then: docker build --build-arg BASE_IMAGE=launcher-base:bookworm -f docker/Dockerfile .
# Talks to the engine DOCKER_HOST names (default: the local socket). Without a cached tarball it needs
# root and debootstrap (apt-get installs debootstrap when missing and running as root).
set -euo pipefail
IMAGE=${1:-launcher-base:bookworm}
SUITE=${2:-bookworm}
MIRROR=${3:-${DEBIAN_MIRROR:-http://deb.debian.org/debian}}
CACHE="${LAUNCHER_CACHE:-$HOME/.cache/launcher}/docker"
TARBALL="$CACHE/rootfs-$SUITE-minbase.tar"
DOCKER=${DOCKER:-docker}
say() { echo "docker_base: $*"; }
die() { echo "docker_base: ERROR: $*" >&2; exit 1; }

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  say "$IMAGE already present"
  exit 0
fi
"$DOCKER" version >/dev/null || die "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset})"

make_rootfs() {
  [ "$(id -u)" = 0 ] || die "debootstrap needs root. HINT: sudo bash $0"
  if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is missing and there is no apt-get to install it"
    say "apt-get install debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
      || die "apt-get install debootstrap failed"
  fi
  # global, not local: the EXIT trap runs after this function has returned
  root=$(mktemp -d "${TMPDIR:-/tmp}/docker_base.XXXXXX")
  trap 'rm -rf "$root" "$root.log"' EXIT
  say "debootstrap --variant=minbase $SUITE from $MIRROR (about half a minute)"
  mkdir -p "$CACHE/debs"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; die "debootstrap $SUITE from $MIRROR failed"; }
  # like the official debian images: updates and security too (from Debian's own mirrors; another
  # mirror may not carry them), no package caches, and none of this machine's files (the engine gives
  # each container its own resolv.conf, hosts and hostname)
  if [ "$MIRROR" = http://deb.debian.org/debian ]; then
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE-updates" \
      http://deb.debian.org/debian-security "$SUITE-security" >"$root/etc/apt/sources.list"
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/log/*.log
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  # a temp name first: an interrupted run never leaves a truncated tarball behind as the cache
  tar --numeric-owner -C "$root" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
}

mkdir -p "$CACHE"
[ -s "$TARBALL" ] || make_rootfs
say "docker import $TARBALL as $IMAGE"
"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["bash"]' \
  "$TARBALL" "$IMAGE" >/dev/null
say "ok: $IMAGE"
