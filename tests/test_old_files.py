"""Files written before the model schema of issue 10 (tests/fixtures/old_format, made by commit
d7b5931: a DeepSpeed checkpoint folder and its safetensors export, whose model dict is the config's
older ``model`` section) still load, as weights, as a restore model and as ``init.checkpoint``, and
compute the outputs stored beside them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dyntrain.config import dynet_config_from_dict, load_config
from dyntrain.checkpoint.weights import checkpoint_info, consolidated_weights, load_weights, save_weights

OLD = Path(__file__).resolve().parent / "fixtures" / "old_format"
CKPT, EXPORT = OLD / "checkpoint", OLD / "export.safetensors"
# the architecture the fixtures were made with (tests/fixtures/make_old_fixtures.py)
ARCH = {"dim": 4, "heads": (1, 2, 4, 8), "prompt_len": 2, "prompt_dims": (4, 4, 4), "prompt_sizes": (4, 4, 2),
        "num_refinement": 1, "ffn_expansion": 2.0, "prompt_heads": 4, "default_variant": "L"}


@pytest.fixture(scope="module")
def reference():
    return torch.load(OLD / "reference.pt")


def test_the_fixtures_hold_the_old_model_section():
    from dyntrain.checkpoint import read_client_state

    old_section = read_client_state(CKPT)["client"]["config"]["model"]
    assert "prompt_heads" not in old_section and "compile" in old_section  # the pre-issue-10 form
    _, meta_cfg = load_weights(EXPORT)
    assert "prompt_heads" not in meta_cfg and "activation_checkpointing" in meta_cfg
    dyn = dynet_config_from_dict(old_section)
    for key, value in ARCH.items():
        assert getattr(dyn, key) == value, key
    assert dynet_config_from_dict(meta_cfg) == dyn and dyn.checkpoint_blocks is False


def test_old_export_and_checkpoint_hold_the_same_weights():
    from_export, _ = load_weights(EXPORT)
    from_ckpt, model_cfg, info = consolidated_weights(CKPT)
    assert info["step"] == 2 and checkpoint_info(EXPORT)["step"] == 2
    assert set(from_export) == set(from_ckpt) and len(from_export) == 146
    for k, v in from_ckpt.items():
        assert from_export[k].dtype == torch.float32 and torch.equal(from_export[k], v), k
    assert dynet_config_from_dict(model_cfg).to_dict()["prompt_heads"] == 4  # the old section, read


@pytest.mark.parametrize("name, path", [("checkpoint", CKPT), ("export", EXPORT)])
def test_old_files_restore_the_stored_outputs(reference, name, path):
    from dyntrain.restore import load_model

    model = load_model(path)
    with torch.no_grad():
        for variant in ("S", "L"):
            out = model(reference["input"], variant=variant)
            assert torch.allclose(out, reference[f"{name}/{variant}"], rtol=0, atol=1e-6), (name, variant)
    assert not torch.equal(reference[f"{name}/S"], reference[f"{name}/L"])


def test_old_checkpoint_as_init_checkpoint_sets_the_architecture(reference):
    from dyntrain.jobs.finetune import adopt_architecture, make_model_builder, read_init_weights

    cfg = load_config(None, [f"init.checkpoint={CKPT}"])  # the paper's widths: they must be replaced
    state, model_cfg = read_init_weights(cfg)
    changed = adopt_architecture(cfg, model_cfg)
    assert any(c.startswith("dim: 48 -> 4") for c in changed)
    assert cfg.model.prompt_dims == [4, 4, 4] and cfg.model.ffn_expansion == 2.0
    model = make_model_builder(cfg, state)(cfg).eval()
    with torch.no_grad():
        out = model(reference["input"], variant="L")
    assert torch.allclose(out, reference["checkpoint/L"], rtol=0, atol=1e-6)


def test_a_new_export_of_an_old_checkpoint_stores_dynet_config_and_round_trips(tmp_path, reference):
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    shutil.copytree(CKPT, ckpt)
    out = tmp_path / "new.safetensors"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "launch" / "export.py"), "--checkpoint", str(ckpt),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    state, model_cfg = load_weights(out)
    assert model_cfg == dynet_config_from_dict(model_cfg).to_dict()  # DyNetConfig's own dict
    old, _ = load_weights(EXPORT)
    assert all(torch.equal(state[k], v) for k, v in old.items())
    save_weights(tmp_path / "again.pt", state, model_cfg)
    assert load_weights(tmp_path / "again.pt")[1] == model_cfg
