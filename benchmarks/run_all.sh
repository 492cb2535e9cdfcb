# Every case back to back on the same GPU, one process each, starting from an empty compile cache (the first case
# shows the cold start, the rest the warm one). Results: $OUT/results.jsonl, $OUT/report.{json,md}; logs in $OUT.
#   bash benchmarks/run_all.sh 270m 25      (arch, optimizer steps; the first WARMUP steps are not timed)
set -o pipefail
source benchmarks/gpu_setup.sh
arch=${1:-270m}; steps=${2:-25}
rm -rf $GEMMA_FT_CACHE/compile
for case in ${CASES:-gemma_ft unsloth unsloth_notebook gemma_ft_defaults hf}; do
  timeout ${CASE_TIMEOUT:-900} python3 benchmarks/throughput.py --case $case --arch $arch --steps $steps \
      --warmup ${WARMUP:-5} --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/results.jsonl \
      > $OUT/bench_${arch}_$case.log 2>&1
  echo "$case rc=$? $(grep -c '\[bench\] step' $OUT/bench_${arch}_$case.log) steps"
done
python3 benchmarks/report.py $OUT/results.jsonl $OUT/report_$arch
