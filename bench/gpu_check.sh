#!/usr/bin/env bash
# GPU check: build for sm_90a (its wgmma registers checked: .ci/ptxas_check --binary; no libstdc++ of its own in
# the module, and the CPU tests of error messages); the CUDA cases of the test suite (`-m gpu`: the CPU cases run in
# CI) while compute-sanitizer runs every kernel (bench/gpu_smoke.py; memcheck: out-of-bounds and misaligned
# accesses; racecheck: shared-memory races); the bench, one family at a time (each family's table streams out as it
# is measured); Nsight Compute on the scan's and attention's main
# kernels if time is left (sections, stall reasons, pipe utilization, shared-memory wavefronts and bank conflicts,
# the SASS lines with the most stall samples: ncu_top.txt); a summary last.
# Usage: bench/gpu_check.sh [OUTDIR]   (logs, junit XML and bench JSON land in OUTDIR; default gpu_check_out)
# BUDGET_S (default 540): each step's timeout is cut to what is left of it, and a step with under 20 s is skipped.
# FAMILIES (default "scan attention hybrid mafbm mjp philox"): the bench's families, in order (fewer: time for ncu).
# MAMBA_SRC: if set to a mamba source checkout (kept outside the repo), its selective scan is built for sm_90
# (bench/build_mamba_peer.py, niced, beside the tests) and the scan bench compares against it.
# BASE_SRC: source trees of earlier markovkit commits, space-separated (outside the repo: git archive REV | tar x
# -C DIR): each is built too (niced, beside the tests, into /tmp/base_pkg_N, N its place in the list from 0) and
# each family's bench runs again on it after ours (bench_baseN_FAMILY.txt, its own bench code, no mamba_ssm): the
# commits' kernels on one device in one run, side by side with the peers in one table (bench/ab_table.py).
# BASE_FAMILIES (default FAMILIES; empty: none): the families benched on each BASE_SRC build.
# AB_SCRIPT: a script (bench/ab_attention.py: one op alone, no peers) run after the benches on ours, each BASE_SRC
# build, and ours again (the spread), one process each, its first argument the build's label: ab.txt. A bisect of
# one op's kernels costs seconds a build there, the family's bench with its peers a minute.
# Needs torch, scikit-build-core, pybind11, cmake, ninja, compute-sanitizer and ncu (the device machines have them).
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
out="$(realpath -m "${1:-gpu_check_out}")"
mkdir -p "$out"
rm -f "$out/ab.txt" "$out/ab.err"  # appended to per build below
PY="${PYTHON:-python3}"
budget="${BUDGET_S:-540}"
families="${FAMILIES:-scan attention hybrid mafbm mjp philox}"
base_families="${BASE_FAMILIES-$families}"
t0=$(date +%s)
export MARKOVKIT_CUDA=ON MARKOVKIT_CUDA_ARCHS="${MARKOVKIT_CUDA_ARCHS:-90a}" PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

# bounded CAP CMD...: CMD under a timeout of min(CAP, budget left); rc 125 when too little is left to start
bounded() {
  local cap=$1 left=$(( budget - ($(date +%s) - t0) ))
  shift
  local t=$(( left < cap ? left : cap ))
  if [ "$t" -lt 20 ]; then echo "skipped: budget spent" >&2; return 125; fi
  timeout "$t" "$@"
}
secs() { echo $(( $(date +%s) - $1 )); }

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"

start=$(date +%s)
# -v: the compile and link lines in build.log
if ! bounded 240 "$PY" -m pip install -v --no-build-isolation --no-deps -C build-dir=build/gpu . \
  >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  echo "gpu_check: BUILD FAILED after $(secs $start) s (see $out/build.log)"
  exit 1
fi
build_s=$(secs $start)
(cd /tmp && "$PY" -m markovkit info) | tee "$out/info.txt"
so="$(cd /tmp && "$PY" -c 'import markovkit._C as c; print(c.__file__)')"
xdist=""
"$PY" -c "import xdist" 2>/dev/null && xdist="-n 6"
# The module must use the process's libstdc++ (run 4: a copy linked into it crashed at the first error message
# with a number): the copy's std::locale definitions, and the CPU cases of the tests that check error messages
# (the rest of the CPU suite runs in CI, on another build)
stdcxx="unchecked (no nm / readelf, or no module)"
stdcxx_bad=0
if [ -f "$so" ] && syms="$(nm -D --defined-only "$so" 2>/dev/null)" && dyn="$(readelf -d "$so" 2>/dev/null)"; then
  locales="$(grep -c _ZNSt6locale <<<"$syms")"
  needed=no
  grep -q "NEEDED.*libstdc++\.so\.6" <<<"$dyn" && needed=yes
  stdcxx="$locales std::locale definitions, NEEDED libstdc++.so.6: $needed"
  [ "$locales" -eq 0 ] && [ "$needed" = yes ] || stdcxx_bad=1
fi
bounded 90 "$PY" -m pytest -q -m "not gpu" tests -k "error or refuse or raises" -rfE -p no:cacheprovider $xdist \
  >"$out/cpu_errors.log" 2>&1
errors_rc=$?
# the wgmma register check of CI's .ci/ptxas_check, on the kernels this machine's nvcc built (CI's nvcc may differ),
# beside the tests (CPU only); none without 90a in the archs (no wgmma kernels)
regs_pid=""
if [[ ";$MARKOVKIT_CUDA_ARCHS;" == *";90a;"* ]]; then
  PATH="$(dirname "$(command -v "$PY")"):$PATH" bounded 150 .ci/ptxas_check --binary "$so" >"$out/wgmma_regs.log" 2>&1 &
  regs_pid=$!
else
  echo "skipped: no 90a in MARKOVKIT_CUDA_ARCHS=$MARKOVKIT_CUDA_ARCHS" >"$out/wgmma_regs.log"
fi

peer_pid=""
if [ -n "${MAMBA_SRC:-}" ]; then
  MAX_JOBS=10 nice -n 19 timeout 300 "$PY" bench/build_mamba_peer.py "$MAMBA_SRC" /tmp/mamba_peer \
    >"$out/peer_build.log" 2>&1 &
  peer_pid=$!
fi

read -r -a bases <<<"${BASE_SRC:-}"
base_pids=()
for i in "${!bases[@]}"; do
  CMAKE_BUILD_PARALLEL_LEVEL=$(( 12 / ${#bases[@]} + 1 )) nice -n 19 timeout 400 "$PY" -m pip install \
    --no-build-isolation --no-deps --target "/tmp/base_pkg_$i" -C build-dir="/tmp/base_build_$i" "${bases[$i]}" \
    >"$out/base${i}_build.log" 2>&1 &
  base_pids+=($!)
done

start=$(date +%s)
bounded 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" bench/gpu_smoke.py >"$out/memcheck.log" 2>&1 &
memcheck_pid=$!
bounded 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" bench/gpu_smoke.py >"$out/racecheck.log" 2>&1 &
racecheck_pid=$!
# attention apart: a fault in its sm_90a kernels (new, first GPU run pending) would poison the CUDA context of the
# other families' tests in the same process
bounded 150 "$PY" -m pytest -q -m gpu tests -k "not attention" -rfE -p no:cacheprovider $xdist \
  --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
tests_rc=$?
bounded 60 "$PY" -m pytest -q -m gpu tests -k attention -rfE -p no:cacheprovider $xdist \
  --junitxml="$out/tests_attention.xml" >"$out/tests_attention.log" 2>&1
attn_rc=$?
tests_s=$(secs $start)
wait $memcheck_pid; memcheck_rc=$?
regs_rc=0
[ -n "$regs_pid" ] && { wait "$regs_pid"; regs_rc=$?; }
wait $racecheck_pid; racecheck_rc=$?
sanitizer_s=$(secs $start)

peer_rc="-"
if [ -n "$peer_pid" ]; then
  wait $peer_pid; peer_rc=$?
  tail -n 3 "$out/peer_build.log"
fi

start=$(date +%s)
bench_rc=""
for family in $families; do
  PYTHONPATH="/tmp/mamba_peer${PYTHONPATH:+:$PYTHONPATH}" \
    bounded 110 "$PY" -m markovkit.bench --family "$family" --no-compile --json "$out/bench_$family.json" \
    >"$out/bench_$family.txt" 2>"$out/bench_$family.err"
  bench_rc="$bench_rc $family=$?"
done
base_rc="-"
base_ok=()
for i in "${!bases[@]}"; do
  pkg="/tmp/base_pkg_$i"
  wait "${base_pids[$i]}"; base_build_rc=$?
  [ "$i" -eq 0 ] && base_rc=""
  base_rc="$base_rc base$i: build=$base_build_rc"
  # an editable install of ours would shadow PYTHONPATH: the base must be what imports
  [ "$base_build_rc" -eq 0 ] && ! (cd /tmp && PYTHONPATH="$pkg" "$PY" -c \
    "import markovkit, sys; sys.exit(not markovkit.__file__.startswith('$pkg/'))") && base_build_rc=2 &&
    base_rc="$base_rc import=not-the-base"
  [ "$base_build_rc" -eq 0 ] && base_ok+=("$i")
  for family in $base_families; do
    [ "$base_build_rc" -eq 0 ] || break
    run="$out/bench_base${i}_$family"
    (cd /tmp && PYTHONPATH="$pkg" bounded 110 "$PY" -m markovkit.bench --family "$family" --no-compile \
      --json "$run.json" >"$run.txt" 2>"$run.err")
    base_rc="$base_rc $family=$?"
  done
done
if [ -n "${AB_SCRIPT:-}" ]; then
  ab_builds=(ours)
  for i in "${base_ok[@]}"; do ab_builds+=("base$i"); done
  ab_builds+=(ours)
  for label in "${ab_builds[@]}"; do
    pkg=""
    [ "$label" = ours ] || pkg="/tmp/base_pkg_${label#base}"
    (cd /tmp && PYTHONPATH="$pkg" bounded 60 "$PY" "$repo/$AB_SCRIPT" "$label") >>"$out/ab.txt" 2>>"$out/ab.err"
  done
fi
bench_s=$(secs $start)

start=$(date +%s)
# the report (in /tmp: large) gives the sections' text with the stall reasons' breakdown, and the SASS
# instructions with the most stall samples per kernel (bench/ncu_top.py; the raw page in ncu_sass.csv)
rm -f /tmp/mk_prof.ncu-rep
bounded 100 ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section MemoryWorkloadAnalysis_Tables --section SourceCounters \
  --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' -o /tmp/mk_prof \
  -k regex:'scan_(fwd|bwd)(_staged)?_kernel|swa_(fwd|bwd_dq|bwd_dkdv)(_sm90)?_kernel' -c 5 \
  "$PY" bench/gpu_profile.py >"$out/ncu_run.log" 2>&1
ncu_rc=$?
if [ -f /tmp/mk_prof.ncu-rep ]; then
  bounded 30 ncu -i /tmp/mk_prof.ncu-rep --print-details all >"$out/ncu.txt" 2>&1
  bounded 30 ncu -i /tmp/mk_prof.ncu-rep --page source --csv --print-source sass >"$out/ncu_sass.csv" 2>&1
  "$PY" bench/ncu_top.py "$out/ncu_sass.csv" >"$out/ncu_top.txt" 2>&1
fi
ncu_s=$(secs $start)

echo
echo "== ncu (rc=$ncu_rc): duration, throughput, occupancy =="
grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|\
Issue Slots Busy|highest-utilized|Shared (Load|Store)|[Bb]ank" "$out/ncu.txt" | head -n 60
grep -E "^  [a-z_]+.*\(|issue_stalled_(long_scoreboard|short_scoreboard|wait|barrier|math_pipe_throttle|mio_throttle|\
lg_throttle|not_selected|dispatch_stall|branch_resolving|no_instruction)_" "$out/ncu.txt" | head -n 70
echo
echo "== sanitizers (memcheck rc=$memcheck_rc, racecheck rc=$racecheck_rc) =="
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|skipped" "$out/memcheck.log" "$out/racecheck.log" | head -n 20
echo
echo "== bench =="
for family in $families; do
  grep -vE "^('ours x'|---)" "$out/bench_$family.txt"
  grep -E "Error|error|skipped" "$out/bench_$family.err" | tail -n 3
done
echo
echo "== ms: ours, each BASE_SRC build's, the issue's peer =="
for i in "${!bases[@]}"; do echo "base$i: ${bases[$i]}"; done
"$PY" bench/ab_table.py "$out" $families
if [ -n "${AB_SCRIPT:-}" ] && [ -f "$out/ab.txt" ]; then
  echo; echo "== $AB_SCRIPT =="; cat "$out/ab.txt"; tail -n 3 "$out/ab.err"
fi
echo
echo "== failures =="
grep -hE "^(FAILED|ERROR)" "$out/cpu_errors.log" "$out/tests.log" "$out/tests_attention.log" | head -n 40
echo
echo "== summary =="
printf "%-8s %-6s %s\n" step secs result
printf "%-8s %-6s %s\n" build "$build_s" ok
printf "%-8s %-6s %s\n" stdcxx "" "_C: $stdcxx (torch's: 0, yes)"
printf "%-8s %-6s %s\n" errors "" "rc=$errors_rc: $(tail -n 1 "$out/cpu_errors.log")"
printf "%-8s %-6s %s\n" wgmma "" "rc=$regs_rc: $(tail -n 1 "$out/wgmma_regs.log")"
printf "%-8s %-6s %s\n" tests "$tests_s" "rc=$tests_rc: $(tail -n 1 "$out/tests.log")"
printf "%-8s %-6s %s\n" attn "" "rc=$attn_rc: $(tail -n 1 "$out/tests_attention.log")"
printf "%-8s %-6s %s\n" sanitize "$sanitizer_s" "memcheck rc=$memcheck_rc, racecheck rc=$racecheck_rc"
printf "%-8s %-6s %s\n" peer "" "mamba_ssm build rc=$peer_rc"
printf "%-8s %-6s %s\n" base "" "BASE_SRC rc: $base_rc"
printf "%-8s %-6s %s\n" bench "$bench_s" "rc:$bench_rc"
printf "%-8s %-6s %s\n" ncu "$ncu_s" "rc=$ncu_rc (profile in $out/ncu.txt, stall sites in $out/ncu_top.txt)"
printf "%-8s %-6s %s\n" total "$(secs $t0)" "of a ${budget} s budget"
[ "$stdcxx_bad" -eq 0 ] && [ "$errors_rc" -eq 0 ] && [ "$regs_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$attn_rc" -eq 0 ] &&
  [ "$memcheck_rc" -eq 0 ] && [ "$racecheck_rc" -eq 0 ] && [[ "$bench_rc" != *=[1-9]* ]]
