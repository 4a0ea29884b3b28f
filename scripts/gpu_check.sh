#!/usr/bin/env bash
# The GPU check, on a CUDA machine: the `gpu` test tier (tests/test_gpu.py), then the lm and allreduce benchmarks.
# Results, with the GPU named, in bench/results/gpu/: device.json (nvidia-smi, torch, CUDA, NCCL), tests.xml
# (JUnit), lm.json, allreduce.json (+ .png). In a fresh checkout:
#   bash scripts/setup.sh && bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=bench/results/gpu

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA driver here (nvidia-smi not found): run it on a CUDA machine" >&2
  exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check: $PY's torch cannot use CUDA (a CPU build?): pip install --force-reinstall 'torch>=2.1,<3'" >&2
  exit 1
fi
"$PY" -c 'import pytest, matplotlib' 2>/dev/null || "$PY" -m pip install -q "pytest>=7" "matplotlib>=3.5"
mkdir -p "$OUT"

"$PY" - "$OUT/device.json" <<'EOF'
import json, subprocess, sys, time, torch
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True, check=True).stdout.strip().splitlines()
gpus = [dict(zip(("name", "memory_total", "driver_version"), (c.strip() for c in line.split(",")))) for line in smi]
info = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "gpus": gpus, "torch_device_name": torch.cuda.get_device_name(0),
        "device_count": torch.cuda.device_count(), "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())), "cudnn": torch.backends.cudnn.version()}
open(sys.argv[1], "w").write(json.dumps(info, indent=1) + "\n")
print(f"gpu_check: {len(gpus)} x {gpus[0]['name']}, torch {info['torch']}, CUDA {info['cuda']}, NCCL {info['nccl']}")
EOF

status=0
"$PY" -m pytest -q -m gpu tests/test_gpu.py --junitxml "$OUT/tests.xml" || status=$?
"$PY" -m bench lm allreduce --out "$OUT" || status=$?
echo "gpu_check: results in $OUT/ (device.json, tests.xml, lm.json, allreduce.json); exit $status"
exit "$status"
