# Two GPUs against one, back to back on one 2-GPU host; the documented torchrun command interrupted and resumed;
# then (time allowing) two GPUs with DDP's unused-parameter search on, the Trainer's default for PEFT models.
# Random-init Gemma 3 270M architecture, realistic-length rows, unsloth's block compile off
# (UNSLOTH_COMPILE_DISABLE=1: the comparison is between GPU counts, not compile states). Results under $OUT.
#   bash benchmarks/multi_gpu.sh            (DEADLINE: seconds for the whole script, default 560)
set -o pipefail
source benchmarks/gpu_setup.sh
export UNSLOTH_COMPILE_DISABLE=1
nvidia-smi -L
mkdir -p $OUT/logs
python3 benchmarks/throughput.py --prepare-only --arch 270m --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer 2>&1 | tail -1
left() { echo $(( ${DEADLINE:-560} - SECONDS )); }
B="benchmarks/throughput.py --case gemma_ft --arch 270m --steps 20 --warmup 5 --model-dir /tmp/bench/gemma3-270m-random
   --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/multi_gpu.jsonl"
CUDA_VISIBLE_DEVICES=0 timeout 170 python3 $B --workdir /tmp/w1 > $OUT/logs/gpu1_batch8.log 2>&1
echo "1 GPU x 8 rc=$? at ${SECONDS}s"
timeout 140 torchrun --nproc_per_node 2 $B --workdir /tmp/w2 > $OUT/logs/gpu2_batch8.log 2>&1
echo "2 GPUs x 8 rc=$? at ${SECONDS}s"
C="model.name_or_path=/tmp/bench/gemma3-270m-random data.path=/tmp/bench/data.csv data.columns.system=null
   data.val_size=16 lora.train_lm_head=false train.max_steps=20 train.per_device_train_batch_size=8 train.sampling=random
   train.max_seq_length=2048 train.eval_steps=0 train.exact_match_rows=4 train.max_new_tokens=16 train.report_to=none
   train.save_steps=10 train.logging_steps=1 optim.warmup_steps=5 debug.verbose=true run.dir=/tmp/ddp_run"
timeout 130 torchrun --nproc_per_node 2 -m tests.helpers.interrupted_cli sigterm 10 $C > $OUT/logs/ddp_interrupted.log 2>&1
echo "interrupted rc=$? at ${SECONDS}s; checkpoints: $(ls /tmp/ddp_run/checkpoints)"
timeout $(( $(left) < 130 ? $(left) : 130 )) torchrun --nproc_per_node 2 -m gemma_ft $C > $OUT/logs/ddp_resumed.log 2>&1
echo "resumed rc=$? at ${SECONDS}s"
cp /tmp/ddp_run/history.json $OUT/logs/ddp_history.json 2>/dev/null; cp /tmp/ddp_run/metrics.json $OUT/logs/ddp_metrics.json 2>/dev/null
ls /tmp/ddp_run
if [ $(left) -gt 70 ]; then
  timeout $(left) torchrun --nproc_per_node 2 $B --workdir /tmp/w3 --ddp-find-unused-parameters \
      > $OUT/logs/gpu2_batch8_find_unused.log 2>&1
  echo "2 GPUs x 8, find_unused_parameters rc=$? at ${SECONDS}s"
fi
python3 -c "
import json
for l in open('$OUT/multi_gpu.jsonl'):
    d = json.loads(l)
    print(d['gpus'], 'x', d['batch'], 'find_unused', d['ddp_find_unused_parameters'], round(d['tokens_per_s']),
          'tok/s', round(d['s_per_step'], 3), 's/step', round(d['peak_reserved_gib'], 2), 'GiB', d['losses'][:20])
"
