"""What every command that uses a finished run (generate, evaluate, export) checks before Hydra starts.

These checks need only the config schema and the run folder, so a typo, a missing `run=` or a wrong folder costs
one line and exit status 2 within a second or two, before torch loads, and Hydra never creates a missing run dir.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from gemma_ft.cli_checks import CONF_DIR, composition_error, parse_overrides, schema_keys, unknown_key_error
from gemma_ft.errors import ConfigError, UserError, fail

# What each mandatory key is, for the error that says it is missing.
REQUIRED_HINTS = {
    "run": "run=<folder of a finished training run>, e.g. run=outputs/my_run",
    "file": "file=<data file>, e.g. file=test.csv (any format training reads)",
}


def guard_command(program: str, config_name: str, schema: type, doc: str, required: tuple[str, ...] = ("run",),
                  problems: Callable[[object], list[str]] | None = None, argv: list[str] | None = None) -> None:
    """`--help` prints this command's own options and exits 0; any problem with the arguments ends the process
    with one line on stderr and exit status 2; otherwise returns and Hydra runs the command."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(command_help(program, config_name, doc))
        sys.exit(0)
    try:
        check_command_arguments(config_name, schema, args, required, problems)
    except UserError as exc:
        fail(program, str(exc))


def check_command_arguments(config_name: str, schema: type, args: list[str], required: tuple[str, ...],
                            problems: Callable[[object], list[str]] | None) -> object:
    """The typed config the arguments give, or ConfigError naming every problem found."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gemma_ft.config import register_configs

    stray = [a for a in args if "=" not in a and not a.startswith("-")]
    if stray:
        raise ConfigError(f"unexpected argument {stray[0]!r}: options are given as key=value (see --help)")
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    keys = schema_keys(schema)
    for override in parse_overrides(overrides):
        key = override.key_or_group
        if not key.startswith("hydra") and key not in keys:
            raise unknown_key_error(key, keys, "--help")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except Exception as exc:  # a value of the wrong type: Hydra names the key in its message
            raise ConfigError(composition_error(exc)) from None
    missing = [key for key in required if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise ConfigError("missing " + " and ".join(REQUIRED_HINTS[key] for key in missing))
    typed = OmegaConf.to_object(cfg)
    found = list(problems(typed)) if problems else []
    run_problem = finished_run_problem(Path(typed.run))
    if run_problem:
        found.insert(0, run_problem)
    if found:
        raise ConfigError("; ".join(found))
    return typed


def finished_run_problem(run_dir: Path) -> str | None:
    """Why `run_dir` is not a finished gemma_ft run, or None."""
    from gemma_ft.run_dir import RUN_CONFIG

    run_dir = run_dir.expanduser()
    hint = "point run at a finished gemma_ft run directory (outputs/<date>/<time> or outputs/<run.name>)"
    if not run_dir.exists():
        return f"run={run_dir} does not exist; {hint}"
    if not run_dir.is_dir():
        return f"run={run_dir} is a file, not a folder; {hint}"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        return f"run={run_dir} has no adapter/ (its training has not finished); {hint}"
    if not (run_dir / RUN_CONFIG).is_file():
        return f"run={run_dir} has no {RUN_CONFIG}; it was not made by gemma_ft"
    import yaml

    try:
        yaml.safe_load((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        return (f"run={run_dir}: its {RUN_CONFIG} is not valid YAML{line}; it was edited or damaged: restore it "
                "(it is the config the run trained with) or train the run again")
    return None


def data_file_problems(key: str, path: str) -> list[str]:
    """Why the data file named by `key=path` cannot be read, as a list of at most one message."""
    from gemma_ft.data.conversations import resolve_data_path

    try:
        resolved = resolve_data_path(path)
    except UserError as exc:
        return [str(exc).replace("data.path=", f"{key}=")]
    if not resolved.exists():
        return [f"{key}={path}: no such file ({resolved})"]
    return []


def command_help(program: str, config_name: str, doc: str) -> str:
    """The command's docstring, then its options as its YAML lists them (values are the defaults)."""
    options, skipping = [], False
    for line in (CONF_DIR / f"{config_name}.yaml").read_text(encoding="utf-8").splitlines():
        top_level = bool(line) and not line[0].isspace() and not line.startswith("#")
        if top_level:
            skipping = line.startswith(("defaults:", "hydra:"))
        if not skipping and not line.startswith("#") and line.strip():
            options.append("  " + line)
    return "\n".join([doc.strip(), "", f"Options of {program} (key=value; the defaults shown):", *options])
