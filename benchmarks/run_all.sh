# Every case back to back on the same GPU, one process each; results in $OUT/results.jsonl, logs in $OUT.
#   bash benchmarks/run_all.sh 270m 20     (arch, steps)
set -o pipefail
source benchmarks/gpu_setup.sh
arch=${1:-270m}; steps=${2:-20}
for case in ${CASES:-unsloth gemma_ft gemma_ft_defaults hf}; do
  timeout ${CASE_TIMEOUT:-170} python3 benchmarks/throughput.py --case $case --arch $arch --steps $steps --warmup ${WARMUP:-5} \
      --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/results.jsonl > $OUT/bench_${arch}_$case.log 2>&1
  echo "$case rc=$?"; tail -3 $OUT/bench_${arch}_$case.log | cut -c1-300
done
cat $OUT/results.jsonl | cut -c1-600
