#!/usr/bin/env bash
# Build and install horovod 0.28.1 with PyTorch + Gloo + MPI support into the current Python
# environment, reproducibly and idempotently.
#   bash scripts/install_horovod.sh             # PYTHON=/path/to/python to pick the interpreter
#
# Why a patch: horovod 0.28.1 (the newest release) asks CMake for C++14, and torch >= 2.1's headers
# need C++17, so `pip install horovod` fails to compile. We fetch the sdist, change
# `set(CMAKE_CXX_STANDARD 14)` to 17 in CMakeLists.txt and horovod/torch/CMakeLists.txt, build a wheel
# and cache it under ${LAUNCHER_CACHE:-~/.cache/launcher}/wheels/torch<version>-cp<XY>/, so the next
# install (same torch, same Python) takes seconds and a wheel built against another torch is never
# reused. Needs Debian's libopenmpi-dev, openmpi-bin, cmake and g++ (apt-get installs them when
# missing and running as root). The result is checked with `horovodrun --check-build`.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=0.28.1
say() { echo "install_horovod: $*"; }
die() { echo "install_horovod: ERROR: $*" >&2; exit 1; }
export PIP_ROOT_USER_ACTION=${PIP_ROOT_USER_ACTION:-ignore}  # quiet pip's "running as root" warning

# 1. already there (and loadable against the installed torch): nothing to do
if "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "horovod $("$PY" -c 'import horovod; print(horovod.__version__)') with PyTorch support already installed"
  exit 0
fi

"$PY" -c "import torch" 2>/dev/null || die "torch is not importable by $PY; install torch first (bash scripts/setup.sh)"
key=$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}")')
cache="${LAUNCHER_CACHE:-$HOME/.cache/launcher}/wheels/$key"
wheel=$(ls "$cache"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)

# System tools: "command:debian-package". The MPI runtime is needed by any MPI-enabled horovod
# (it links libmpi); the rest only to build.
need_tools() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } \
      || die "apt-get install ${missing[*]} failed"
  else
    die "missing ${missing[*]}. HINT: (as root) apt-get install ${missing[*]}"
  fi
}

if [ -z "$wheel" ]; then
  need_tools mpirun:openmpi-bin mpicxx:libopenmpi-dev cmake:cmake g++:g++
  # --no-build-isolation builds with this environment's setuptools; >= 70.1 has bdist_wheel built in
  "$PY" -m pip install -q "setuptools>=70.1"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  say "downloading the horovod $VERSION sdist"
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "horovod==$VERSION"
  tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
  src="$work/horovod-$VERSION"
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "C++17 patch: no 'set(CMAKE_CXX_STANDARD 14)' in $f"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    ! grep -q 'CMAKE_CXX_STANDARD 14' "$f" || die "C++17 patch did not apply to $f"
  done
  say "patched CMAKE_CXX_STANDARD 14 -> 17"
  # horovod's setup.py runs make with -j8 unless MAKEFLAGS is set (MAX_JOBS is not read)
  jobs=$(nproc 2>/dev/null || echo 2)
  log="$work/build.log"
  say "building a wheel against $key with -j$jobs (a few minutes on 2 cores; log: $log)"
  start=$SECONDS
  # build into the temp dir and move it in, so a concurrent run never sees a half-written wheel
  if ! HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
       HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="${MAKEFLAGS:--j$jobs}" \
       "$PY" -m pip wheel -v --use-pep517 --no-build-isolation --no-deps -w "$work/dist" "$src" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    trap - EXIT
    die "wheel build failed; full log kept in $log"
  fi
  built=$(ls "$work"/dist/horovod-"$VERSION"-*.whl | head -n1)
  mkdir -p "$cache"
  mv "$built" "$cache/"
  wheel="$cache/$(basename "$built")"
  say "built $wheel in $((SECONDS - start))s"
else
  need_tools mpirun:openmpi-bin
  say "using the cached wheel $wheel"
fi

# a horovod of the same version that does not load (e.g. built against another torch) would make
# pip skip the wheel as "already installed"
if "$PY" -m pip show -q horovod >/dev/null 2>&1; then
  say "removing the installed horovod that does not load with this torch"
  "$PY" -m pip uninstall -q -y horovod
fi
say "pip install $(basename "$wheel") (+ its runtime deps)"
"$PY" -m pip install -q "$wheel"

"$PY" -c "import horovod.torch" || die "horovod.torch does not import after installing $wheel"
horovodrun="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/horovodrun"
[ -x "$horovodrun" ] || horovodrun=horovodrun
report=$("$horovodrun" --check-build)
for part in PyTorch Gloo MPI; do
  grep -q "\[X\] $part" <<<"$report" || { echo "$report" >&2; die "horovod was built without $part"; }
done
say "ok: horovod $VERSION with PyTorch, Gloo and MPI ($horovodrun --check-build)"
