"""The task curriculum (active tasks per step, per-sample task draw, LR restarts) and the synthetic
fine-tuning source (agreement across ranks, exact resume mid-period, skipped small images, config
errors)."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from dyntrain.config import ConfigError, load_config
from dyntrain.data.finetune.tasks import TaskCurriculum
from dyntrain.data.finetune.degradations import DegradationError
from dyntrain.data.finetune.synthetic_pairs import SyntheticPairLoader, scan_clean
from dyntrain.train.schedule import uniform_at

ORDER = ["sr", "blur", "noise", "jpeg", "rain", "haze", "lowlight"]


def seq(**kw):
    args = dict(mode="sequential", order=ORDER, period_steps=4, periods=10, lr=1e-3, min_lr=1e-5)
    args.update(kw)
    return TaskCurriculum(3, {t: 1 for t in ORDER}, **args)


def test_active_tasks_per_step_and_uniform_draw():
    c = seq()
    assert c.active_at(0) == ["sr"] and c.active_at(3) == ["sr"] and c.active_at(4) == ["sr", "blur"]
    assert c.active_at(27) == ORDER and c.active_at(39) == ORDER and c.period_at(1000) == 10
    for step in (0, 5, 13, 30):
        draws = Counter(c.task_at(step, i) for i in range(3000))
        active = c.active_at(step)
        assert set(draws) == set(active)
        assert all(abs(n / 3000 - 1 / len(active)) < 0.04 for n in draws.values())  # uniform
    three = TaskCurriculum(0, {"denoise": 1, "derain": 1, "dehaze": 1}, "sequential",
                           ["derain", "denoise", "dehaze"], 2, 3)
    assert [three.active_at(s) for s in (0, 2, 5)] == [["derain"], ["derain", "denoise"],
                                                        ["derain", "denoise", "dehaze"]]
    mixed = TaskCurriculum(0, {"noise": 3, "rain": 1, "haze": 0}, "mixed")
    draws = Counter(mixed.task_at(7, i) for i in range(4000))
    assert set(draws) == {"noise", "rain"} and abs(draws["noise"] / 4000 - 0.75) < 0.03
    assert mixed.lr_at(5) is None and mixed.active_at(100) == ["noise", "rain"]


def test_task_draw_is_independent_of_the_variant_draw():
    c = TaskCurriculum(3, {"a": 1, "b": 1}, "mixed")  # same seed as the variant draw below
    both = Counter((c.task_at(s, 0), uniform_at(3, s) < 0.5) for s in range(4000))
    assert all(abs(n / 4000 - 0.25) < 0.03 for n in both.values()) and len(both) == 4


def test_lr_restarts_at_period_boundaries():
    c = seq()
    lrs = [c.lr_at(s) for s in range(12)]
    for start in (0, 4, 8):
        assert lrs[start] == pytest.approx(1e-3)
        assert lrs[start] > lrs[start + 1] > lrs[start + 2] > lrs[start + 3]
    assert lrs[2] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 2 / 4)))
    w = seq(warmup_steps=2)
    assert [round(w.lr_at(s) / 1e-3, 4) for s in (4, 5, 6)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]


def clean_folder(path, sizes):
    path.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def loader(images, rank, world, curriculum, accum=1):
    return SyntheticPairLoader(images, curriculum, "in", 32, 3, 5, rank, world, accum, "cpu")


def test_ranks_agree_and_resume_mid_period_is_exact(tmp_path):
    images, small = scan_clean([str(clean_folder(tmp_path / "c", [(40, 48), (20, 64), (36, 36)]))], 32)
    assert len(images) == 2 and len(small) == 1  # the 20 px image is skipped and counted
    c = seq(period_steps=2)
    ranks = [loader(images, r, 2, c, accum=2) for r in range(2)]
    for step in range(5):
        for micro in range(2):
            for r, ld in enumerate(ranks):
                batch = next(ld)
                first = (micro * 2 + r) * 3
                assert batch["tasks"] == [c.task_at(step, first + i) for i in range(3)]
                assert set(batch["tasks"]) <= set(c.active_at(step))
                assert batch["input"].shape == (3, 3, 32, 32) and 0 <= float(batch["input"].min())
    straight = loader(images, 1, 2, c)
    for _ in range(3):
        next(straight)
    state = straight.state_dict()
    expect = [next(straight) for _ in range(3)]  # steps 3..5: across the period boundary at 4
    resumed = loader(images, 1, 2, c)
    resumed.load_state_dict(state)
    for want in expect:
        got = next(resumed)
        assert got["keys"] == want["keys"] and got["tasks"] == want["tasks"]
        assert torch.equal(got["input"], want["input"]) and torch.equal(got["target"], want["target"])
    assert resumed.stats() == straight.stats()
    with pytest.raises(DegradationError, match="cannot be resumed exactly"):
        loader(images, 1, 2, seq(period_steps=3)).load_state_dict(state)


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match=r"data.tasks: unknown tasks \['fog'\] \(known: \['sr'"):
        load_config(None, overrides=["data.source=synthetic", "data.tasks={fog: 1}"])
    with pytest.raises(ConfigError, match=r"data.preset: unknown preset 'mid' \(known: \['in', 'out'\]\)"):
        load_config(None, overrides=["data.source=synthetic", "data.tasks={noise: 1}", "data.preset=mid"])
    with pytest.raises(ConfigError, match="schedule.tasks.mode"):
        load_config(None, overrides=["schedule.tasks.mode=curriculum"])
    with pytest.raises(ValueError, match=r"schedule.tasks.order: tasks \['rain'\] are not in data.tasks"):
        TaskCurriculum(0, {"noise": 1}, "sequential", ["noise", "rain"])


def test_promptir_tasks_follow_the_curriculum_and_resume_exactly(tmp_path):
    from dyntrain.data.finetune.paired import build_finetune_loader
    from dyntrain.data.synthetic import make_demo_data

    make_demo_data(tmp_path / "demo", train_images=2, test_images=1)
    cfg = load_config(None, ["data.source=paired", f"data.root={tmp_path / 'demo' / 'train'}",
                             "data.crop_size=16", "data.micro_batch_size=3", "data.sigmas=[25]",
                             "schedule.tasks.mode=sequential", "schedule.tasks.order=[derain, dehaze, denoise]",
                             "schedule.tasks.period_steps=2", "schedule.tasks.periods=3"])
    ld = build_finetune_loader(cfg, 0, 1, "cpu")
    seen = [set(next(ld)["tasks"]) for _ in range(6)]
    assert seen[0] == seen[1] == {"derain"} and seen[2] | seen[3] <= {"derain", "dehaze"}
    assert set().union(*seen[4:]) <= {"derain", "dehaze", "denoise"}
    state = ld.state_dict()
    want = [next(ld) for _ in range(2)]
    again = build_finetune_loader(cfg, 0, 1, "cpu")
    again.load_state_dict(state)
    for w in want:
        got = next(again)
        assert got["keys"] == w["keys"] and torch.equal(got["input"], w["input"])


HOST_READS_SCRIPT = r'''
import json, sys
from dyntrain.config import load_config
from dyntrain.jobs.finetune import run_finetune
from dyntrain.train.trainer import Trainer

reads = []
original = Trainer._finish

def finish(self, pending):  # which step is read on the host, and how many steps were queued then
    stop = original(self, pending)
    reads.append({"step": pending.step, "queued": self.step, "lr": self._resolved["lr"]})
    return stop

Trainer._finish = finish
run_finetune(load_config(sys.argv[2], sys.argv[3:]))
with open(sys.argv[1], "w") as f:
    json.dump(reads, f)
'''


def test_curriculum_finetune_reads_the_host_only_at_progress_steps(tmp_path):
    """A sequential-curriculum fine-tune (1 process, real DeepSpeed engine, synthetic pairs): step t is
    read on the host only after step t+1 was queued, except at the progress steps; the LR of every
    step is the curriculum's, set by its scheduler (no per-step callback writes it)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dyntrain.data.synthetic import write_synthetic_images

    root = Path(__file__).resolve().parents[1]
    write_synthetic_images(tmp_path / "clean", 2, size=(40, 48), seed=1)
    script = tmp_path / "host_reads.py"
    script.write_text(HOST_READS_SCRIPT)
    out = tmp_path / "reads.json"
    steps, log_every = 12, 6
    args = [f"run.max_steps={steps}", f"run.log_every={log_every}", "run.device=cpu", "model.dim=8",
            "model.heads=[1, 2, 4, 8]", "model.num_refinement=1", "model.prompt_dims=[8, 8, 16]",
            "model.prompt_sizes=[16, 8, 4]", "model.prompt_len=5", "model.prompt_heads=4", "data.crop_size=32", "data.micro_batch_size=2",
            "deepspeed.global_batch_size=null", "deepspeed.bf16=false", f"data.clean_urls=[{tmp_path / 'clean'}]",
            "data.tasks={noise: 1, rain: 1, haze: 1}", "schedule.tasks.order=[noise, rain, haze]",
            "schedule.tasks.period_steps=4", "schedule.tasks.periods=3", "optim.lr=1e-3", "optim.min_lr=1e-5",
            "init.checkpoint=null", "checkpoint.dir=null", "eval.every=0", "tracking.enabled=false",
            "schedule.verify_every=0"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(script), str(out), str(root / "configs/finetune_mio.yaml"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reads = json.loads(out.read_text())
    assert [r["step"] for r in reads] == list(range(steps))  # every step read once, in order
    at_once = [r["step"] + 1 for r in reads if r["queued"] == r["step"] + 1]
    assert at_once == [log_every, steps]  # the host waited only where the progress line needs it
    curriculum = TaskCurriculum(0, {"noise": 1, "rain": 1, "haze": 1}, "sequential", ["noise", "rain", "haze"],
                                period_steps=4, periods=3, lr=1e-3, min_lr=1e-5)
    assert [r["lr"] for r in reads] == [curriculum.lr_at(t) for t in range(steps)]
