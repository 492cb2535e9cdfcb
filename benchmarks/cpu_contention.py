"""Two gemma_ft trainings on one CPU machine at once: how much slower is each than alone?

    python benchmarks/cpu_contention.py OUT_DIR [--steps 8]

Runs the embedded Gemma 3 270M on the chess sample for --steps steps (no evaluation, no exact match), first with
gemma_ft's core sharing (gemma_ft.cpu_share), then as before it (OMP_NUM_THREADS = all cores, OpenMP's default wait
policy): alone, then two processes started together. Reads each run's own train_runtime_s from metrics.json and
writes OUT_DIR/results.json with the slowdown of the pair against the lone run (2x is a fair share of the cores).
Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(run_dir: Path, steps: int, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "gemma_ft", f"train.max_steps={steps}", "train.exact_match_rows=0",
            "train.eval_steps=0", "train.save_steps=100000", "train.report_to=none", f"run.dir={run_dir}"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def training_seconds(processes: list[tuple[subprocess.Popen, Path]]) -> list[float]:
    seconds = []
    for process, run_dir in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{run_dir}: exit {process.returncode}\n{stderr[-2000:]}")
        seconds.append(json.loads((run_dir / "metrics.json").read_text())["train_runtime_s"])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", default="", help="run only the cases whose name starts with this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    settings = {
        "shared (gemma_ft)": base,
        # as before gemma_ft shared them: every process one thread per core, OpenMP's default wait policy
        "unshared (all cores each)": {**base, "OMP_NUM_THREADS": str(cores)},
    }
    settings = {name: env for name, env in settings.items() if not args.only or name.startswith(args.only)}
    results = {"cores": cores, "steps": args.steps, "date": time.strftime("%Y-%m-%d"), "cases": {}}
    for name, env in settings.items():
        tag = name.split(" (")[0].replace(", ", "-").replace(" ", "-")
        alone = training_seconds([(start(args.out / f"{tag}-alone", args.steps, env), args.out / f"{tag}-alone")])[0]
        pair_dirs = [args.out / f"{tag}-pair-{i}" for i in (1, 2)]
        pair = training_seconds([(start(d, args.steps, env), d) for d in pair_dirs])
        results["cases"][name] = {"alone_s": alone, "pair_s": pair, "slowdown": max(pair) / alone}
        print(f"{name}: alone {alone:.1f} s, beside a second training {pair[0]:.1f} / {pair[1]:.1f} s: "
              f"{max(pair) / alone:.2f}x", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
