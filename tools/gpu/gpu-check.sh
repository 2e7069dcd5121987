#!/usr/bin/env bash
# One call on a GPU machine: install the packages, probe the cuDNN backward call, run the
# CUDA tests, run the benchmarks (one process per section), print a short table last.
#
#   tools/gpu/gpu-check.sh [OUT_DIR] [PYTEST_PATHS...]      (defaults: bench-results, tests)
#
# Needs: python3 with torch (CUDA), pluggy, pytest, setuptools; no network.
# Env: TESTS_TIMEOUT, BENCH_TIMEOUT (seconds per step), BENCH_ARGS (extra bench arguments),
# SECTIONS (bench sections, default: kernels dilated dense memory accuracy),
# FA4_PART, KERNEL_TABLE (below).
#
# flash-attn 4 is not on the GPU machines and one of its wheels is larger than what one run may
# carry, so it comes in two runs (tools/gpu/fa4_wheels.sh: `download` and `pack` here, into an
# ignored folder that the runs carry). Run 1: FA4_PART=<carry>/part1 tools/gpu/gpu-check.sh: the part
# is kept in /tmp/fa4-wheels and the check stops. Run 2, at once (the machine stays up only about
# 30 s after a run; a fresh one has lost part 1): FA4_PART=<carry>/part2 tools/gpu/gpu-check.sh: the
# wheels are joined, checked and installed, then everything below runs with flash_attn4 too.
# KERNEL_TABLE=1 also measures the per-block-shape kernel table (tools.bench.kernel_table) and
# times the dispatch with it (tools.bench.flash_dispatch).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."  # the repository root: the tools run as modules (python -m tools.x)
OUT=${1:-bench-results}
shift || true
PATHS=("$@")
[ ${#PATHS[@]} -eq 0 ] && PATHS=(tests)
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ -n "${FA4_PART:-}" ]; then
  tools/gpu/fa4_wheels.sh receive "$FA4_PART" 2>&1 | tee "$OUT/fa4.log"
  case ${PIPESTATUS[0]} in
  0) ;;
  3) echo "flash-attn 4: this part is kept in /tmp/fa4-wheels; send the other part now"; exit 0 ;;
  *) echo "flash-attn 4: install FAILED; going on without it" ;;
  esac
fi
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1  # flash-attn 4 compiles each kernel once per machine
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"

for pkg in packages/*/; do
  python3 -m pip install -q --no-deps --no-build-isolation -e "$pkg" >>"$OUT/pip.log" 2>&1 \
    || { echo "install of $pkg FAILED:"; tail -5 "$OUT/pip.log"; }
done
ring-attention info >"$OUT/info.txt" 2>&1 || cat "$OUT/info.txt"

python3 -m tools.gpu.probe_cudnn 2>&1 | tee "$OUT/probe.log"
RING_FLASH_CUDNN_BACKWARD=$(sed -n 's/^BEST=//p' "$OUT/probe.log")
export RING_FLASH_CUDNN_BACKWARD=${RING_FLASH_CUDNN_BACKWARD:-flash}
echo "cuDNN backward variant: $RING_FLASH_CUDNN_BACKWARD"

# one pytest process per group, so that a crash in one leaves the others' results
begin=$(date +%s)
tests_rc=0
for group in "sdpa_cudnn" "sdpa_flash" "sdpa_efficient" "not sdpa_cudnn and not sdpa_flash and not sdpa_efficient"; do
  echo "== pytest -m cuda -k '$group'" | tee -a "$OUT/pytest-cuda.log"
  timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -m cuda -k "$group" -q -p no:cacheprovider -rfE "${PATHS[@]}" \
    >>"$OUT/pytest-cuda.log" 2>&1
  rc=$?
  echo "rc=$rc: $(tail -1 "$OUT/pytest-cuda.log")"
  [ $rc -ne 0 ] && [ $rc -ne 5 ] && tests_rc=$rc
done
grep -E "^(FAILED|ERROR)|Fatal|Segmentation" "$OUT/pytest-cuda.log" | head -40
echo "pytest -m cuda: rc=$tests_rc in $(( $(date +%s) - begin )) s"

begin=$(date +%s)
bench_rc=0
for section in ${SECTIONS:-kernels dilated dense memory accuracy}; do
  timeout "${BENCH_TIMEOUT:-300}" python3 -m tools.bench.flash_dilated --out "$OUT" --merge --sections "$section" \
    ${BENCH_ARGS:-} >>"$OUT/bench.log" 2>&1 || { bench_rc=$?; echo "bench section $section: rc=$bench_rc"; }
done
python3 -m tools.bench.flash_dilated --out "$OUT" --merge --sections "" >"$OUT/summary.txt" 2>&1
if [ "${KERNEL_TABLE:-0}" = 1 ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 -m tools.bench.kernel_table --out "$OUT/kernel-table.json" \
    --plot "$OUT/kernel-table.png" >>"$OUT/bench.log" 2>&1 || { bench_rc=$?; echo "kernel table: rc=$bench_rc"; }
  RING_FLASH_KERNEL_TABLE="$OUT/kernel-table.json" timeout "${BENCH_TIMEOUT:-300}" python3 \
    -m tools.bench.flash_dispatch --out "$OUT/flash-dispatch.json" --plot "$OUT/flash-dispatch.png" \
    >>"$OUT/summary.txt" 2>>"$OUT/bench.log" || { bench_rc=$?; echo "dispatch bench: rc=$bench_rc"; }
fi
echo "bench: rc=$bench_rc in $(( $(date +%s) - begin )) s"

echo
echo "==== summary ===="
grep -E "passed|failed" "$OUT/pytest-cuda.log" | tail -4
cat "$OUT/summary.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
