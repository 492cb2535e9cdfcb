"""The run directory: where a run writes, whether it resumes, and whether it may write at all.

A checkpoint counts only once gemma_ft has marked it complete (the marker is written after the trainer has
finished saving), so a checkpoint cut short by a crash is never resumed from. A run that replaces an earlier one
(run.overwrite=true) writes into a staging folder inside the run directory and takes the earlier run's place only
once it has finished: until then the earlier results stay whole, and a failed overwrite loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gemma_ft.config import RunConfig
from gemma_ft.errors import ConfigError

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"  # the typed config the run trained with: what generate, evaluate and export read
TRAINING_INPUTS = "training_inputs.json"  # what shapes training: what a resume is checked against (resume_check)
# A resume with changed settings (run.resume_changed=true) keeps the earlier run's under these names.
BEFORE_RESUME = {TRAINING_INPUTS: "training_inputs.before-resume.json", RUN_CONFIG: "config.before-resume.yaml"}
COMPLETE_MARKER = "gemma_ft_complete"
LOCK_FILE = ".gemma_ft.lock"  # the process that owns the run directory: {"pid", "host", "since"}
# Written when a run claims its directory: {"pid", "host", "since"} of the process that last claimed it. A folder
# without it (or without a run's record, for runs made before it existed) was not made by gemma_ft.
RUN_MARKER = ".gemma_ft_run"
# What may already be in a folder that a new run goes into: a lock left by a run that died before claiming it.
NOT_CONTENT = (LOCK_FILE,)
# A lock file still empty this long after its creation was left by a process that died while creating it.
EMPTY_LOCK_GRACE_S = 10.0
FINISHED_FILES = ("metrics.json", "adapter")
OVERWRITE_STAGING = ".overwrite"  # an overwriting run's outputs until it has finished
REPLACED = ".replaced"  # the earlier run's outputs while the overwrite's take their place
# What a run writes into its directory (metrics.json last: with the adapter it marks the run finished). The log
# (gemma_ft.log), the lock and anything else in the folder are not the run's outputs: an overwrite leaves them.
RUN_OUTPUTS = (".hydra", RUN_CONFIG, TRAINING_INPUTS, *BEFORE_RESUME.values(), "checkpoints", "adapter",
               "samples.json", "history.json", "loss.png", "metrics.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    resume_from: Path | None
    # Where this run writes: the run dir, or its staging folder when it replaces an earlier run there
    work_dir: Path

    @property
    def replaces_earlier_run(self) -> bool:
        return self.work_dir != self.run_dir


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside the final name and rename: a reader (or a crash) never sees the file half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_OUTPUTS)


def is_a_run_dir(run_dir: Path) -> bool:
    """Whether gemma_ft made this folder a run's: its marker, or (for older runs) the record every run writes."""
    return (run_dir / RUN_MARKER).exists() or (run_dir / TRAINING_INPUTS).exists()


def run_owning(path: Path) -> Path | None:
    """The gemma_ft run whose own files `path` is or lies in (its record, results, adapter/, checkpoints/, log,
    lock), or None: what generate, evaluate and export must never write."""
    path = path.expanduser().absolute()
    own = {*RUN_OUTPUTS, "gemma_ft.log", LOCK_FILE, RUN_MARKER, OVERWRITE_STAGING, REPLACED}
    for folder in path.parents:
        if not (is_a_run_dir(folder) or ((folder / RUN_CONFIG).is_file() and (folder / "adapter").is_dir())):
            continue
        if path.relative_to(folder).parts[0] in own:
            return folder
    return None


def foreign_content(run_dir: Path) -> list[str]:
    """The names in `run_dir` that a new run could overwrite although gemma_ft did not write them: everything in a
    non-empty folder that is not a gemma_ft run dir."""
    if not run_dir.is_dir() or is_a_run_dir(run_dir):
        return []
    return sorted(entry.name for entry in run_dir.iterdir() if entry.name not in NOT_CONTENT)


def plan_run(cfg: RunConfig, run_dir: Path) -> RunPlan:
    """Decide where this run writes and where it resumes from, refusing a folder that holds files gemma_ft did not
    write, and a finished run unless run.overwrite=true. Reads the folder only: nothing is written or deleted here."""
    foreign = foreign_content(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"{run_dir} already holds files that gemma_ft did not write ({shown}); a run goes only into a new or "
            "empty folder, or its own earlier run: choose another run.name / run.dir"
        )
    if is_finished(run_dir) and not cfg.overwrite:
        raise ConfigError(
            f"{run_dir} holds a finished run (adapter and metrics.json); choose another run.name / run.dir, "
            "or set run.overwrite=true to replace it"
        )
    # An overwrite stages its outputs while an earlier run's are there; re-running it continues its own checkpoints.
    work_dir = run_dir / OVERWRITE_STAGING if cfg.overwrite and holds_a_run(run_dir) else run_dir
    if cfg.resume == "never":
        if complete_checkpoints(run_dir) and not cfg.overwrite:
            raise ConfigError(
                f"{run_dir} has checkpoints and run.resume=never; use run.resume=auto to continue them, another "
                "run.name / run.dir, or run.overwrite=true to start over"
            )
        return RunPlan(run_dir, None, work_dir)
    if cfg.resume == "auto":
        checkpoints = complete_checkpoints(work_dir)  # an overwrite's own, or none: see work_dir
        return RunPlan(run_dir, checkpoints[-1] if checkpoints else None, work_dir)
    path = Path(cfg.resume).expanduser().resolve()
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"run.resume={cfg.resume!r} is not a checkpoint folder (no trainer_state.json); use auto, "
                          "never, or a path like outputs/<run>/checkpoints/checkpoint-500")
    if not (path / COMPLETE_MARKER).exists():
        raise ConfigError(f"run.resume={cfg.resume!r} was not completely written; pick an earlier checkpoint")
    return RunPlan(run_dir, path, work_dir)


def start_work_dir(plan: RunPlan) -> None:
    """Once every check has passed: a staging folder left by an earlier overwrite that this run does not continue
    is removed; the folder this run writes into exists and is marked as this process's run."""
    if plan.replaces_earlier_run:
        continued = plan.resume_from is not None and plan.work_dir in plan.resume_from.parents
        if not continued:
            shutil.rmtree(plan.work_dir, ignore_errors=True)
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    # In the folder this run writes: an overwrite leaves the earlier run's folder as it was until it has finished.
    atomic_write_text(plan.work_dir / RUN_MARKER,
                      json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")


def claimed_by_this_process(run_dir: Path) -> bool:
    """Whether this process has claimed `run_dir` for its run (start_work_dir): only then may it write there."""
    try:
        holder = json.loads((run_dir / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def write_records(folder: Path, records: Mapping[str, Any]) -> None:
    """Config files of the run's record: name in the folder -> OmegaConf content."""
    from omegaconf import OmegaConf

    for name, content in records.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(content, folder / name)


def replace_earlier_run(plan: RunPlan) -> None:
    """The finished overwrite's outputs take the earlier run's place.

    The earlier metrics.json goes first and the new one comes last, so that at no moment does the folder count as
    finished with a mix of the two runs; what the earlier run wrote is deleted only once everything new is in place.
    """
    run_dir, staging, replaced = plan.run_dir, plan.work_dir, plan.run_dir / REPLACED
    shutil.rmtree(replaced, ignore_errors=True)
    replaced.mkdir()
    for name in ("metrics.json", *RUN_OUTPUTS):
        if (run_dir / name).exists():
            os.replace(run_dir / name, replaced / name)
    for name in (*(n for n in RUN_OUTPUTS if n != "metrics.json"), "metrics.json"):
        if (staging / name).exists():
            os.replace(staging / name, run_dir / name)
    shutil.rmtree(replaced)
    shutil.rmtree(staging)


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
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    name_max = _name_max(existing)
    for part in run_dir.parts:
        if len(part.encode()) > name_max:
            raise ConfigError(f"the run directory's name {part[:40] + '...'!r} is {len(part.encode())} bytes, longer "
                              f"than this file system allows ({name_max}); choose a shorter run.name / run.dir")
    if not existing.is_dir():
        raise ConfigError(f"run directory {run_dir}: {existing} is not a folder; set run.dir to a folder")
    kind = filesystem_type(existing)
    if kind in VIRTUAL_FILESYSTEMS:
        raise ConfigError(f"run directory {run_dir} is on {kind}, a virtual filesystem of the kernel; set run.dir to "
                          "a folder on a disk")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {run_dir}: {existing} is not writable; set run.dir to a writable folder")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, among others
        return False


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


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


def acquire_run_lock(run_dir: Path) -> Path:
    """Make this process the run directory's only owner, or raise ConfigError naming the process that owns it.

    Two runs into one directory would overwrite each other's checkpoints and adapter. A lock left by a process
    that is gone (on this host) is taken over with a warning; on another host gemma_ft cannot tell, and says so.
    """
    lock = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None:
                continue  # removed meanwhile, or left empty by a process that died creating it
            if holder.get("host") == me["host"] and (holder.get("pid") == me["pid"] or not _alive(holder.get("pid"))):
                if holder.get("pid") != me["pid"]:
                    log.warning("Taking over %s: the run that held it (pid %s) is gone", lock, holder.get("pid"))
                lock.unlink(missing_ok=True)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise ConfigError(
                f"{run_dir} is in use by another gemma_ft run (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {since}); wait for it to end or choose another run.name / run.dir (if that process is gone, "
                f"delete {lock})"
            ) from None
        with os.fdopen(fd, "w") as handle:
            json.dump({**me, "since": time.time()}, handle)
        return lock
    raise ConfigError(f"could not take the lock {lock}: other processes keep creating it; is another run starting?")


def release_run_lock(lock: Path) -> None:
    """Remove the lock if this process still owns it."""
    holder = _lock_holder(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict | None:
    try:
        text = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        if age > EMPTY_LOCK_GRACE_S:
            lock.unlink(missing_ok=True)
            return None
        return {"pid": None, "host": None, "since": time.time() - age}  # being written: held


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
