#!/usr/bin/env bash
# GPU checks for a short lease on a CUDA node whose Python has torch, numpy, pyyaml and tqdm but
# not this project's other dependencies (pydantic is all the packed-learner benchmark needs).
#
#   bash tests/benchmarks/device_checks.sh prepare   # here, with network: wheels into .whl/
#   bash tests/benchmarks/device_checks.sh           # on the GPU node (carry .whl/), ~4 min
#
# Runs bench_pack.py's CUDA rows only (K = 1..64 packs, fp32 and TF32, the packing table)
# and writes its output to $OUT/bench_pack_cuda.txt (or ./bench_pack_cuda.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ "${1:-}" == prepare ]]; then  # the versions this project's .venv runs (bash .ci/setup.sh)
  mapfile -t WHEELS < <(.venv/bin/python -c 'from importlib.metadata import version
for n in ("pydantic", "pydantic_core", "annotated-types", "typing-inspection"): print(f"{n}=={version(n)}")')
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  exit
fi

if ! python3 -c "import pydantic" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "pydantic missing and no .whl/: run '$0 prepare' first and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
out="${OUT:-.}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/bench_pack_cuda.txt"
python3 tests/benchmarks/bench_pack.py --devices cuda --reps 3 2>&1 | tee -a "$out/bench_pack_cuda.txt"
