"""Every YAML composes against its schema; wrong types, unknown keys and bad values fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from gemma_ft.config import GROUP_SCHEMAS, Config
from gemma_ft.errors import ConfigError
from gemma_ft.validation import validate
from tests.helpers import CONF_DIR, compose_config, typed_config

ALL_YAML = sorted(CONF_DIR.rglob("*.yaml"))
# Sweep and launcher presets configure Hydra itself, not a schema group.
HYDRA_FILES = [p for p in ALL_YAML if p.parent.name in ("hparams_search", "launcher")]
GROUP_FILES = [p for p in ALL_YAML if p.parent != CONF_DIR and p not in HYDRA_FILES]
COMMANDS = ["config", "generate", "evaluate", "export"]  # conf/<command>.yaml: one per entry point


def test_every_yaml_is_found():
    # 4 command configs + 15 group files + 2 sweep presets: update when adding one.
    assert len(ALL_YAML) == 21
    assert sorted(p.stem for p in ALL_YAML if p.parent == CONF_DIR) == sorted(COMMANDS)
    assert {p.parent.name for p in GROUP_FILES} == set(GROUP_SCHEMAS)
    assert len(HYDRA_FILES) == 2


@pytest.mark.parametrize("command", COMMANDS[1:])
def test_command_configs_compose(command):
    import importlib

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    importlib.import_module(f"gemma_ft.{command}")  # registers its schema
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(command, overrides=["run=outputs/x", "file=f.csv"] if command == "evaluate" else ["run=outputs/x"])
    assert OmegaConf.to_object(cfg).run == "outputs/x"


def test_sweep_presets_compose():
    cfg = compose_config(["hparams_search=optuna_wd_lr"])
    assert cfg.optim.weight_decay == 0.001  # the search space lives in hydra.sweeper, the defaults stay


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_yaml_composes_and_validates(path: Path):
    cfg = typed_config([f"{path.parent.name}={path.stem}"])
    assert isinstance(cfg, Config)
    validate(cfg, has_cuda=True)  # GPU-only options (4-bit, 8-bit optimizers) are valid where a GPU is


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_yaml_extends_its_schema(path: Path):
    # Either the schema itself or a sibling YAML that does.
    from omegaconf import OmegaConf

    parents = OmegaConf.load(path).get("defaults", [])
    assert parents and parents[-1] == "_self_"
    first = parents[0]
    assert first == f"{path.parent.name}_schema" or (path.parent / f"{first}.yaml").exists()


def test_defaults_match_the_seed_notebook():
    cfg = typed_config()
    assert cfg.optim.weight_decay == 0.001
    assert cfg.train.save_steps == 500 and cfg.train.save_total_limit == 5
    assert (cfg.data.columns.system, cfg.data.columns.user, cfg.data.columns.assistant) == (
        "task", "input", "expected_output")
    assert cfg.model.name_or_path == "builtin:gemma3-270m"
    assert cfg.debug.example_index == 100


def test_public_keys_override():
    cfg = typed_config([
        "optim.weight_decay=0.01", "optim.lr=1e-4", "train.max_steps=10", "train.save_steps=7",
        "train.save_total_limit=2", "train.max_seq_length=256", "data.path=data.csv", "data.columns.system=null",
        "data.system_prompt=Be brief.", "data.val_size=0.2", "debug.verbose=true", "debug.show_examples=true",
        "debug.example_index=3", "model.name_or_path=/models/x",
    ])
    assert cfg.optim.weight_decay == 0.01 and cfg.optim.lr == 1e-4 and cfg.train.max_steps == 10
    assert cfg.data.columns.system is None and cfg.data.system_prompt == "Be brief."
    assert cfg.debug.verbose and cfg.debug.show_examples and cfg.debug.example_index == 3


def test_unknown_key_fails_at_composition_and_names_it():
    with pytest.raises(ConfigCompositionException, match="weight_deacy"):
        compose_config(["optim.weight_deacy=0.01"])


def test_wrong_type_fails_at_composition_and_names_it():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["train.max_steps=ten"])
    assert "max_steps" in str(info.value.__cause__ or info.value)


def test_unknown_key_in_a_yaml_fails(tmp_path):
    # A YAML that extends the schema cannot carry a key the schema lacks.
    from omegaconf import OmegaConf

    from gemma_ft.config import OptimConfig

    schema = OmegaConf.structured(OptimConfig)
    with pytest.raises((ConfigKeyError, ValidationError)):
        OmegaConf.merge(schema, {"weight_decayy": 0.1})


@pytest.mark.parametrize("override, key", [
    ("optim.lr=0", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("lora.r=0", "lora.r"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.max_steps=-2", "train.max_steps"),
    ("train.max_seq_length=8", "train.max_seq_length"),
    ("data.val_size=0", "data.val_size"),
    ("data.on_bad_rows=ignore", "data.on_bad_rows"),
    ("train.report_to=comet", "train.report_to"),
])
def test_out_of_range_values_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(typed_config([override]))


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate(typed_config(["optim.lr=0", "lora.r=0", "train.max_steps=0"]))
    message = str(info.value)
    assert "optim.lr" in message and "lora.r" in message and "train.max_steps" in message


@pytest.mark.parametrize("overrides, key", [(["model=gemma3_4b_it"], "model.load_in_4bit"),
                                            (["optim=adamw_8bit"], "optim.name=adamw_8bit")])
def test_gpu_only_options_are_refused_on_a_cpu(overrides, key):
    validate(typed_config(overrides), has_cuda=True)
    with pytest.raises(ConfigError, match=key + ".*needs a CUDA GPU"):
        validate(typed_config(overrides), has_cuda=False)


def test_four_bit_full_finetuning_is_refused():
    with pytest.raises(ConfigError, match="load_in_4bit"):
        validate(typed_config(["model.load_in_4bit=true", "model.full_finetuning=true"]))


@pytest.mark.parametrize("model, trains_head", [("gemma3_270m", True), ("tiny", True), ("gemma3_270m_it", False),
                                                ("gemma3_1b_it", False), ("gemma3_4b_it", False),
                                                ("gemma3_12b_it", False), ("gemma3_27b_it", False)])
def test_the_output_head_trains_by_default_only_for_a_base_model(model, trains_head):
    # An instruction-tuned model already ends its replies; the 4B's head alone is ~671M parameters.
    assert typed_config([f"model={model}"]).lora.train_lm_head is trains_head
    assert typed_config([f"model={model}", f"lora.train_lm_head={not trains_head}"]).lora.train_lm_head is not trains_head


def test_the_configs_ship_inside_the_package_and_the_top_level_conf_is_the_same_folder():
    import gemma_ft

    assert CONF_DIR == Path(gemma_ft.__file__).resolve().parent / "conf"
    assert (Path(__file__).resolve().parents[1] / "conf").resolve() == CONF_DIR
