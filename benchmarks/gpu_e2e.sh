# The pipeline end to end on a GPU, `python -m gemma_ft` as a user runs it (debug.verbose prints GPU memory);
# logs and metrics under $OUT. Run after run_all.sh 270m on the same machine to find its compile cache warm.
#   bash benchmarks/gpu_e2e.sh 16bit    the random-init Gemma 3 270M architecture on the benchmark's
#                                       realistic-length rows, then the tiny model
#   bash benchmarks/gpu_e2e.sh qlora    the 1B architecture in 4-bit (QLoRA) with the seed notebook's adamw_8bit
set -o pipefail
source benchmarks/gpu_setup.sh
common="train.exact_match_rows=4 train.max_new_tokens=16 train.report_to=none debug.verbose=true"
bench_data="data.path=/tmp/bench/data.csv data.columns.system=null data.val_size=16 train.max_seq_length=2048"
arch_model() {  # /tmp/bench/data.csv and /tmp/bench/gemma3-<arch>-random
  python3 benchmarks/throughput.py --prepare-only --arch $1 --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer 2>&1 | tail -1
}
if [ "$1" = 16bit ]; then
  arch_model 270m
  timeout ${E2E_TIMEOUT:-200} python3 -m gemma_ft model.name_or_path=/tmp/bench/gemma3-270m-random $bench_data $common \
      train.max_steps=20 train.sampling=random lora.train_lm_head=false run.dir=/tmp/e2e/g270m \
      > $OUT/e2e_270m_16bit.log 2>&1; echo "270m rc=$?"
  timeout ${E2E_TIMEOUT:-200} python3 -m gemma_ft model=tiny $common train.eval_steps=10 train.max_steps=30 run.dir=/tmp/e2e/tiny \
      > $OUT/e2e_tiny.log 2>&1; echo "tiny rc=$?"
  for d in tiny g270m; do cp /tmp/e2e/$d/metrics.json $OUT/e2e_metrics_$d.json; done
else
  arch_model 1b
  timeout ${E2E_TIMEOUT:-400} python3 -m gemma_ft model.name_or_path=/tmp/bench/gemma3-1b-random model.load_in_4bit=true \
      optim=adamw_8bit lora.train_lm_head=false $bench_data $common train.max_steps=20 run.dir=/tmp/e2e/g1b_qlora \
      > $OUT/e2e_1b_qlora_adamw8bit.log 2>&1; echo "qlora rc=$?"
  cp /tmp/e2e/g1b_qlora/metrics.json $OUT/e2e_metrics_g1b_qlora.json
fi
