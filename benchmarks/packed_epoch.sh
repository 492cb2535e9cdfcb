#!/usr/bin/env bash
# One whole epoch of the benchmark's rows per case, one process per case, back to back on one GPU: gemma_ft's
# shipped defaults (packed fixed-shape batches), a plain unsloth script (batch 8, random order, padded) and
# gemma_ft's padded path at that script's settings. Results: $OUT/results.jsonl and one log per case (run with
# TORCH_LOGS=recompiles, so a recompile later in the epoch shows in it).
#   bash benchmarks/packed_epoch.sh 1b "packed unsloth padded"
# CHECK_ISOLATION=1 also checks, after the epoch, that no packed row attends to another on this GPU.
# CASE_TIMEOUT (s per case) and DEADLINE (s for the whole script) are read from the environment.
set -o pipefail
source benchmarks/gpu_setup.sh
arch=${1:-270m}
prepare_bench $arch
run=0
for case in ${2:-packed unsloth padded}; do
  run=$((run + 1))
  case $case in
    packed) args=(--case gemma_ft_defaults ${CHECK_ISOLATION:+--check-isolation}) ;;
    # gemma_ft's padded path at the plain script's settings, its offloaded checkpointing included: paired steps
    padded) args=(--case gemma_ft --set train.batching=padded --set lora.use_gradient_checkpointing=unsloth) ;;
    # the shipped defaults but with unsloth's offloaded checkpointing: the cost of checkpointing on its own
    packed_offload) args=(--case gemma_ft_defaults --set lora.use_gradient_checkpointing=unsloth) ;;
    # checkpointing off / a step of 32,768 tokens, whatever the planner would choose
    packed_nockpt) args=(--case gemma_ft_defaults --set lora.use_gradient_checkpointing=false) ;;
    packed_32k) args=(--case gemma_ft_defaults --set lora.use_gradient_checkpointing=false --set train.tokens_per_step=32768) ;;
    unsloth) args=(--case unsloth) ;;
    # the peers at the strongest settings they document (benchmarks/throughput.py CASES)
    unsloth_packing|unsloth_default|trl_packing|hf) args=(--case $case) ;;
    # no training: whether packed rows see each other on this GPU's kernels, at a small budget that compiles quickly
    isolation) args=(--case gemma_ft_defaults --isolation-only --set train.tokens_per_step=2048) ;;
    *) echo "unknown case $case (packed, packed_nockpt, packed_32k, packed_offload, padded, unsloth, unsloth_packing, unsloth_default, trl_packing, hf or isolation)" >&2; exit 2 ;;
  esac
  limit=$(time_left ${CASE_TIMEOUT:-600})
  [ $limit -gt 30 ] || { echo "$case skipped: no time left"; continue; }
  log=$OUT/epoch_${arch}_${run}_$case.log
  TORCH_LOGS=recompiles timeout $limit python3 benchmarks/throughput.py "${args[@]}" --arch $arch --epoch \
      --warmup ${WARMUP:-5} --max-len 2048 --timing window --logging-steps 5 \
      --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/results.jsonl > $log 2>&1
  echo "$case rc=$? $(grep -c '\[bench\] step' $log) steps, $(grep -c 'Recompiling' $log) recompiles; $(grep -o '"tokens_per_s": [0-9.]*' $log)"
done
