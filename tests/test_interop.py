"""The authors' reference checkpoints, both ways (issue 22).

``fixtures/reference_dynet_parameters.json`` lists every parameter name and shape of the reference
``DyNet_large(decoder=True)`` (read from the public code, which is not part of this project);
reference-layout files are built from it here. Checked: every name maps, the architecture is read off
the shapes, the round trip is exact, the unused parameters are reported, a renamed or reshaped key
fails naming it, Lightning-style and bare files load (safely, or with ``--trust``), and restore,
evaluate and a 2-rank fine-tune take a reference file directly.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import deepspeed_cmd

from dynet import DyNet, DyNetConfig, count_parameters
from dyntrain.checkpoint import CheckpointError
from dyntrain.checkpoint.weights import load_weights, save_weights
from dyntrain.config import dynet_config_from_dict
from dyntrain.interop import (ReferenceFormatError, export_reference, from_reference, import_reference,
                              read_weights, to_reference, write_reference)


ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests/fixtures/reference_dynet_parameters.json").read_text())["parameters"]
UNUSED = {"reduce_noise_channel_1.weight", "reduce_noise_channel_2.weight", "reduce_noise_channel_3.weight"}


def reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A reference-layout state_dict with the fixture's names and shapes and random values."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in FIXTURE}


@pytest.fixture(scope="module")
def ref_state():
    return reference_state()


def test_every_reference_name_maps_and_the_architecture_is_the_papers(ref_state):
    imported = from_reference(ref_state)
    assert imported.config.to_dict() == DyNetConfig().to_dict()
    assert set(imported.dropped) == UNUSED
    model = DyNet(imported.config)
    model.load_state_dict(imported.state_dict, strict=True)
    assert count_parameters(model) == 16_613_135
    assert sum(v.numel() for v in imported.state_dict.values()) + 112_896 == sum(v.numel() for v in ref_state.values())
    # the prompts lose their leading axis of 1; every other tensor is moved as it is
    assert imported.state_dict["prompt_latent.gen.prompt"].shape == (5, 320, 16, 16)
    assert torch.equal(imported.state_dict["prompt_latent.gen.prompt"], ref_state["prompt3.prompt_param"][0])
    assert torch.equal(imported.state_dict["enc1.attn.qkv_dw.weight"], ref_state["encoder_level1.attn.qkv_dwconv.weight"])
    assert torch.equal(imported.state_dict["prompt2.proj.weight"], ref_state["reduce_noise_level1.weight"])


def test_round_trip_is_exact_bit_for_bit(ref_state):
    imported = from_reference(ref_state)
    back = to_reference(imported.state_dict, imported.config)
    assert {k: list(v.shape) for k, v in back.items()} == dict(FIXTURE)
    for name, tensor in ref_state.items():
        if name in UNUSED:
            assert not back[name].any()  # written as zeros: the authors' strict loader needs the names
        else:
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # and the other way: dyntrain -> reference -> dyntrain
    again = from_reference(back)
    assert all(torch.equal(again.state_dict[k], v) for k, v in imported.state_dict.items())


@pytest.mark.parametrize("change, named", [
    (lambda s: s.__setitem__("encoder_level2.attn.qkv_dwconvX.weight", s.pop("encoder_level2.attn.qkv_dwconv.weight")),
     ["encoder_level2.attn.qkv_dwconvX.weight", "encoder_level2.attn.qkv_dwconv.weight"]),
    (lambda s: s.__setitem__("decoder_level2.ffn.project_out.weight", torch.zeros(96, 254, 1, 1)),
     ["decoder_level2.ffn.project_out.weight", "(96, 254, 1, 1)", "(96, 255, 1, 1)"]),
    (lambda s: s.pop("refinement.3.norm2.body.bias"), ["refinement.3.norm2.body.bias"]),
    (lambda s: s.pop("prompt2.prompt_param"), ["prompt2.prompt_param", "missing"]),
])
def test_a_renamed_reshaped_or_missing_key_fails_naming_it_and_writes_nothing(ref_state, tmp_path, change, named):
    state = dict(ref_state)
    change(state)
    src = tmp_path / "bad.pth"
    torch.save(state, src)
    with pytest.raises(ReferenceFormatError) as err:
        import_reference(src, tmp_path / "out.safetensors")
    message = str(err.value)
    assert "\n" not in message and str(src) in message
    for text in named:
        assert text in message
    assert list(tmp_path.iterdir()) == [src]


def test_lightning_and_bare_files_load_alike_safely(ref_state, tmp_path):
    lightning = {"state_dict": {f"net.{k}": v for k, v in ref_state.items()}, "epoch": 119, "global_step": 2400,
                 "pytorch-lightning_version": "2.0.6", "optimizer_states": [{"state": {}, "param_groups": []}],
                 "callbacks": {"ModelCheckpoint{'monitor': None}": {"dirpath": "ckpt/"}}}
    torch.save(lightning, tmp_path / "all_in_one_model.ckpt")
    torch.save({f"module.{k}": v for k, v in ref_state.items()}, tmp_path / "ddp.pth")
    torch.save(ref_state, tmp_path / "bare.pt")
    outputs = {}
    for name in ("all_in_one_model.ckpt", "ddp.pth", "bare.pt"):
        path, imported = import_reference(tmp_path / name, tmp_path / f"{name}.safetensors")
        outputs[name], model_cfg = load_weights(path)
        assert DyNetConfig(**model_cfg).to_dict() == DyNetConfig().to_dict()
    assert imported.prefix == "" and from_reference(lightning["state_dict"]).prefix == "net."
    for name in ("ddp.pth", "bare.pt"):
        assert all(torch.equal(outputs[name][k], v) for k, v in outputs["all_in_one_model.ckpt"].items())
    assert json.loads(__import__("safetensors").safe_open(
        str(tmp_path / "all_in_one_model.ckpt.safetensors"), "pt").metadata()["info"])["step"] == 2400

    # Python objects beyond tensors (hyper-parameters as a Namespace): refused by the safe loader, named,
    # with the way on; accepted with trust=True
    lightning["hyper_parameters"] = {"opt": argparse.Namespace(lr=2e-4)}
    torch.save(lightning, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match=r"pickled.ckpt holds Python objects beyond tensors.*--trust"):
        import_reference(tmp_path / "pickled.ckpt", tmp_path / "p.safetensors")
    import_reference(tmp_path / "pickled.ckpt", tmp_path / "p.safetensors", trust=True)


def test_export_writes_what_the_authors_loader_reads(ref_state, tmp_path):
    """``DyNetModel.load_from_checkpoint`` loads ``state_dict`` strictly into a module whose ``net`` is
    the reference model, after reading ``pytorch-lightning_version``; the bare form is the state_dict."""
    imported = from_reference(ref_state)
    ours = save_weights(tmp_path / "w.safetensors", imported.state_dict, imported.config.to_dict())
    for out, form in ((tmp_path / "model.ckpt", "lightning"), (tmp_path / "model.pth", "state_dict")):
        export_reference(ours, out)
        obj = torch.load(out, map_location="cpu", weights_only=True)
        state = obj["state_dict"] if form == "lightning" else obj
        if form == "lightning":
            assert isinstance(obj["pytorch-lightning_version"], str) and "hyper_parameters" not in obj
            state = {k.removeprefix("net."): v for k, v in state.items()}
        assert {k: list(v.shape) for k, v in state.items()} == dict(FIXTURE)
        assert all(torch.equal(state[k], v) for k, v in ref_state.items() if k not in UNUSED)
    # the training step recorded in our file becomes the Lightning checkpoint's global_step
    for name in ("s.safetensors", "s.pt"):
        src = save_weights(tmp_path / name, imported.state_dict, imported.config.to_dict(), {"step": 1234})
        export_reference(src, tmp_path / f"{name}.ckpt")
        assert torch.load(tmp_path / f"{name}.ckpt", weights_only=True)["global_step"] == 1234
    export_reference(ours, tmp_path / "nostep.ckpt")
    assert torch.load(tmp_path / "nostep.ckpt", weights_only=True)["global_step"] == 0


def test_non_reference_files_pass_through_and_names_are_not_guessed(tmp_path):
    model = DyNet(DyNetConfig.tiny())
    own = save_weights(tmp_path / "own.pt", model.state_dict(), model.config.to_dict())
    state, cfg = read_weights(own)
    assert cfg == model.config.to_dict() and set(state) == set(model.state_dict())
    with pytest.raises(ReferenceFormatError, match="not in the reference layout"):
        import_reference(own, tmp_path / "x.safetensors")


# ------------------------------------------------------------------- the entry points, end to end
def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(cmd, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n---stderr---\n" + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """One tiny DyNet's weights as dyntrain's export and as a reference Lightning checkpoint (with
    non-zero unused parameters, as a trained release has), plus generated all-in-one data."""
    work = tmp_path_factory.mktemp("interop")
    torch.manual_seed(3)
    model = DyNet(DyNetConfig.tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # move the norms and biases off their initial values
    save_weights(work / "own.safetensors", model.state_dict(), model.config.to_dict())
    reference = to_reference(model.state_dict(), model.config)
    for name in UNUSED & set(reference):
        reference[name] = torch.randn_like(reference[name])
    write_reference(work / "release.ckpt", reference, form="lightning")
    _run([sys.executable, "-m", "dyntrain.data.finetune.paired", "demo", "--out", "data/finetune_demo",
          "--train-images", "4", "--test-images", "1", "--height", "40", "--width", "48"], work)
    return work


@pytest.mark.slow
def test_restore_and_evaluate_take_the_reference_file_as_they_take_the_export(tiny_files):
    from PIL import Image

    work = tiny_files
    hazy = work / "data/finetune_demo/test/sots/outdoor/hazy"
    for variant in ("S", "L"):
        for name in ("own.safetensors", "release.ckpt"):
            _run([sys.executable, ROOT / "launch/restore.py", "--checkpoint", name, "--variant", variant, hazy,
                  f"restored/{name}/{variant}"], work)
        (a,) = (work / "restored/own.safetensors" / variant).glob("*.jpg")
        (b,) = (work / "restored/release.ckpt" / variant).glob("*.jpg")
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    tables = []
    for name in ("own.safetensors", "release.ckpt"):
        proc = _run([sys.executable, ROOT / "launch/evaluate.py", "--checkpoint", name, "--variant", "all",
                     "--config", ROOT / "configs/finetune_quickstart.yaml", "eval.max_images=1",
                     "tracking.enabled=false"], work)
        lines = proc.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
        tables.append(lines[header:header + 4])
    assert tables[0] == tables[1] and tables[0][2].startswith("DyNet-S")


@pytest.mark.slow
def test_two_rank_finetune_starts_from_the_reference_file(tiny_files):
    work = tiny_files
    proc = _run(deepspeed_cmd(2, ROOT / "launch/finetune.py", "--config", ROOT / "configs/finetune_quickstart.yaml",
                              "init.checkpoint=release.ckpt", "run.max_steps=2", "eval.every=0", "checkpoint.every=0",
                              "tracking.enabled=false", "checkpoint.dir=ft", "deepspeed.zero_stage=1"), work)
    out = proc.stdout + proc.stderr
    assert "the authors' reference layout, converted" in out and "reduce_noise_channel_1.weight" in out
    assert "model architecture taken from init.checkpoint" in out
    assert (work / "ft/step_00000002/COMPLETE").is_file()
    tuned, cfg = load_weights(work / "ft")
    start, _ = load_weights(work / "own.safetensors")
    assert dynet_config_from_dict(cfg).dim == 8 and set(tuned) == set(start)
    # two AdamW steps at lr 2e-4 move each weight by about 2 * 2e-4: the run began at the file's weights
    assert max((tuned[k] - start[k]).abs().max().item() for k in start) < 2e-3


def test_convert_cli_both_ways_and_one_error_line(ref_state, tmp_path):
    torch.save({"state_dict": {f"net.{k}": v for k, v in ref_state.items()}}, tmp_path / "release.ckpt")
    convert = [sys.executable, ROOT / "launch/convert.py"]
    proc = _run([*convert, "--from", "reference", "release.ckpt", "--out", "w.safetensors"], tmp_path)
    assert "dropped 3 parameters the reference model registers but never uses: reduce_noise_channel_1.weight" \
        in proc.stdout and "16,613,135 parameters" in proc.stdout
    _run([*convert, "--to", "reference", "w.safetensors", "--out", "back.ckpt"], tmp_path)
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(back[f"net.{k}"], v) for k, v in ref_state.items() if k not in UNUSED)

    state = dict(ref_state)
    state["decoder_level1.attn.temperature"] = torch.ones(2, 1, 1)  # encoder level 1 has 1 head
    torch.save(state, tmp_path / "bad.pth")
    proc = subprocess.run([str(c) for c in (*convert, "--from", "reference", "bad.pth", "--out", "bad.safetensors")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "decoder_level1.attn.temperature" in errors[0], proc.stderr
    assert not (tmp_path / "bad.safetensors").exists()
