# The pipeline end to end on a GPU, `python -m gemma_ft` as a user runs it (debug.verbose prints GPU memory);
# logs and metrics under $OUT. Run after `run_all.sh 270m` on the same machine (or copy its compile cache over, see
# gpu_setup.sh) to find the 270M compile cache warm.
#   bash benchmarks/gpu_e2e.sh
# PARTS (default "g270m_16bit g270m_qlora_adamw8bit tiny_16bit") picks the runs, in that order:
#   g270m_16bit            16-bit LoRA on the random-init Gemma 3 270M architecture (the benchmark's rows)
#   g270m_16bit_no_em      the same without the exact-match generation (it showed that generating before
#                          training cost the warm start: benchmarks/results/2026-11-27-h200-padded-throughput/)
#   g270m_qlora_adamw8bit  4-bit QLoRA on the 270M architecture with the seed notebook's adamw_8bit
#   tiny_16bit             the tiny model with its shipped data
# DEADLINE (s for the whole script, default 560); each run gets what is left, up to RUN_CAP (default 240) s.
set -o pipefail
source benchmarks/gpu_setup.sh
: ${DEADLINE:=560} ${RUN_CAP:=240} ${PARTS:=g270m_16bit g270m_qlora_adamw8bit tiny_16bit}
common="train.exact_match_rows=4 train.max_new_tokens=16 train.report_to=none debug.verbose=true"
prepare_bench 270m
e2e() {  # name, overrides...
  local name=$1; shift
  [ $(time_left $RUN_CAP) -gt 30 ] || { echo "$name skipped: no time left"; return; }
  timeout $(time_left $RUN_CAP) python3 -m gemma_ft $common "$@" run.dir=/tmp/e2e/$name > $OUT/e2e_$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"
  cp /tmp/e2e/$name/metrics.json $OUT/e2e_metrics_$name.json 2>/dev/null
}
for part in $PARTS; do
  case $part in
    g270m_16bit) e2e $part $BENCH_270M_OVERRIDES train.sampling=random ;;
    g270m_16bit_no_em) e2e $part $BENCH_270M_OVERRIDES train.sampling=random train.exact_match_rows=0 ;;
    g270m_qlora_adamw8bit) e2e $part $BENCH_270M_OVERRIDES model.load_in_4bit=true optim=adamw_8bit ;;
    tiny_16bit) e2e $part model=tiny train.eval_steps=10 train.max_steps=30 ;;
  esac
done
