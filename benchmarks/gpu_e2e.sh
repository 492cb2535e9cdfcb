# The pipeline end to end on a GPU, `python -m gemma_ft` as a user runs it (debug.verbose prints GPU memory);
# logs and metrics under $OUT. Run after `run_all.sh 270m` on the same machine to find the 270M compile cache warm.
#   bash benchmarks/gpu_e2e.sh      16-bit LoRA on the random-init Gemma 3 270M architecture (the benchmark's
#                                   realistic-length rows), the tiny model, then 4-bit QLoRA on the 270M
#                                   architecture with the seed notebook's adamw_8bit
# DEADLINE (s for the whole script, default 560): each run gets what is left, up to 240 s.
set -o pipefail
source benchmarks/gpu_setup.sh
: ${DEADLINE:=560}
common="train.exact_match_rows=4 train.max_new_tokens=16 train.report_to=none debug.verbose=true"
python3 benchmarks/throughput.py --prepare-only --arch 270m --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer 2>&1 | tail -1
e2e() {  # name, overrides...
  local name=$1; shift
  [ $(time_left 240) -gt 30 ] || { echo "$name skipped: no time left"; return; }
  timeout $(time_left 240) python3 -m gemma_ft "$@" $common run.dir=/tmp/e2e/$name > $OUT/e2e_$name.log 2>&1
  echo "$name rc=$? at ${SECONDS}s"
  cp /tmp/e2e/$name/metrics.json $OUT/e2e_metrics_$name.json 2>/dev/null
}
e2e g270m_16bit $BENCH_270M_OVERRIDES train.sampling=random
e2e g270m_qlora_adamw8bit $BENCH_270M_OVERRIDES model.load_in_4bit=true optim=adamw_8bit
e2e tiny_16bit model=tiny train.eval_steps=10 train.max_steps=30
