"""Framework overhead from two benchmark logs of the same batches: the cases see the same rows in the same order
(same data, seed and batch settings), so step N of one run is step N of the other. Their summed step times over
the timed steps both logged compare the two without the run-to-run spread of whole-run averages.

    python benchmarks/paired_steps.py BASELINE.log CANDIDATE.log [--warmup 5]
prints how many steps were paired and baseline time / candidate time (> 1: the candidate is faster).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

STEP = re.compile(r"\[bench\] step (\d+): ([0-9.]+) s, (\d+) tokens")


def step_times(log: Path) -> dict[int, tuple[float, int]]:
    """step -> (seconds, tokens) from a throughput.py log (the first line per step: rank 0 under torchrun)."""
    steps: dict[int, tuple[float, int]] = {}
    for match in STEP.finditer(log.read_text(errors="replace")):
        steps.setdefault(int(match[1]), (float(match[2]), int(match[3])))
    return steps


def paired_speed_ratio(baseline: Path, candidate: Path, warmup: int = 5) -> tuple[int, float]:
    base, cand = step_times(baseline), step_times(candidate)
    common = sorted(s for s in base.keys() & cand.keys() if s > warmup)
    if not common:
        raise SystemExit(f"no timed step in common between {baseline} and {candidate}")
    unequal = [s for s in common if base[s][1] != cand[s][1]]
    if unequal:
        raise SystemExit(f"steps {unequal[:5]} trained different token counts: not the same batches")
    return len(common), sum(base[s][0] for s in common) / sum(cand[s][0] for s in common)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    steps, ratio = paired_speed_ratio(args.baseline, args.candidate, args.warmup)
    print(f"{steps} paired steps: {args.candidate.name} runs at {ratio:.3f}x the speed of {args.baseline.name}")


if __name__ == "__main__":
    main()
