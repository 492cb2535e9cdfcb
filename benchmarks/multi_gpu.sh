# On one 2-GPU host: PARTS (default "speed resume") picks what runs, in order, under one DEADLINE (s, default 560).
#   speed        one GPU against two at BATCH rows per GPU (default 8), back to back: speed1 then speed2, which
#                also run alone and may repeat (PARTS="speed2 speed1 speed1 speed2": two pairs, each order once;
#                logs get _2, _3...); SAMPLING (default random; group_by_length: gemma_ft's default) orders the rows
#   resume       the documented torchrun command stopped by SIGTERM after step 10, then the same command again
#                to resume and finish (~300 s with a cold Triton cache)
#   find_unused, static_graph, bucket_view   two GPUs with that DistributedDataParallel option on (find_unused:
#                the Trainer's default for PEFT models; gemma_ft turns it off)
#   vote         gemma_ft's StopVote over NCCL: rank 1 votes to stop in the third of five rounds; every rank must
#                read it in the fourth (a few seconds)
#   local_metrics  the two-GPU run with TRL's per-step metrics left on each rank (not gathered after every forward
#                pass, a meeting of the ranks; the logged metrics are rank 0's): what that meeting costs
#   omp          the two-GPU run with OMP_NUM_THREADS = half the host's cores per rank (torchrun's default is 1)
#   independent  two one-GPU runs at once, one per GPU, that never communicate (independent.jsonl): what two GPUs
#                give on this host without DDP. Against speed1 it shows what running two processes costs the host
#                (shared cores, clocks, memory); against speed2 what DDP's collectives cost.
# Every GPU's utilisation and memory, and which process runs on which GPU, are logged each second meanwhile
# (logs/gpu_monitor.csv, logs/gpu_apps.csv): is each rank on its own card, and how busy is it?
# TIMING (default window): the GPUs are synchronised only at the ends of the timed steps, as in a run without the
# benchmark (step: around every step, a meeting of the ranks that a real run does not have; the earliest measurements timed so).
# LOGGING_STEPS (default 5, gemma_ft's default; 1 logs the whole loss curve, a meeting of the ranks every step).
# STEPS (default 20) timed steps after WARMUP (default 5) steps; PROFILE_STEPS (default 0) more steps under
# torch.profiler for the speed parts (logs/profile_*_rankN.txt: GPU kernel time against wall time, top ops by GPU
# and host time, and the Python call sites where the host may wait for the GPU).
# Random-init Gemma 3 270M architecture (ARCH=1b or 4b for the speed parts), realistic-length rows, unsloth's block
# compile off (UNSLOTH_COMPILE_DISABLE=1: the comparison is between GPU counts, not compile states). Results under $OUT;
# SAVE_COMPILE_CACHE=1 also packs the Triton kernels compiled here ($OUT/compile_cache_triton.tar.xz; put it in COMPILE_CACHE_DIR,
# which gpu_setup.sh unpacks).
#   PARTS=resume bash benchmarks/multi_gpu.sh
set -o pipefail
source benchmarks/gpu_setup.sh
export UNSLOTH_COMPILE_DISABLE=1
# unsloth's Triton kernels take ~70 s to compile in a run's first two steps: keep them across runs and calls
export TRITON_CACHE_DIR=$GEMMA_FT_CACHE/triton
: ${DEADLINE:=560} ${PARTS:=speed resume} ${ARCH:=270m} ${BATCH:=8} ${SAMPLING:=random} ${STEPS:=20} ${WARMUP:=5}
: ${PROFILE_STEPS:=0} ${TIMING:=window} ${LOGGING_STEPS:=5}
nvidia-smi -L
mkdir -p $OUT/logs
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -l 1 > $OUT/logs/gpu_monitor.csv &
while sleep 5; do nvidia-smi --query-compute-apps=timestamp,gpu_bus_id,pid,used_memory --format=csv,noheader; done \
    > $OUT/logs/gpu_apps.csv &
prepare_bench 270m $ARCH  # 270m for the resume part
B="benchmarks/throughput.py --case gemma_ft --arch $ARCH --batch $BATCH --sampling $SAMPLING
   --steps $STEPS --warmup $WARMUP --profile-steps $PROFILE_STEPS --timing $TIMING --logging-steps $LOGGING_STEPS
   --model-dir /tmp/bench/gemma3-$ARCH-random
   --tokenizer $GEMMA_FT_CACHE/gemma3-tokenizer --out $OUT/multi_gpu.jsonl"
C="$BENCH_270M_OVERRIDES train.per_device_train_batch_size=8 train.sampling=random train.eval_steps=0
   train.exact_match_rows=4 train.max_new_tokens=16 train.report_to=none train.save_steps=10 train.logging_steps=1
   optim.warmup_steps=5 debug.verbose=true run.dir=/tmp/ddp_run"
one_gpu() {  # GPU index, log name, extra throughput.py arguments...: one benchmark run on that GPU alone
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout $(time_left 300) python3 $B --workdir /tmp/$name \
      --profile-out $OUT/logs/profile_$name.txt "$@" > $OUT/logs/$name.log 2>&1
}
two_gpus() {  # log name (gpu2_batch$BATCH*), extra throughput.py arguments...: one benchmark run over 2 GPUs
  local name=$1; shift
  timeout $(time_left 300) torchrun --nproc_per_node 2 $B --workdir /tmp/$name --profile-out $OUT/logs/profile_$name.txt \
      "$@" > $OUT/logs/$name.log 2>&1
}
declare -A ddp_option=([find_unused]=find_unused_parameters [static_graph]=static_graph [bucket_view]=gradient_as_bucket_view)
declare -A runs  # how often each part ran so far: a repeat's logs get _2, _3, ...
for part in $(echo " $PARTS " | sed 's/ speed / speed1 speed2 /g'); do
  runs[$part]=$(( ${runs[$part]:-0} + 1 ))
  n=$([ ${runs[$part]} = 1 ] || echo _${runs[$part]})
  case $part in
    speed1)
      one_gpu 0 gpu1_batch$BATCH$n
      echo "1 GPU x $BATCH rc=$? at ${SECONDS}s" ;;
    speed2)
      two_gpus gpu2_batch$BATCH$n
      echo "2 GPUs x $BATCH rc=$? at ${SECONDS}s" ;;
    resume)
      timeout $(time_left 180) torchrun --nproc_per_node 2 -m tests.helpers.interrupted_cli sigterm 10 $C \
          > $OUT/logs/ddp_interrupted.log 2>&1
      echo "interrupted rc=$? at ${SECONDS}s; checkpoints: $(ls /tmp/ddp_run/checkpoints)"
      timeout $(time_left 300) torchrun --nproc_per_node 2 -m gemma_ft $C > $OUT/logs/ddp_resumed.log 2>&1
      echo "resumed rc=$? at ${SECONDS}s"
      cp /tmp/ddp_run/history.json $OUT/logs/ddp_history.json 2>/dev/null
      cp /tmp/ddp_run/metrics.json $OUT/logs/ddp_metrics.json 2>/dev/null
      ls /tmp/ddp_run ;;
    independent)
      for gpu in 0 1; do
        one_gpu $gpu independent_gpu${gpu}_batch$BATCH$n --out $OUT/independent_gpu$gpu.jsonl &
        pids[$gpu]=$!
      done
      wait ${pids[0]}; rc0=$?; wait ${pids[1]}; rc1=$?
      cat $OUT/independent_gpu[01].jsonl >> $OUT/independent.jsonl 2>/dev/null; rm -f $OUT/independent_gpu[01].jsonl
      echo "2 independent GPUs x $BATCH rc=$rc0,$rc1 at ${SECONDS}s" ;;
    vote)
      timeout $(time_left 120) torchrun --nproc_per_node 2 benchmarks/stop_vote_check.py > $OUT/logs/vote.log 2>&1
      echo "stop vote over NCCL rc=$? at ${SECONDS}s: $(grep -h 'rank' $OUT/logs/vote.log | tr '\n' ' ')" ;;
    local_metrics)
      two_gpus gpu2_batch${BATCH}_local_metrics$n --rank-local-metrics
      echo "2 GPUs x $BATCH, rank-local TRL metrics rc=$? at ${SECONDS}s" ;;
    omp)
      threads=$(( $(nproc) / 2 ))
      OMP_NUM_THREADS=$threads two_gpus gpu2_batch${BATCH}_omp$n
      echo "2 GPUs x $BATCH, OMP_NUM_THREADS=$threads rc=$? at ${SECONDS}s" ;;
    find_unused|static_graph|bucket_view)
      two_gpus gpu2_batch${BATCH}_$part$n --ddp ${ddp_option[$part]}=true
      echo "2 GPUs x $BATCH, ${ddp_option[$part]} rc=$? at ${SECONDS}s" ;;
  esac
done
python3 -c "
import json, os, zlib
for name in ('multi_gpu', 'independent'):
    path = '$OUT/' + name + '.jsonl'
    for l in open(path) if os.path.exists(path) else []:
        d = json.loads(l)
        pinned = d.get('step_pinned_host_allocs_by_rank', [])  # per rank and step: (blocks, seconds)
        print(name, d['gpus'], 'x', d['batch'], d['sampling'], 'DDP', d.get('ddp'), 'OMP', d.get('omp_num_threads'),
              'local metrics', d.get('rank_local_metrics'),
              round(d['tokens_per_s']), 'tok/s', round(d['s_per_step'], 3), 's/step, median',
              round(d['median_s_per_step'], 3), round(d['peak_reserved_gib'], 2), 'GiB', d['losses'][:20],
              # the same for runs that trained every rank on the same rows
              'batches', zlib.crc32(json.dumps(d.get('step_token_id_sums_by_rank')).encode()),
              # per rank: seconds spent pinning host memory, and the steps (1-based) that pinned any
              'pinned s', [round(sum(s for _, s in r), 2) for r in pinned],
              'at steps', [[i + 1 for i, (n, _) in enumerate(r) if n] for r in pinned])
"
kill %1 %2 2>/dev/null
if [ "${SAVE_COMPILE_CACHE:-0}" = 1 ]; then
  tar -C $GEMMA_FT_CACHE -cJf $OUT/compile_cache_triton.tar.xz triton && ls -la $OUT/compile_cache_triton.tar.xz
fi
for profile in $OUT/logs/profile_*; do [ -f $profile ] && echo "$(basename $profile): $(head -1 $profile)"; done
# $OUT brings back at most 8 files: the logs travel as one archive.
tar -C $OUT -czf $OUT/logs.tar.gz logs && rm -rf $OUT/logs
