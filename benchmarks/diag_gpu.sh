# Diagnosis only (timings overlap): why is an unsloth step slow on variable-length rows? Logs under $OUT.
# Needs py-spy (pip install py-spy, or its wheel in WHEELS_DIR). Results: README "Performance".
source benchmarks/gpu_setup.sh
prepare_bench 270m
mkdir -p /tmp/benchB /tmp/benchC; cp -r /tmp/bench/* /tmp/benchB/ 2>/dev/null; cp -r /tmp/bench/* /tmp/benchC/ 2>/dev/null
B="python3 benchmarks/throughput.py --arch 270m --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/diag.jsonl"
BENCH_STACK_DUMP_S=60 TORCH_LOGS=recompiles timeout 400 $B --case unsloth --steps 8 --warmup 2 > $OUT/A_unsloth_padfree.log 2>&1 &
PA=$!
UNSLOTH_PADDING_CHOICE=padded TORCH_LOGS=recompiles timeout 400 $B --case unsloth --steps 16 --warmup 4 --workdir /tmp/benchB > $OUT/B_unsloth_padded.log 2>&1 &
timeout 400 $B --case hf --steps 16 --warmup 4 --workdir /tmp/benchC > $OUT/C_hf.log 2>&1 &
sleep 150; for p in $(pgrep -f "case unsloth --steps 8"); do /tmp/site/bin/py-spy dump --pid $p --native > $OUT/A_pyspy1.txt 2>&1 || /tmp/site/bin/py-spy dump --pid $p > $OUT/A_pyspy1.txt 2>&1; done
sleep 60; for p in $(pgrep -f "case unsloth --steps 8"); do /tmp/site/bin/py-spy dump --pid $p > $OUT/A_pyspy2.txt 2>&1; done
wait
for f in $OUT/*.log; do echo "== $f"; grep "\[bench\] step\|tokens_per_s\|Error\|error" $f | head -40; done
nvidia-smi --query-gpu=name --format=csv,noheader
