# One GPU, gemma_ft's default length-grouped batch order, for STEPS (default 56) steps: past the end of the sampler's
# first megabatch (50 batches, longest first), where the shortest batch is followed by the next megabatch's longest.
# Session 8 saw steps there take 12 s once and then ~1.2 s each, four times the ~0.3 s before. Dynamo's recompiles
# go into each log (TORCH_LOGS=recompiles). PARTS (default "plain defaults pad128"), in order, under one DEADLINE (s):
#   plain     the benchmark's settings (batch 8, unsloth's block compile off)
#   defaults  gemma_ft's shipped defaults (batch 8, unsloth's block compile on)
#   pad128    plain, with every batch padded to a multiple of 128 tokens
#   PARTS=plain bash benchmarks/length_grouped.sh
set -o pipefail
source benchmarks/gpu_setup.sh
export TRITON_CACHE_DIR=$GEMMA_FT_CACHE/triton TORCH_LOGS=recompiles
: ${DEADLINE:=450} ${STEPS:=56} ${PARTS:=plain defaults pad128}
nvidia-smi -L
mkdir -p $OUT/logs
prepare_bench 270m
B="benchmarks/throughput.py --arch 270m --steps $STEPS --warmup 10 --sampling group_by_length
   --model-dir /tmp/bench/gemma3-270m-random --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/length_grouped.jsonl"
for part in $PARTS; do
  case $part in
    plain) args="--case gemma_ft" compile_off=1 ;;
    defaults) args="--case gemma_ft_defaults" compile_off=0 ;;
    pad128) args="--case gemma_ft --pad-to-multiple-of 128" compile_off=1 ;;
  esac
  UNSLOTH_COMPILE_DISABLE=$compile_off timeout $(time_left 240) python3 $B $args --workdir /tmp/$part \
      > $OUT/logs/$part.log 2>&1
  echo "$part rc=$? at ${SECONDS}s"
done
python3 -c "
import json
for l in open('$OUT/length_grouped.jsonl'):
    d = json.loads(l)
    print(d['case'], 'pad', d['pad_to_multiple_of'], 'compile off', d['compile_disabled'], round(d['tokens_per_s']),
          'tok/s; steps 45-:', ' '.join(f'{t:.2f}s/{n}' for t, n in
                                       zip(d['step_times_s'][44:], d['step_padded_lengths_rank0'][44:])))
"
tar -C $OUT -czf $OUT/logs.tar.gz logs && rm -rf $OUT/logs
