"""Turn results.jsonl (one line per case run) into results JSON + a Markdown table with the target ratios.

A case run several times counts with the mean of its runs: run-to-run spread between processes on these hosts
was up to 14% (two identical gemma_ft runs, 2026-11-26). For the framework overhead (a few %), compare the runs
step by step instead: paired_steps.py (run_all.sh prints it).

    python benchmarks/report.py RESULTS.jsonl OUT_PREFIX     # writes OUT_PREFIX.json and OUT_PREFIX.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["gemma_ft", "gemma_ft_defaults", "unsloth", "unsloth_notebook", "hf"]
# (name, numerator case, denominator case, field, target, "ge" | "le")
RATIOS = [
    ("gemma_ft / unsloth tokens/s, same batch (framework overhead)", "gemma_ft", "unsloth", "tokens_per_s", 0.97, "ge"),
    ("gemma_ft / hf tokens/s", "gemma_ft", "hf", "tokens_per_s", 1.8, "ge"),
    ("gemma_ft / hf peak reserved memory", "gemma_ft", "hf", "peak_reserved_gib", 0.75, "le"),
    ("gemma_ft defaults / unsloth notebook tokens/s", "gemma_ft_defaults", "unsloth_notebook", "tokens_per_s", 1.2, "ge"),
    ("gemma_ft defaults / unsloth tokens/s, unsloth at gemma_ft's batch", "gemma_ft_defaults", "unsloth",
     "tokens_per_s", 1.2, "ge"),
    ("gemma_ft defaults / hf tokens/s", "gemma_ft_defaults", "hf", "tokens_per_s", 1.8, "ge"),
    ("gemma_ft defaults / hf peak reserved memory", "gemma_ft_defaults", "hf", "peak_reserved_gib", 0.75, "le"),
]


def mean(runs: list[dict], field: str) -> float:
    """A case run several times (alternating with the case it is compared with): the mean over its runs."""
    return sum(r[field] for r in runs) / len(runs)


def loss_gap(a: list[float], b: list[float]) -> float:
    """Largest relative difference between two loss curves over their common first steps (at most 20)."""
    n = min(len(a), len(b), 20)
    return max(abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n])) if n else float("nan")


def main(results_path: str, out_prefix: str) -> None:
    results = [json.loads(line) for line in Path(results_path).read_text().splitlines() if line.strip()]
    runs: dict[tuple, list[dict]] = {}
    for r in results:
        runs.setdefault((r["arch"], r["case"]), []).append(r)
    archs = list(dict.fromkeys(r["arch"] for r in results))
    lines = [f"GPU: {results[0]['gpu']}; measured bf16 matmul peak {results[0]['bf16_peak_tflops']:.0f} TFLOP/s.", "",
             ("| arch | case | batch x accum | sampling | optim | tokens/s | tokens/row | s/step (median) | "
              "peak reserved GiB | MFU | first step after start, s (compile cache) |"),
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(results, key=lambda r: (archs.index(r["arch"]), ORDER.index(r["case"]))):  # stable: cold first
        median = f"{r['median_s_per_step']:.3f}" if "median_s_per_step" in r else "-"  # older results lack it
        # Whether the cache held this run's shapes is not known beforehand: only whether it held anything.
        cache = "no compile" if r["case"] == "hf" else "cache not empty" if r["compile_cache_was_warm"] else "empty cache"
        lines.append(f"| {r['arch']} | {r['case']} | {r['batch']} x {r['grad_accum']} | {r['sampling']} | {r['optim'].removeprefix('OptimizerNames.').lower()} | "
                     f"{r['tokens_per_s']:,.0f} | {r['mean_tokens_per_row']:.0f} | {r['s_per_step']:.3f} ({median}) | "
                     f"{r['peak_reserved_gib']:.2f} | "
                     f"{100 * r['mfu']:.1f}% | {r['time_to_first_step_s']:.0f} ({cache}) |")
    lines += ["", "| arch | ratio | measured | target | met |", "| --- | --- | ---: | ---: | --- |"]
    checks = []
    for arch in archs:
        for name, num, den, field, target, sense in RATIOS:
            if (arch, num) in runs and (arch, den) in runs:
                value = mean(runs[(arch, num)], field) / mean(runs[(arch, den)], field)
                met = value >= target if sense == "ge" else value <= target
                counted = f"{len(runs[(arch, num)])}:{len(runs[(arch, den)])}"
                checks.append({"arch": arch, "ratio": name, "value": value, "target": target, "met": met,
                               "runs": counted})
                lines.append(f"| {arch} | {name} | {value:.3f} ({counted} runs) | {'>=' if sense == 'ge' else '<='} "
                             f"{target} | {'yes' if met else 'no'} |")
        if (arch, "gemma_ft") in runs and (arch, "unsloth") in runs:
            gap = loss_gap(runs[(arch, "gemma_ft")][0]["losses"], runs[(arch, "unsloth")][0]["losses"])
            checks.append({"arch": arch, "ratio": "loss curve gap, first 20 steps", "value": gap, "target": 0.01,
                           "met": gap <= 0.01})
            lines.append(f"| {arch} | largest relative loss difference gemma_ft vs unsloth, first 20 steps | "
                         f"{100 * gap:.3f}% | <= 1% | {'yes' if gap <= 0.01 else 'no'} |")
    Path(f"{out_prefix}.json").write_text(json.dumps({"results": results, "checks": checks}, indent=1) + "\n")
    Path(f"{out_prefix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:3])
