# Every case back to back on the same GPU, one process each, starting from an empty compile cache (the first case
# shows the cold start, the rest the warm one; name a case twice to time its warm start). Results:
# $OUT/results.jsonl, $OUT/report_ARCH.{json,md}; one log per case in $OUT; the paired-step overhead of every
# gemma_ft run against every unsloth run is printed at the end.
#   bash benchmarks/run_all.sh 270m 25      (arch, optimizer steps; the first WARMUP steps are not timed)
# CASES, CASE_TIMEOUT (s per case), DEADLINE (s for the whole script: later cases get what is left) and
# KEEP_COMPILE_CACHE=1 (do not empty it first) and SAVE_COMPILE_CACHE=1 (pack it into $OUT/compile_cache_ARCH.tar.xz,
# for a later machine to start warm from COMPILE_CACHE_DIR: see gpu_setup.sh) are read from the environment.
set -o pipefail
source benchmarks/gpu_setup.sh
arch=${1:-270m}; steps=${2:-25}
[ "${KEEP_COMPILE_CACHE:-0}" = 1 ] || rm -rf $GEMMA_FT_CACHE/compile
run=0
for case in ${CASES:-gemma_ft unsloth unsloth_notebook gemma_ft_defaults hf}; do
  run=$((run + 1))
  limit=$(time_left ${CASE_TIMEOUT:-900})
  [ $limit -gt 30 ] || { echo "$case skipped: no time left"; continue; }
  log=$OUT/bench_${arch}_${run}_$case.log
  timeout $limit python3 benchmarks/throughput.py --case $case --arch $arch --steps $steps \
      --warmup ${WARMUP:-5} --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/results.jsonl > $log 2>&1
  echo "$case rc=$? $(grep -c '\[bench\] step' $log) steps in ${limit}s limit"
done
python3 benchmarks/report.py $OUT/results.jsonl $OUT/report_$arch
# Framework overhead step by step: each gemma_ft run against each unsloth run (the same batches in the same order).
for baseline in $OUT/bench_${arch}_*_unsloth.log; do
  for candidate in $OUT/bench_${arch}_*_gemma_ft.log; do
    [ -f "$baseline" ] && [ -f "$candidate" ] && python3 benchmarks/paired_steps.py "$baseline" "$candidate"
  done
done
if [ "${SAVE_COMPILE_CACHE:-0}" = 1 ]; then
  tar -C $GEMMA_FT_CACHE -cJf $OUT/compile_cache_$arch.tar.xz compile && ls -la $OUT/compile_cache_$arch.tar.xz
fi
