"""Typed config: YAML + dotted overrides, round trips, and errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dyntrain.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides_take_precedence_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {seed: 5, max_steps: 100}\noptim: {lr: 3e-4}\n")
    cfg = load_config(path, ["run.max_steps=7", "model.variants={S: [1,1,1,1], XL: [5,6,6,9]}",
                             "schedule.variant_probs={S: 0.25, XL: 0.75}",
                             "data.train_urls=[s3://b/a.tar,s3://b/b.tar]"])
    assert cfg.run.seed == 5  # YAML over default
    assert cfg.run.max_steps == 7  # override over YAML
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)  # "3e-4" string
    assert cfg.model.variants == {"S": [1, 1, 1, 1], "XL": [5, 6, 6, 9]}
    assert cfg.data.train_urls == ["s3://b/a.tar", "s3://b/b.tar"]
    assert cfg.deepspeed.zero_stage == Config().deepspeed.zero_stage  # untouched default


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["run.seed=9", "deepspeed.bf16=true", "schedule.mode=fixed",
                             "schedule.fixed_variant=S", "checkpoint.dir=null"])
    saved = tmp_path / "resolved.yaml"
    cfg.save(saved)
    again = load_config(saved)
    assert again == cfg
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert again.checkpoint.dir is None and again.deepspeed.bf16 is True
    flat = cfg.flatten()
    assert flat["run.seed"] == 9 and flat["model.variants"] == {"S": [2, 3, 3, 4], "L": [4, 6, 6, 8]}


@pytest.mark.parametrize("override, fragment", [
    ("run.sead=1", "unknown config key run.sead"),
    ("optimiser.lr=1", "unknown config key optimiser"),
    ("schedule.variant_probs={S: 0.5, XL: 0.5}", "schedule.variant_probs.XL"),
    ("run.max_steps=ten", "run.max_steps: expected an integer"),
    ("run.max_steps=1.5", "run.max_steps: expected an integer"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("deepspeed.bf16=maybe", "deepspeed.bf16"),
    ("data.train_urls=s3://b/a.tar", "data.train_urls: expected a list"),
    ("model.variants={S: [1,2,3]}", "model.variants.S"),
    ("tracking.enabled=1", "tracking.enabled: expected true or false"),
    ("schedule.verify_timeout_s=0", "schedule.verify_timeout_s"),
    ("run.seed", "dotted.key=value"),
])
def test_unknown_keys_and_bad_types_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  crop_size: 64\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key data\.micro_batch"):
        load_config(path)


@pytest.mark.parametrize("name", ["pretrain.yaml", "quickstart.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert set(cfg.schedule.variant_probs) <= set(cfg.model.variants)


def test_pretrain_yaml_is_the_papers_recipe():
    cfg = load_config(ROOT / "configs" / "pretrain.yaml")
    assert cfg.data.crop_size == 128
    from dyntrain.train.engine import build_ds_config
    for world in (1, 2, 4):  # 32 samples per optimizer step whatever the GPU count
        assert build_ds_config(cfg, world)["train_batch_size"] == 32
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas) == ("adam", 1e-4, [0.9, 0.999])
    assert cfg.run.max_steps == 1_000_000
    assert cfg.schedule.mode == "dynamic" and cfg.schedule.variant_probs == {"S": 0.5, "L": 0.5}
    assert cfg.model.variants == {"S": [2, 3, 3, 4], "L": [4, 6, 6, 8]}
    assert cfg.deepspeed.bf16 in (True, "auto") and cfg.deepspeed.zero_stage >= 1


def test_model_section_is_dynet_config_every_field_from_yaml_and_command_line(tmp_path):
    import dataclasses

    from dynet import DyNetConfig

    from dyntrain.config import ARCHITECTURE_FIELDS, RUNTIME_FIELDS
    from dyntrain.train.model import build_model

    section = {f.name for f in dataclasses.fields(Config().model)}
    assert section == set(ARCHITECTURE_FIELDS) | set(RUNTIME_FIELDS)
    assert set(ARCHITECTURE_FIELDS) == {f.name for f in dataclasses.fields(DyNetConfig)} - {"checkpoint_blocks"}
    assert Config().model.to_dynet() == DyNetConfig()  # the defaults are the paper's model
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  dim: 8\n  prompt_heads: 2\n  prompt_dims: [8, 8, 16]\n  prompt_sizes: [16, 8, 4]\n"
                    "  num_refinement: 1\n  default_variant: S\n")
    cfg = load_config(path, ["model.prompt_len=3", "model.heads=[1,1,2,2]", "model.ffn_expansion=2",
                             "model.activation_checkpointing=true"])
    dyn = cfg.model.to_dynet()
    assert (dyn.dim, dyn.prompt_heads, dyn.prompt_len, dyn.heads, dyn.default_variant) == (8, 2, 3, (1, 1, 2, 2), "S")
    assert dyn.ffn_expansion == 2.0 and dyn.checkpoint_blocks is True
    assert load_config(None, ["model.prompt_heads=8"]).model.to_dynet().prompt_heads == 8
    assert build_model(cfg).config.prompt_heads == 2  # the model built from the section has it
    again = Config.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.model.prompt_heads == 2


@pytest.mark.parametrize("override, fragment", [
    ("model.prompt_heads=0", "model.prompt_heads"),
    ("model.prompt_heads=3", "not divisible by its 3 attention heads"),
    ("model.heads=[1,2,4]", "model.heads"),
    ("model.default_variant=XL", "model.default_variant"),
    ("model.in_channels=1", "out_channels must equal in_channels"),
])
def test_architecture_errors_come_from_dynet_config_and_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_stored_model_dicts_old_and_new_map_to_one_dynet_config():
    from dynet import DyNetConfig

    from dyntrain.config import dynet_config_from_dict

    old_section = {"dim": 8, "heads": [1, 2, 4, 8], "ffn_expansion": 2.66, "num_refinement": 1, "prompt_len": 5,
                   "prompt_dims": [8, 8, 16], "prompt_sizes": [16, 8, 4], "variants": {"S": [2, 3, 3, 4]},
                   "activation_checkpointing": True, "channels_last": False, "compile": True}
    expected = DyNetConfig.tiny(variants={"S": (2, 3, 3, 4)}, default_variant="S")
    assert dynet_config_from_dict(old_section) == expected  # derived default variant, no checkpointing
    assert dynet_config_from_dict(expected.to_dict()) == expected
    new_section = load_config(None, ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]",
                                     "model.num_refinement=1", "model.variants={S: [2,3,3,4]}",
                                     "schedule.variant_probs={S: 1}"]).to_dict()["model"]
    assert dynet_config_from_dict(new_section) == expected
    with pytest.raises(ConfigError, match="unknown architecture key widthh"):
        dynet_config_from_dict({"widthh": 3})
