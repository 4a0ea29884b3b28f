#!/usr/bin/env bash
# Build and install horovod 0.28.1 with PyTorch + Gloo + MPI support, reproducibly.
#
# Why a patch: horovod 0.28.1 (the newest release) asks CMake for C++14, and torch >= 2.1's headers
# need C++17, so `pip install horovod` fails to compile. We fetch the sdist, set
# CMAKE_CXX_STANDARD 17 in CMakeLists.txt and horovod/torch/CMakeLists.txt, build a wheel and cache
# it under ${LAUNCHER_CACHE:-~/.cache/launcher}/wheels/<torch version>-<python tag>/, so the next
# install (same torch, same Python) takes seconds. Needs Debian's libopenmpi-dev, openmpi-bin, cmake, g++.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=0.28.1
say() { echo "install_horovod: $*"; }

if "$PY" -c "import horovod.torch" 2>/dev/null; then
  say "horovod with PyTorch support already installed"
  exit 0
fi

key=$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}")')
cache="${LAUNCHER_CACHE:-$HOME/.cache/launcher}/wheels/$key"
mkdir -p "$cache"
wheel=$(ls "$cache"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)

if [ -z "$wheel" ]; then
  for tool in mpicc cmake g++; do
    command -v "$tool" >/dev/null || { echo "install_horovod: $tool missing. HINT: apt-get install libopenmpi-dev openmpi-bin cmake g++" >&2; exit 2; }
  done
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  say "downloading the horovod $VERSION sdist"
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "horovod==$VERSION"
  tar -xzf "$work"/horovod-"$VERSION".tar.gz -C "$work"
  src="$work/horovod-$VERSION"
  for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
    sed -i -E 's/CMAKE_CXX_STANDARD[[:space:]]+1[14]/CMAKE_CXX_STANDARD 17/' "$f"
    grep -q "CMAKE_CXX_STANDARD 17" "$f" || { echo "install_horovod: C++17 patch did not apply to $f" >&2; exit 1; }
  done
  "$PY" -m pip install -q cloudpickle psutil pyyaml packaging cffi
  say "building a wheel against $key (a few minutes on 2 cores)"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$cache" "$src"
  wheel=$(ls "$cache"/horovod-"$VERSION"-*.whl | head -n1)
else
  say "using the cached wheel $wheel"
fi

"$PY" -m pip install -q "$wheel"
report=$(horovodrun --check-build)
for part in PyTorch Gloo MPI; do
  grep -q "\[X\] $part" <<<"$report" || { echo "$report" >&2; echo "install_horovod: built without $part" >&2; exit 1; }
done
say "ok: $(grep -c '\[X\]' <<<"$report") features enabled (PyTorch, Gloo, MPI among them)"
