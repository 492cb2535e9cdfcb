"""Loss curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def plot_run_losses(log_history: list[dict], path: Path) -> None:
    """Train and eval loss against steps for one run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = curve(log_history, key)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep_eval_losses(curves: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    """Eval loss against steps, one line per sweep job through every logged evaluation, labelled by its override
    values. A job evaluated once is a large marker with its value written beside it, not a dot lost on the grid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    single = 0
    for label, (steps, values) in curves.items():
        if len(steps) == 1:
            single += 1
            ax.plot(steps, values, marker="D", markersize=10, linestyle="none", label=f"{label} (one evaluation)")
            ax.annotate(f"{values[0]:.4f}", (steps[0], values[0]), textcoords="offset points", xytext=(8, 4),
                        fontsize=8)
        else:
            ax.plot(steps, values, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    title = "Eval loss per sweep job"
    if single:
        title += " (train.eval_steps > 0 gives a curve per job)"
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
