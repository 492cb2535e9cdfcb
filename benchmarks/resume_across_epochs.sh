# Resume across an epoch boundary (on a GPU, or a CPU), for each batching: an uninterrupted run, then the same run killed after
# the checkpoint inside epoch 2 and resumed; prints the largest step-loss, eval-loss and adapter-weight differences.
# Tiny model, 20 training rows in batches of 2 (10 steps an epoch), 14 steps, killed after checkpoint-12.
#   bash benchmarks/resume_across_epochs.sh        (logs under $OUT)
source benchmarks/gpu_setup.sh
mkdir -p ${OUT:=/tmp/out}
common="model=tiny data.val_size=580 train.per_device_train_batch_size=2 train.max_steps=14 train.save_steps=4
        train.logging_steps=1 train.eval_steps=0 train.exact_match_rows=0 train.report_to=none"
for batching in padded packed; do
  args="$common train.batching=$batching"
  python3 -m gemma_ft $args run.dir=/tmp/resume/$batching-straight > $OUT/resume_${batching}_straight.log 2>&1
  python3 -m tests.helpers.interrupted_cli sigkill-after-save 12 $args run.dir=/tmp/resume/$batching-killed \
    > $OUT/resume_${batching}_killed.log 2>&1
  python3 -m gemma_ft $args run.dir=/tmp/resume/$batching-killed > $OUT/resume_${batching}_resumed.log 2>&1
  python3 - /tmp/resume/$batching-straight /tmp/resume/$batching-killed $batching <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
straight, resumed, batching = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def losses(run):
    return {e["step"]: e["loss"] for e in json.loads((run / "history.json").read_text()) if "loss" in e}
a, b = losses(straight), losses(resumed)
eval_a, eval_b = (json.loads((r / "metrics.json").read_text())["eval_loss"] for r in (straight, resumed))
wa, wb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (straight, resumed))
print(f"{batching}: steps {sorted(a) == sorted(b) and len(a)}, max step-loss diff "
      f"{max(abs(a[s] - b[s]) for s in a):.2e} (steps 13-14: {max(abs(a[s] - b[s]) for s in (13, 14)):.2e}), "
      f"eval-loss diff {abs(eval_a - eval_b):.2e}, max adapter diff "
      f"{max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa):.2e}")
PY
done
