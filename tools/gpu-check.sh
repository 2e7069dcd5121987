#!/usr/bin/env bash
# One call on a GPU machine: install the packages, run the CUDA tests, run the benchmarks,
# print a short table last.
#
#   tools/gpu-check.sh [OUT_DIR] [PYTEST_PATHS...]      (defaults: bench-results, tests)
#
# Needs: python3 with torch (CUDA), pluggy, pytest, setuptools; no network.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
shift || true
PATHS=("$@")
[ ${#PATHS[@]} -eq 0 ] && PATHS=(tests)
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"

for pkg in packages/*/; do
  python3 -m pip install -q --no-deps --no-build-isolation -e "$pkg" >>"$OUT/pip.log" 2>&1 \
    || { echo "install of $pkg FAILED:"; tail -5 "$OUT/pip.log"; }
done
ring-attention info 2>&1 | tee "$OUT/info.txt" || python3 -m ring_core.cli info

begin=$(date +%s)
timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -m cuda -q -p no:cacheprovider -rfE "${PATHS[@]}" 2>&1 | tee "$OUT/pytest-cuda.log" | tail -60
tests_rc=${PIPESTATUS[0]}
echo "pytest -m cuda: rc=$tests_rc in $(( $(date +%s) - begin )) s"

begin=$(date +%s)
timeout "${BENCH_TIMEOUT:-420}" python3 tools/bench_dilated_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^\[" >/dev/null
bench_rc=${PIPESTATUS[0]}
echo "bench: rc=$bench_rc in $(( $(date +%s) - begin )) s"

echo
echo "==== summary ===="
grep -E "passed|failed|error" "$OUT/pytest-cuda.log" | tail -1
sed -n '/^card:/,$p' "$OUT/bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
