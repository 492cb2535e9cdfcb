"""Checks of the command line that run before Hydra, so a typo costs one clear line and exit status 2.

Hydra's own messages for a wrong key span several lines and exit with status 1; here a wrong key gets the
closest valid key, a wrong group option the list of options, and a wrong value the schema's complaint.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path

from gemma_ft.config import Config
from gemma_ft.errors import ConfigError
from gemma_ft.run_dir import check_run_dir_location

# Inside the package, so a wheel install finds them; the repository's top-level conf/ links here.
CONF_DIR = Path(__file__).resolve().parent / "conf"


def schema_keys(schema: type = Config, prefix: str = "") -> set[str]:
    """Every dotted key of the typed config, e.g. "optim.weight_decay", "data.columns.user"."""
    keys = set()
    for name, kind in typing.get_type_hints(schema).items():
        keys.add(prefix + name)
        if dataclasses.is_dataclass(kind):
            keys |= schema_keys(kind, f"{prefix}{name}.")
    return keys


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's parse of key=value overrides; its grammar errors become one ConfigError line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except Exception as exc:  # Hydra's grammar errors
            raise ConfigError(f"cannot parse the override {override!r} ({str(exc).splitlines()[0]}); a value with "
                              "characters such as ; , : [ ] { } ( ) = ' \" or spaces, or non-ASCII letters, must be "
                              "quoted for Hydra and the shell, e.g. 'data.delimiter=\";\"'") from None
    return parsed


def unknown_key_error(key: str, keys: set[str], listing: str) -> ConfigError:
    """The error for a key no schema has: the closest valid key, or where to find the list."""
    close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"see {listing} for the keys"
    return ConfigError(f"unknown config key {key!r}; {hint}")


def composition_error(exc: Exception) -> str:
    """Hydra's composition error on one line, led by the key it names."""
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    where = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    return f"{where + ': ' if where else ''}{lines[0] if lines else cause}"


def typed_or_error(cfg):
    """The typed config, or one line naming the key whose value (an interpolation, a type) cannot be resolved."""
    from omegaconf.errors import OmegaConfBaseException

    from gemma_ft.config import to_typed

    try:
        return to_typed(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{key + ': ' if key else ''}{message}; fix the value or the interpolation "
                          "(`${oc.env:NAME}` needs NAME set, `${a.b}` needs the key a.b)") from None


def check_overrides(args: list[str]) -> None:
    """Raise ConfigError (one line) for the first wrong key, group option or value among the overrides."""
    if any(a in ("-sc", "--shell-completion") or a.startswith("--shell-completion=") for a in args):
        return  # its "install=bash" argument is not a config override
    overrides = [a for a in args if ("=" in a or a.startswith("~")) and not a.startswith("-")]
    multirun_at = next((i for i, a in enumerate(args) if a in ("-m", "--multirun")), None)
    if multirun_at is not None and any(a in overrides for a in args[:multirun_at]):
        raise ConfigError("-m (--multirun) must come before the overrides, e.g. "
                          "python -m gemma_ft -m optim.weight_decay=0.001,0.01")
    parsed = parse_overrides(overrides)
    keys = schema_keys()
    sweeping = False
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        if override.is_delete():
            if (CONF_DIR / key).is_dir():
                continue  # a group's default taken out (~hparams_search): Hydra checks it
            raise ConfigError(f"~{key}: a config key cannot be deleted (every key has a value in the schema); set "
                              f"{key}=<value> instead (`python -m gemma_ft --cfg job` shows the values)")
        sweeping |= override.is_sweep_override()
        if (CONF_DIR / key).is_dir():
            options = group_options(key)
            values = [override.value()] if not override.is_sweep_override() else list(override.sweep_iterator())
            for value in values:
                if str(value) not in options:
                    raise ConfigError(f"{key}={value} is not an option of group {key!r}; choose one of {options}")
        elif key not in keys:
            raise unknown_key_error(key, keys, "`python -m gemma_ft --cfg job`")
    hydra_dirs = {o.key_or_group: o.value() for o in parsed
                  if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir") and not o.is_sweep_override()}
    for key, value in hydra_dirs.items():
        if isinstance(value, str) and "${" not in value:  # a literal folder: checked as run.dir is
            try:
                check_run_dir_location(Path(os.path.abspath(Path(value).expanduser())))
            except ConfigError as exc:
                raise ConfigError(f"{key}={value}: {exc}") from None
    if not sweeping:
        _check_values(overrides, hydra_dirs.get("hydra.run.dir"))
        return
    # A sweep: every value of every swept key is composed once (the other swept keys at their first value), before
    # Hydra starts and claims the sweep folder: a value of the wrong type would end the whole sweep in Hydra.
    for variant in sweep_variants(parsed):
        try:
            _check_values(variant, check_run_dir=False)
        except ConfigError as exc:
            raise ConfigError(f"in the sweep, {exc}") from None


def sweep_variants(parsed: list) -> list[list[str]]:
    """The single-run override lists that together try each swept value once."""
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    sweeps = []
    for o in parsed:
        if o.is_sweep_override() and not o.key_or_group.startswith("hydra"):
            try:
                sweeps.append((o.get_key_element(), list(o.sweep_string_iterator())))
            except Exception:  # an interval or a tag for a search sweeper: its values are drawn later
                continue
    variants = []
    for index, (key, values) in enumerate(sweeps):
        others = [f"{k}={v[0]}" for i, (k, v) in enumerate(sweeps) if i != index and v]
        variants += [[*fixed, *others, f"{key}={value}"] for value in values]
    return variants


def _check_values(overrides: list[str], hydra_run_dir: str | None = None, check_run_dir: bool = True) -> None:
    """Compose and validate the single run's config: wrong types and cross-field problems, all at once."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from gemma_ft.config import register_configs
    from gemma_ft.validation import validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except ConfigCompositionException as exc:
            raise ConfigError(composition_error(exc)) from None
    typed = typed_or_error(cfg)
    if not check_run_dir:
        # A sweep's value: only what would stop Hydra itself (a wrong type, an unknown key). A value the checks
        # refuse (weight_decay=-1) fails its own job, marked in the summary, while the others run.
        return
    validate(typed)
    from gemma_ft.run_dir import plan_run

    # Before Hydra writes its files into the run dir: it must be a writable folder on a disk, and a finished run
    # must not be touched at all.
    literal = isinstance(hydra_run_dir, str) and "${" not in hydra_run_dir
    # normalised without touching the file system (`outputs/..` is the working directory; a name may be too long)
    run_dir = Path(os.path.abspath(hydra_run_dir if literal else typed.run.dir or f"outputs/{typed.run.name or ''}"))
    check_run_dir_location(run_dir)
    if literal or typed.run.name or typed.run.dir or typed.run.resume not in ("auto", "never"):
        plan_run(typed.run, run_dir)  # a run.resume path is checked wherever the run goes
