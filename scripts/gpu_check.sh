#!/usr/bin/env bash
# The GPU check, on a CUDA machine: the `gpu` test tier (tests/test_gpu.py), then the lm, allreduce and
# checkpoint benchmarks. Results, with the GPU named, in bench/results/gpu/: device.json (nvidia-smi, torch,
# CUDA, NCCL), tests.xml (JUnit), lm.json, allreduce.json, checkpoint.json (each + .png). In a fresh checkout:
#   bash scripts/setup.sh && bash scripts/gpu_check.sh
# On a machine with no package index: put wheels of what is missing (hydra-core, omegaconf,
# antlr4-python3-runtime) in .whl/ (or WHEELS=dir); they are installed from there, nothing is downloaded.
# GPU_RESULTS moves the results, GPU_STAGES (e.g. "tests lm") picks stages, LM_REPEATS (default 3) sets the lm suite's rounds; each stage has a time limit (STAGE_TIMEOUT_S, default 900).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_RESULTS:-bench/results/gpu}
STAGES=" ${GPU_STAGES:-tests lm allreduce+checkpoint} "  # a subset reruns some
WHEELS=${WHEELS:-.whl}
LIMIT=${STAGE_TIMEOUT_S:-900}
say() { echo "gpu_check: $*"; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
  say "no NVIDIA driver here (nvidia-smi not found): run it on a CUDA machine" >&2
  exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  say "$PY's torch cannot use CUDA (a CPU build?): pip install --force-reinstall 'torch>=2.1,<3'" >&2
  exit 1
fi
if ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null && [ -d "$WHEELS" ]; then
  say "installing $(ls "$WHEELS" | tr '\n' ' ')from $WHEELS (no index)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
# the checkout itself, installed or not (a machine without an index cannot build it)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import launcher, workers, hydra, pytest, matplotlib' || { say "missing packages: bash scripts/setup.sh" >&2; exit 1; }
mkdir -p "$OUT"

"$PY" - "$OUT/device.json" <<'EOF'
import json, subprocess, sys, time, torch
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True, check=True).stdout.strip().splitlines()
gpus = [dict(zip(("name", "memory_total", "driver_version"), (c.strip() for c in line.split(",")))) for line in smi]
info = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "gpus": gpus, "torch_device_name": torch.cuda.get_device_name(0),
        "device_count": torch.cuda.device_count(), "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "nccl": ".".join(map(str, torch.cuda.nccl.version())), "cudnn": torch.backends.cudnn.version()}
open(sys.argv[1], "w").write(json.dumps(info, indent=1) + "\n")
print(f"gpu_check: {len(gpus)} x {gpus[0]['name']}, torch {info['torch']}, CUDA {info['cuda']}, NCCL {info['nccl']}")
EOF

status=0
stage() {  # stage NAME COMMAND...: run with the time limit, report, remember a failure
  local name=$1 start=$SECONDS rc=0
  shift
  [[ $STAGES == *" $name "* ]] || return 0
  say "== $name"
  timeout --kill-after=20 "$LIMIT" "$@" || rc=$?
  say "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=$rc
}
# the tier; its tiny lm test is left to the full lm suite below, which checks the same record
stage tests "$PY" -m pytest -q -m gpu tests/test_gpu.py -k "not bench_lm" --junitxml "$OUT/tests.xml" \
  -p no:cacheprovider --durations 0
stage lm "$PY" -m bench lm --repeats "${LM_REPEATS:-3}" --out "$OUT"
stage allreduce+checkpoint "$PY" -m bench allreduce checkpoint --repeats 3 --out "$OUT"
say "results in $OUT/; exit $status"
exit "$status"
