"""``--dry-run --world-size N`` and the pre-flight (dyntrain.jobs.dryrun, dyntrain.jobs.preflight).

Every command of the README and docs that names a GPU count plans at that count (``DOCUMENTED``: a
new documented command fails ``test_every_documented_gpu_command_has_a_row`` until it gets a row
there); the pre-flight fails in one line, exit 2, before any engine, for a missing shard set, an
unwritable checkpoint folder and an unreadable init.checkpoint; an unreachable tracking server only
warns. The 2-rank comparison with a real run's DeepSpeed config is in tests/test_finetune.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dyntrain.data.synthetic import make_demo_data, write_synthetic_images
from dyntrain.errors import cli_main
from helpers import free_port, run_env

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# (doc file, the command as documented up to its config, GPUs it names)
DOCUMENTED = [
    ("README.md", "deepspeed --num_gpus 8 launch/pretrain.py --config configs/pretrain.yaml", 8),
    ("README.md", "sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 slurm/pretrain.sbatch configs/pretrain.yaml", 32),
    ("docs/pretraining.md", "deepspeed --num_gpus 8 launch/pretrain.py --config configs/pretrain.yaml", 8),
    ("docs/checkpoints.md", "deepspeed --num_gpus 4 launch/pretrain.py --config configs/pretrain.yaml", 4),
    ("docs/finetuning.md", ".venv/bin/deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune_quickstart.yaml", 2),
    ("docs/routing.md", ".venv/bin/deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune_quickstart.yaml", 2),
    ("docs/slurm.md", "sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 --time=24:00:00 slurm/pretrain.sbatch configs/pretrain.yaml", 32),
    ("docs/pretraining.md", "python launch/pretrain.py --config configs/pretrain.yaml --dry-run --world-size 64", 64),
    ("docs/pretraining.md", "python launch/finetune.py --config configs/finetune_allinone.yaml --dry-run --world-size 16", 16),
    ("README.md", "python launch/pretrain.py --config configs/pretrain.yaml --dry-run --world-size 32", 32),
    ("docs/slurm.md", '.venv/bin/python launch/pretrain.py --config configs/pretrain.yaml "${SET[@]}" --dry-run --world-size 32', 32),
    ("docs/slurm.md", "sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 --time=48:00:00 slurm/pretrain.sbatch configs/pretrain.yaml", 32),
    ("docs/slurm.md", "python launch/finetune.py --config configs/finetune_allinone.yaml ... --dry-run --world-size 32", 32),
    ("docs/pretraining.md", "sbatch --nodes=8 --gpus-per-node=8 --ntasks-per-node=8 slurm/pretrain.sbatch configs/pretrain.yaml", 64),
]
COUNT = re.compile(r"--num_gpus[ =](\d+)|--nodes[ =](\d+)|--world-size[ =](\d+)")
LAUNCHERS = ("launch/pretrain.py", "launch/finetune.py", "slurm/pretrain.sbatch", "slurm/finetune.sbatch")


def documented_commands() -> list[tuple[str, str]]:
    """(doc file, command) of every README/docs command that names a GPU count and trains: the lines
    of fenced code blocks (continuations joined, comments dropped) and the inline code spans."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        parts = doc.read_text().split("```")
        fenced = [ln for block in parts[1::2] for ln in block.replace("\\\n", " ").splitlines()[1:]]
        spans = [span for prose in parts[0::2] for span in re.findall(r"`([^`\n]+)`", prose)]
        for piece in fenced + spans:
            line = " ".join(piece.split(" #")[0].split())
            if COUNT.search(line) and any(entry in line for entry in LAUNCHERS):
                found.append((str(doc.relative_to(ROOT)), line))
    return found


def gpus_named(line: str) -> int:
    if m := re.search(r"--(?:num_gpus|world-size)[ =](\d+)", line):
        return int(m.group(1))
    nodes = int(re.search(r"--nodes[ =](\d+)", line).group(1))
    per = re.search(r"--(?:gpus|ntasks)-per-node[ =](\d+)", line)
    return nodes * int(per.group(1))


def test_every_documented_gpu_command_has_a_row():
    rows = {(doc, cmd) for doc, cmd, _ in DOCUMENTED}
    for doc, line in documented_commands():
        assert any(d == doc and line.startswith(cmd) for d, cmd in rows), \
            f"{doc}: '{line}' names a GPU count: add a row to tests/test_dry_run.py DOCUMENTED"
    for doc, cmd, gpus in DOCUMENTED:
        assert any(d == doc and line.startswith(cmd) for d, line in documented_commands()), \
            f"{doc} no longer documents '{cmd}': drop or update its row"
        assert gpus_named(cmd) == gpus


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Local pre-training shards, paired demo data and a file to start fine-tuning from."""
    from dyntrain.data.shards.writer import ShardBuildConfig, build_shards

    base = tmp_path_factory.mktemp("dry")
    write_synthetic_images(base / "images", 6, size=(256, 320), seed=5)  # > 64 patches: a share for 64 ranks
    build_shards([base / "images"], str(base / "shards"),
                 ShardBuildConfig(patch_size=64, shard_samples=16, workers=1), progress=False)
    make_demo_data(base / "demo", train_images=2, test_images=1)
    (base / "init.pt").write_bytes(b"weights")
    return {"shards": base / "shards", "root": base / "demo/train", "init": base / "init.pt", "base": base}


def launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"_launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_config(line: str) -> tuple[str, list[str]]:
    """The config a documented command names, and its dotted overrides (placeholders and data
    locations dropped: the test gives its own)."""
    words = shlex.split(line)
    at = next(i for i, w in enumerate(words) if w.startswith("configs/") and w.endswith(".yaml"))
    return words[at], [w for w in words[at + 1:] if "=" in w and not w.startswith(("[", "data.", "--", "init."))]


def local_overrides(data, tmp_path) -> list[str]:
    return [f"data.train_urls=[{data['shards']}]", f"data.root={data['root']}", f"init.checkpoint={data['init']}",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "tracking.uri=sqlite:///" + str(tmp_path / "m.db")]


@pytest.mark.parametrize("doc, cmd, gpus", DOCUMENTED, ids=[f"{d}:{g}" for d, _, g in DOCUMENTED])
def test_documented_command_plans_with_dry_run(doc, cmd, gpus, data, tmp_path, capsys):
    line = next(ln for d, ln in documented_commands() if d == doc and ln.startswith(cmd))
    config, overrides = documented_config(line)
    entry = "finetune" if "finetune" in line else "pretrain"
    argv = ["--config", str(ROOT / config), "--dry-run", "--world-size", str(gpus),
            *overrides, *local_overrides(data, tmp_path)]
    assert cli_main(launcher(entry).main, argv) == 0
    out = capsys.readouterr().out.splitlines()
    ds = json.loads(out[-1])
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * gpus
    assert any(ln.startswith(f"batch plan: world size {gpus},") for ln in out)
    if config == "configs/pretrain.yaml" and gpus <= 32:  # the paper's batch and lr at these counts
        assert ds["train_batch_size"] == 32 and ds["optimizer"]["params"]["lr"] == 1e-4
    assert not (tmp_path / "ckpt").exists()  # a dry run writes nothing


def test_dry_run_at_64_gpus_as_a_command(data, tmp_path):
    """The launcher as a user runs it: plan, steps, epochs, resume, logging; the JSON last."""
    proc = subprocess.run([PY, ROOT / "launch/pretrain.py", "--config", ROOT / "configs/pretrain.yaml",
                           "--dry-run", "--world-size", "64", *local_overrides(data, tmp_path)],
                          capture_output=True, text=True, env=run_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    text = proc.stdout
    assert "global batch 64 (grown from 32" in text and "optim.lr_scaling=sqrt" in text
    assert "500000 iterations = 32000000 samples" in text
    assert re.search(r"pre-flight: data \d+ samples in \d+ shards \(manifest.json( of [^)]+)?\)", text) and "starts fresh" in text
    assert "epochs" in text and "MLflow sqlite:///" in text
    ds = json.loads(lines[-1])
    assert ds["train_batch_size"] == 64 and ds["optimizer"]["params"]["lr"] == pytest.approx(1e-4 * 2 ** 0.5)


def dry(args: list[str], config: str = "configs/pretrain.yaml", entry: str = "pretrain") -> subprocess.CompletedProcess:
    return subprocess.run([PY, ROOT / "launch" / f"{entry}.py", "--config", ROOT / config, *args],
                          capture_output=True, text=True, env=run_env(), timeout=300)


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through any mode bits: a file system that takes no files
        return Path("/proc/dyntrain-checkpoints")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "ckpt"


def test_preflight_fails_in_one_line(data, tmp_path):
    base = local_overrides(data, tmp_path)
    missing = tmp_path / "no-such-set" / "shard-{000000..000009}.tar"
    err = one_error(dry(["--dry-run", "--world-size", "8", *base, f"data.train_urls=['{missing}']"]))
    assert "shard not found" in err and str(tmp_path / "no-such-set" / "shard-000000.tar") in err
    err = one_error(dry(["--dry-run", "--world-size", "8", *base, f"checkpoint.dir={unwritable(tmp_path)}"]))
    assert err.startswith("error: checkpoint.dir:") and "not writable" in err
    for bad in (tmp_path / "nothing-here", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        err = one_error(dry(["--dry-run", "--world-size", "2", *base, f"init.checkpoint={bad}"],
                            "configs/finetune_quickstart.yaml", "finetune"))
        assert err.startswith(f"error: init.checkpoint: {bad}")


def test_unreachable_tracking_server_only_warns(data, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = dry(["--dry-run", "--world-size", "8", *local_overrides(data, tmp_path), f"tracking.uri={uri}"])
    assert proc.returncode == 0, proc.stderr
    assert f"warning: tracking server {uri} did not answer" in proc.stdout
    json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_real_job_fails_the_preflight_before_its_engine(data, tmp_path):
    """A real start (one process) with a missing shard set: one line, exit 2, no engine built."""
    missing = tmp_path / "gone" / "*.tar"
    proc = dry([*local_overrides(data, tmp_path), f"data.train_urls=[{missing}]", "run.device=cpu"])
    err = one_error(proc)
    assert f"no shard matches {missing}" in err
    assert "batch plan:" not in proc.stdout + proc.stderr and "ZeRO" not in proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol not installed")
def test_sbatch_script_passes_the_dry_run_with_the_allocations_world_size(data, tmp_path):
    """slurm/pretrain.sbatch run as the batch host of an allocation of 4 nodes x 8 tasks runs it (Slurm's
    variables; the real scontrol expands the node list from a minimal slurm.conf, no daemon) with --dry-run."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=dry\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1 State=UNKNOWN\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    env = run_env(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node[1-4]", SLURM_NTASKS_PER_NODE="8",
                  SLURM_CONF=str(conf), DYNTRAIN_ROOT=str(ROOT), DYNTRAIN_PYTHON=PY)
    proc = subprocess.run(["bash", ROOT / "slurm/pretrain.sbatch", "configs/pretrain.yaml",
                           *local_overrides(data, tmp_path), "--dry-run"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batch plan: world size 32," in proc.stdout
    assert json.loads(proc.stdout.splitlines()[-1])["train_batch_size"] == 32


def test_gpu_json_from_a_login_node_and_the_dali_rule(data, tmp_path, capsys):
    """run.device=cuda on a machine without a GPU prints the GPU job's JSON; the pre-flight's DALI
    rule is launch/dali_flavour.sh's (the script itself answers for each driver version)."""
    from dyntrain.jobs.preflight import dali_extra_for

    argv = ["--config", str(ROOT / "configs/pretrain.yaml"), "--dry-run", "--world-size", "8", "run.device=cuda",
            *local_overrides(data, tmp_path)]
    assert cli_main(launcher("pretrain").main, argv) == 0
    ds = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["overlap_comm"] is True
    for version in ("12.2", "12.8", "13.0", "13.1", "11.8"):
        script = subprocess.run(["bash", "-c", f"source launch/dali_flavour.sh && dali_extra {version}"], cwd=ROOT,
                                capture_output=True, text=True, env=run_env())
        assert (script.stdout.strip() or None) == dali_extra_for(version), version


def test_dry_run_states_what_the_checkpoint_folder_would_refuse(data, tmp_path, capsys):
    """A fresh start into another run's checkpoints is refused by the dry run as by the real start."""
    from dyntrain.checkpoint import layout as ck

    ckpt = tmp_path / "ckpt"
    tag = ckpt / ck.tag_for_step(300)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tag / ck.COMPLETE).write_text(json.dumps({"tag": tag.name, "step": 300, "world_size": 1,
                                               "files": {"mp_rank_00_model_states.pt": 1}}))
    argv = ["--config", str(ROOT / "configs/pretrain.yaml"), "--dry-run", "--world-size", "1",
            *local_overrides(data, tmp_path), "checkpoint.resume=never"]
    assert cli_main(launcher("pretrain").main, argv) == 2
    assert "step_00000300: a fresh start (checkpoint.resume=never) would mix" in capsys.readouterr().err
    assert cli_main(launcher("pretrain").main, argv + ["checkpoint.overwrite=true"]) == 0
    assert "deletes 1 checkpoint(s) first" in capsys.readouterr().out and tag.is_dir()
