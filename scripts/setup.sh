#!/usr/bin/env bash
# Install the launcher and what it needs into the current Python environment.
#   bash scripts/setup.sh          # torch, hydra, tensorboard, torchft, the project (pip install -e .)
#   bash scripts/setup.sh --test   # + test tools, torchft, OpenMPI, mpi4py and horovod (built with the C++17 fix)
# torch: where there is no NVIDIA driver the CPU build is installed (the plain PyPI wheel is the
# multi-GB CUDA one). Override with TORCH_SPEC / TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*"; }

if "$PY" -c "import torch" 2>/dev/null; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then
  say "NVIDIA driver found: installing the CUDA build of torch"
  "$PY" -m pip install "${TORCH_SPEC:-torch>=2.1,<3}"
else
  say "no NVIDIA driver: installing the CPU build of torch"
  spec=${TORCH_SPEC:-torch==2.13.0+cpu}
  # a local wheel cache/mirror may already serve it; else PyTorch's CPU index does
  "$PY" -m pip install "$spec" \
    || "$PY" -m pip install "$spec" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi

if [ "${1:-}" = "--test" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    need=()
    # OpenMPI + a compiler for horovod and mpi4py; sshd and iproute2 for the two-host (netns) tests;
    # Slurm and munge for the test cluster; a Docker engine, compose and debootstrap for the docker tests
    for pkg in libopenmpi-dev openmpi-bin cmake g++ openssh-server openssh-client iproute2 slurm-wlm munge \
               docker.io docker-compose debootstrap; do
      dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
      say "apt-get install ${need[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
  fi
  "$PY" -m pip install -q -e ".[test,mpi]"
  bash scripts/install_horovod.sh
else
  # torchft (--fault-tolerant) ships wheels for Linux x86-64 only
  if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then "$PY" -m pip install -q -e ".[ft]"; else "$PY" -m pip install -q -e .; fi
fi
say "done"
