"""The run directory: where a run writes, whether it resumes, and whether it may write at all.

A checkpoint counts only once gemma_ft has marked it complete (the marker is written after the trainer has
finished saving), so a checkpoint cut short by a crash is never resumed from.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from gemma_ft.config import RunConfig
from gemma_ft.errors import ConfigError

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"  # the typed config the run trained with: what generate, evaluate and export read
COMPLETE_MARKER = "gemma_ft_complete"
FINISHED_FILES = ("metrics.json", "adapter")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    resume_from: Path | None


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are reported and skipped."""
    found = []
    folder = checkpoint_dir(run_dir)
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _CHECKPOINT.match(path.name)
        if not match:
            continue
        if (path / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), path))
        else:
            log.warning("Skipping %s: it was not completely written (the process stopped while saving it)", path)
    return [path for _, path in sorted(found)]


def is_finished(run_dir: Path) -> bool:
    return all((run_dir / name).exists() for name in FINISHED_FILES)


def plan_run(cfg: RunConfig, run_dir: Path) -> RunPlan:
    """Decide where to resume from, refusing to overwrite a finished run unless run.overwrite=true."""
    if is_finished(run_dir) and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} holds a finished run (adapter and metrics.json); choose another run.name / run.dir, "
            "or set run.overwrite=true to replace it"
        )
    if cfg.resume == "never":
        if complete_checkpoints(run_dir) and not cfg.overwrite:
            raise ConfigError(
                f"{run_dir} has checkpoints and run.resume=never; use run.resume=auto to continue them, another "
                "run.name / run.dir, or run.overwrite=true to start over"
            )
        return RunPlan(run_dir, None)
    if cfg.resume == "auto":
        checkpoints = [] if cfg.overwrite else complete_checkpoints(run_dir)
        if checkpoints:
            log.info("Resuming from %s", checkpoints[-1])
        return RunPlan(run_dir, checkpoints[-1] if checkpoints else None)
    path = Path(cfg.resume).expanduser().resolve()
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"run.resume={cfg.resume!r} is not a checkpoint folder (no trainer_state.json); use auto, "
                          "never, or a path like outputs/<run>/checkpoints/checkpoint-500")
    if not (path / COMPLETE_MARKER).exists():
        raise ConfigError(f"run.resume={cfg.resume!r} was not completely written; pick an earlier checkpoint")
    return RunPlan(run_dir, path)


# Filesystems the kernel makes up (/proc, /sys, /dev, ...): writing a run there fails or writes into the kernel.
VIRTUAL_FILESYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                       "configfs", "pstore", "bpf", "mqueue", "fusectl", "efivarfs", "binfmt_misc", "autofs"}


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (from /proc/mounts), or None where the system does not say."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fields[2]
    return kind


def check_run_dir_location(run_dir: Path) -> None:
    """Refuse, before anything is written, a run dir below a file, on a virtual filesystem or in a folder that
    cannot be written."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run directory {run_dir}: {existing} is not a folder; set run.dir to a folder")
    kind = filesystem_type(existing)
    if kind in VIRTUAL_FILESYSTEMS:
        raise ConfigError(f"run directory {run_dir} is on {kind}, a virtual filesystem of the kernel; set run.dir to "
                          "a folder on a disk")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {run_dir}: {existing} is not writable; set run.dir to a writable folder")


def check_writable(run_dir: Path, needed_bytes: int) -> None:
    """Fail now, not after the first hour, if checkpoints cannot be written there."""
    check_run_dir_location(run_dir)
    probe = run_dir / f".write-test-{uuid.uuid4().hex}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write in the run directory {run_dir} ({exc.strerror or exc}); "
                          "set run.dir to a writable place") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise ConfigError(
            f"only {free / 2**30:.2f} GiB free in {run_dir}, a checkpoint needs about {needed_bytes / 2**30:.2f} GiB; "
            "free some space or set run.dir to a disk with more room"
        )
