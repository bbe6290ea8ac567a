#!/bin/bash
# One call on a lent GPU machine: build the CUDA extension, run the CUDA tests, compute-sanitizer
# and the benchmark, each under its own time limit. Logs and results go to $OUT (the device tool's
# output folder; /tmp/tritllm_out elsewhere). The summary is printed last.
#
#   bash bench/run_cuda_device.sh [steps]     steps: any of build tests memcheck racecheck
#                                             profile bench quickbench
#                                             (default: build tests quickbench)
# PROFILE_SHAPES="N,K,M ..." picks the products that `profile` runs under ncu.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tritllm_out}
mkdir -p "$OUT"
STEPS=${*:-build tests quickbench}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader \
  | tee "$OUT/gpu.txt"
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if ! python3 -m pytest --version > /dev/null 2>&1 && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

if has build; then
  start=$SECONDS
  TRITLLM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    timeout 420 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  note "build: rc=$rc in $((SECONDS - start)) s"
  [ $rc -ne 0 ] && { grep -E "error|Error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"; exit 1; }
  python3 -c "import tritllm_ext, json; print(json.dumps(tritllm_ext.build_info()))" 2>&1 | tail -1
fi

if has tests; then
  start=$SECONDS
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py > "$OUT/tests.log" 2>&1
  note "tests: rc=$? in $((SECONDS - start)) s: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)|Error:|assert" "$OUT/tests.log" | head -20
fi

# sanitize TOOL FILTER: compute-sanitizer TOOL over the CUDA tests that pytest's -k FILTER selects.
# The sanitizers check every access; the caching allocator would hide overruns inside its blocks.
sanitize() {
  local tool=$1 filter=$2 start=$SECONDS
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 500 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py -k "$filter" \
    > "$OUT/$tool.log" 2>&1
  note "$tool: rc=$? in $((SECONDS - start)) s: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/$tool.log" | tail -1); $(grep -E 'passed|failed' "$OUT/$tool.log" | tail -1)"
}
has memcheck && sanitize memcheck "unpack or exact_data or corrupt or noncontiguous or empty or (cat and not graph)"
has racecheck && sanitize racecheck "(exact_data and (lut or tile or generic or xtable)) or (cat and equals)"

if has profile; then
  for shape in ${PROFILE_SHAPES:-28672,4096,1 28672,4096,16 28672,4096,64}; do
    IFS=, read -r n k m <<< "$shape"
    timeout 300 ncu --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
      --section InstructionStats \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active" \
      -k regex:"xtable_gemv|lut_gemv|tile_gemm|unpack" -c 1 \
      python3 bench/gpu_bench.py --profile "$n" "$k" "$m" > "$OUT/ncu_${n}x${k}_m${m}.txt" 2>&1
    note "profile ${n}x${k} M=$m: rc=$?"
    grep -E "xtable_gemv_kernel|lut_gemv_kernel|tile_gemm_kernel|unpack_kernel|SM Frequency|Duration|DRAM Throughput|Registers Per|No Eligible|Warp Cycles Per Issued|Executed Instructions  |stalled|bank_conflicts|wavefronts|op_shared_ld|pipe_" \
      "$OUT/ncu_${n}x${k}_m${m}.txt" | grep -vE " 0$|0\.0[0-9]$" | head -45
  done
fi

for b in quickbench bench; do
  if has $b; then
    flag=$([ $b = quickbench ] && echo --quick)
    start=$SECONDS
    timeout 500 python3 bench/gpu_bench.py $flag --json "$OUT/gpu_bench.json" --plot "$OUT/gpu_bench.png" \
      > "$OUT/bench.log" 2>&1
    note "$b: rc=$? in $((SECONDS - start)) s"
    grep -E "copy bandwidth|decoder layer|^unpack" "$OUT/bench.log"
    sed -n '/^| N x K/,$p' "$OUT/bench.log"
  fi
done
echo "==== summary"
cat "$SUMMARY"
