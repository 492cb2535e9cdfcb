# Sourced at the start of every GPU benchmark script. Expects the project installed (`pip install -e ".[test]"`,
# plus bitsandbytes on the GPU machine). Optional, for a machine without PyPI or the model's GGUF package:
#   WHEELS_DIR          a folder of wheels installed (no index, no deps) into /tmp/site before anything runs;
#   TOKENIZER_ARCHIVE   a tar.xz of the Gemma 3 tokenizer folder (`tar -C ~/.cache/gemma_ft/gemma3-tokenizer -cJf X .`);
#   COMPILE_CACHE_DIR   a folder of compile_cache_*.tar.xz written by run_all.sh/multi_gpu.sh with SAVE_COMPILE_CACHE=1,
#                       unpacked so the run starts with a warm compile cache.
#   source benchmarks/gpu_setup.sh
if [ -n "$WHEELS_DIR" ] && [ ! -d /tmp/site/unsloth ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS_DIR"/*.whl 2>&1 | grep -v "WARNING" | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

export GEMMA_FT_CACHE=${GEMMA_FT_CACHE:-/tmp/gemma_ft_cache}
if [ -n "$TOKENIZER_ARCHIVE" ]; then
  mkdir -p $GEMMA_FT_CACHE/gemma3-tokenizer && tar -C $GEMMA_FT_CACHE/gemma3-tokenizer -xJf "$TOKENIZER_ARCHIVE"
  touch $GEMMA_FT_CACHE/gemma3-tokenizer/.complete
else  # built from the embedded GGUF's vocabulary, once
  python3 -c "from gemma_ft.models.builtin import resolve_builtin; resolve_builtin('builtin:gemma3-tokenizer')"
fi
for cache in ${COMPILE_CACHE_DIR:-/nonexistent}/compile_cache_*.tar.xz; do
  [ -f "$cache" ] && [ ! -e "$GEMMA_FT_CACHE/.unpacked_$(basename $cache)" ] || continue
  tar -C $GEMMA_FT_CACHE -xJf "$cache" && touch "$GEMMA_FT_CACHE/.unpacked_$(basename $cache)" && echo "unpacked $cache"
done
# The benchmark's rows (/tmp/bench/data.csv) and random-init models (/tmp/bench/gemma3-ARCH-random), once each.
prepare_bench() {  # arch...
  for arch; do
    python3 benchmarks/throughput.py --prepare-only --arch $arch --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer 2>&1 | tail -1
  done
}
# `python -m gemma_ft` on the benchmark's rows and random-init 270M (after `prepare_bench 270m`), 20 steps.
BENCH_270M_OVERRIDES="model.name_or_path=/tmp/bench/gemma3-270m-random data.path=/tmp/bench/data.csv
  data.columns.system=null data.val_size=16 train.max_seq_length=2048 lora.train_lm_head=false train.max_steps=20"
# Seconds a run may take: at most $1, and no later than DEADLINE seconds after the calling script started.
time_left() { local left=$(( ${DEADLINE:-100000} - SECONDS )); echo $(( left < $1 ? left : $1 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
