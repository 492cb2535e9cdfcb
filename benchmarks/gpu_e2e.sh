# The pipeline end to end on a GPU: tiny model, random-init Gemma 3 270M architecture (16-bit LoRA, verbose memory
# statistics), QLoRA 4-bit on the 1B architecture, and the seed notebook's adamw_8bit. Logs under $OUT.
set -o pipefail
source benchmarks/gpu_setup.sh
python3 -c "
from pathlib import Path
from benchmarks.throughput import make_model
for arch in ('270m', '1b'):
    make_model(arch, Path('$GEMMA_FT_CACHE/gemma3-tokenizer'), Path(f'/tmp/bench/gemma3-{arch}-random'))
" 2>&1 | tail -2
common="train.max_steps=30 train.eval_steps=10 train.exact_match_rows=8 train.report_to=none"
python3 -m gemma_ft model=tiny $common run.dir=/tmp/e2e/tiny 2>&1 | tee $OUT/e2e_tiny.log | tail -3
python3 -m gemma_ft model.name_or_path=/tmp/bench/gemma3-270m-random $common debug.verbose=true debug.show_examples=true \
    run.dir=/tmp/e2e/g270m 2>&1 | tee $OUT/e2e_270m_16bit.log | tail -25
python3 -m gemma_ft model.name_or_path=/tmp/bench/gemma3-1b-random model.load_in_4bit=true optim=adamw_8bit \
    lora.train_lm_head=false $common debug.verbose=true run.dir=/tmp/e2e/g1b_qlora 2>&1 | tee $OUT/e2e_1b_qlora_adamw8bit.log | tail -15
for d in tiny g270m g1b_qlora; do cp /tmp/e2e/$d/metrics.json $OUT/metrics_$d.json 2>/dev/null; done
