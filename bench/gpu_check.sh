#!/usr/bin/env bash
# GPU check: build for sm_90, run the CUDA cases of the test suite (`-m gpu`: the CPU cases run in CI), every
# kernel under compute-sanitizer (memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory
# races), the full bench, Nsight Compute on the scan's and attention's main kernels; a summary last.
# Usage: bench/gpu_check.sh [OUTDIR]   (logs, junit XML and bench JSON land in OUTDIR; default gpu_check_out)
# Fits in about 9 minutes on an H100/H200 with torch, scikit-build-core, pybind11, cmake, ninja, compute-sanitizer
# and ncu installed (the device machines have them).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
export MARKOVKIT_CUDA=ON MARKOVKIT_CUDA_ARCHS="${MARKOVKIT_CUDA_ARCHS:-90}" PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

start=$(date +%s)
if ! pip install --no-build-isolation --no-deps . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  echo "gpu_check: BUILD FAILED (see $out/build.log)"
  exit 1
fi
build_s=$(( $(date +%s) - start ))
python -m markovkit info | tee "$out/info.txt"

start=$(date +%s)
timeout 180 python -m pytest -q -m gpu tests -rfE --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python bench/gpu_smoke.py >"$out/memcheck.log" 2>&1
memcheck_rc=$?
timeout 90 compute-sanitizer --tool racecheck --error-exitcode 9 python bench/gpu_smoke.py >"$out/racecheck.log" 2>&1
racecheck_rc=$?
sanitizer_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout 120 python -m markovkit.bench --json "$out/bench.json" >"$out/bench.txt" 2>"$out/bench.err"
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout 90 ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
  -k regex:'scan_(fwd|bwd)_kernel|swa_(fwd|bwd_dq|bwd_dkdv)_kernel' -c 5 python bench/gpu_profile.py \
  >"$out/ncu.txt" 2>&1
ncu_rc=$?
ncu_s=$(( $(date +%s) - start ))

echo
echo "== failures =="
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 40
echo
echo "== sanitizers (memcheck rc=$memcheck_rc, racecheck rc=$racecheck_rc) =="
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race" "$out/memcheck.log" "$out/racecheck.log" | head -n 20
echo
echo "== ncu (rc=$ncu_rc): duration, throughput, occupancy, top stall =="
grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall" \
  "$out/ncu.txt" | head -n 60
echo
echo "== bench =="
cat "$out/bench.txt"
tail -n 5 "$out/bench.err"
echo
echo "== summary =="
printf "%-8s %-6s %s\n" step secs result
printf "%-8s %-6s %s\n" build "$build_s" ok
printf "%-8s %-6s %s\n" tests "$tests_s" "rc=$tests_rc: $(tail -n 1 "$out/tests.log")"
printf "%-8s %-6s %s\n" sanitize "$sanitizer_s" "memcheck rc=$memcheck_rc, racecheck rc=$racecheck_rc"
printf "%-8s %-6s %s\n" bench "$bench_s" "rc=$bench_rc"
printf "%-8s %-6s %s\n" ncu "$ncu_s" "rc=$ncu_rc (profile in $out/ncu.txt)"
[ "$tests_rc" -eq 0 ] && [ "$memcheck_rc" -eq 0 ] && [ "$racecheck_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
