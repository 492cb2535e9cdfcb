# One GPU, gemma_ft's default length-grouped batch order, for STEPS (default 56) steps: past the end of the sampler's
# first megabatch (50 batches, longest first), where the shortest batch is followed by the next megabatch's longest.
# Measured on an H200 (2026-11-27): before gemma_ft padded batches beyond one flex-attention block (129 tokens), step 50 (padded to 127
# tokens) took 58 s with gemma_ft's defaults, and 11 s with the block compile off, after which every step ran ~4x
# slower (benchmarks/results/2026-11-27-2xh200-ddp/4-batch16-independent-and-length-grouped/).
# PARTS (default "plain defaults"), in order, under one DEADLINE (s):
#   plain     the benchmark's settings (batch 8, unsloth's block compile off)
#   defaults  gemma_ft's shipped defaults (batch 8, unsloth's block compile on)
#   PARTS=plain bash benchmarks/length_grouped.sh
set -o pipefail
source benchmarks/gpu_setup.sh
export TRITON_CACHE_DIR=$GEMMA_FT_CACHE/triton
: ${DEADLINE:=450} ${STEPS:=56} ${PARTS:=plain defaults}
nvidia-smi -L
mkdir -p $OUT/logs
prepare_bench 270m
B="benchmarks/throughput.py --arch 270m --steps $STEPS --warmup 10 --sampling group_by_length
   --model-dir /tmp/bench/gemma3-270m-random --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer
   --out $OUT/length_grouped.jsonl"
for part in $PARTS; do
  case $part in
    plain) args="--case gemma_ft" compile_off=1 ;;
    defaults) args="--case gemma_ft_defaults" compile_off=0 ;;
  esac
  UNSLOTH_COMPILE_DISABLE=$compile_off timeout $(time_left 240) python3 $B $args --workdir /tmp/$part \
      > $OUT/logs/$part.log 2>&1
  echo "$part rc=$? at ${SECONDS}s"
done
python3 -c "
import json
for l in open('$OUT/length_grouped.jsonl'):
    d = json.loads(l)
    print(d['case'], 'compile off', d['compile_disabled'], round(d['tokens_per_s']),
          'tok/s; steps 45-:', ' '.join(f'{t:.2f}s/{n}' for t, n in
                                       zip(d['step_times_s'][44:], d['step_padded_lengths_rank0'][44:])))
"
tar -C $OUT -czf $OUT/logs.tar.gz logs && rm -rf $OUT/logs
