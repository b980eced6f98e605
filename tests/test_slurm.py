"""A real one-node Slurm (Debian's slurm-wlm + munge, started here as root in a temporary folder):
``sbatch slurm/pretrain.sbatch configs/quickstart.yaml ...`` on 2 CPU ranks, the preemption signal
sent with ``scancel --signal=USR1 --batch``; the job must checkpoint at the next step boundary,
requeue itself, come back (SLURM_RESTART_COUNT=1; Slurm holds a requeued job back about two
minutes, and the test starts it 3 s after it is pending with ``scontrol update StartTime=now+3``)
and finish from where it stopped, in the same MLflow run. And the shard build
``bash slurm/make_shards.sbatch --parts 2 --dedup -- ...``: index array, plan, build array and merge
chained with afterok. And the whole paper at toy size, ``bash slurm/paper.sh --toy ...``: pre-training,
fine-tuning from its checkpoint, evaluation and registration, chained with afterok (about a minute).

Needs root and the packages (``.ci/run`` installs them: ``apt-get install -y slurm-wlm munge``);
skips with the reason otherwise. All daemons are stopped at the end.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dyntrain import checkpoint as ck
from dyntrain.data.shards.build import main as make_shards
from dyntrain.data.storage.urls import expand_urls
from dyntrain.data.synthetic import write_synthetic_images
from conftest import server_env
from helpers import free_port, read_tar

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

DAEMONS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel",
           "squeue", "sinfo", "srun")


class Slurm:
    def __init__(self, base: Path):
        self.base = base
        self.conf = base / "slurm.conf"
        self.env = server_env(dict(os.environ, SLURM_CONF=str(self.conf)))  # daemons outlive a test
        for k in list(self.env):
            if k.startswith("SLURM_") and k != "SLURM_CONF":
                self.env.pop(k)
        self.procs: list[subprocess.Popen] = []

    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r.stdout

    def daemon(self, name: str, *args: str) -> None:
        log = open(self.base / f"{name}.out", "w")
        self.procs.append(subprocess.Popen([name, *args], env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def job(self, job_id: str) -> dict[str, str]:
        out = self.cmd("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def stop(self) -> None:
        self.cmd("scancel", "--full", "--user=root", check=False)
        deadline = time.time() + 30
        while time.time() < deadline and self.cmd("squeue", "-h", check=False).strip():
            time.sleep(1)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm needs root here (slurmd runs jobs as their user)")
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed (missing {', '.join(missing)}): "
                    f"apt-get install -y slurm-wlm munge")
    base = tmp_path_factory.mktemp("slurm")
    base.chmod(0o755)
    s = Slurm(base)
    for d in ("munge", "state", "spool", "log"):
        (base / d).mkdir()
    (base / "munge").chmod(0o700)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = base / "munge" / "munge.sock"
    s.daemon("munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={base / 'munge' / 'munged.pid'}", f"--seed-file={base / 'munge' / 'seed'}",
             f"--log-file={base / 'munge' / 'munged.log'}")
    try:
        deadline = time.time() + 20
        while not sock.exists():
            assert time.time() < deadline, (base / "munged.out").read_text()
            time.sleep(0.2)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        s.conf.write_text(f"""\
ClusterName=dyntrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        s.daemon("slurmctld", "-D", "-f", str(s.conf))
        time.sleep(2)
        s.daemon("slurmd", "-D", "-f", str(s.conf))
        deadline = time.time() + 60
        while s.cmd("sinfo", "-h", "-o", "%t", check=False).strip() != "idle":
            if time.time() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted(base.glob("*.out")))
                pytest.fail(f"the one-node Slurm did not come up:\n{logs}")
            time.sleep(1)
        yield s
    finally:
        s.stop()


def make_tiny_shards(tmp_path: Path) -> None:
    """Four 64 px patches a shard from four synthetic photographs, in ``tmp_path/shards``."""
    write_synthetic_images(tmp_path / "images", 4, size=(128, 128), seed=5)
    subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src", str(tmp_path / "images"),
                    "--out", str(tmp_path / "shards"), "--patch-size", "64", "--shard-samples", "4",
                    "--quiet"], check=True, timeout=120)


def test_preempted_job_checkpoints_requeues_and_finishes(slurm, tmp_path):
    t0 = time.time()
    make_tiny_shards(tmp_path)
    ckpt = tmp_path / "ckpt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    max_steps, every = 40, 10
    overrides = [f"data.train_urls=[{tmp_path}/shards/*.tar]", "data.crop_size=32",
                 f"run.max_steps={max_steps}", "run.log_every=5", f"checkpoint.dir={ckpt}",
                 f"checkpoint.every={every}", "checkpoint.keep=10", f"tracking.uri={uri}",
                 "tracking.experiment=slurm"]
    out = tmp_path / "job.out"
    job = slurm.cmd("sbatch", "--parsable", "--ntasks-per-node=2", f"--output={out}",
                    f"--chdir={ROOT}", str(ROOT / "slurm" / "pretrain.sbatch"),
                    "configs/quickstart.yaml", *overrides).strip().split(";")[0]

    def wait_for(what, cond, timeout):
        """Until ``cond(job record)``; a failed, cancelled or timed-out wait fails with the record."""
        deadline = time.time() + timeout
        while not cond(info := slurm.job(job)):
            if time.time() > deadline or info.get("JobState") in ("FAILED", "CANCELLED", "NODE_FAIL"):
                text = out.read_text()[-5000:] if out.exists() else "(no job output)"
                pytest.fail(f"gave up waiting for {what}; job {info}\n{text}")
            time.sleep(0.5)

    # 1. running and past its first periodic checkpoint: send the preemption signal to the batch shell
    wait_for("the first checkpoint", lambda _: (ckpt / ck.tag_for_step(every) / ck.COMPLETE).exists(), 300)
    t_signal = time.time()
    slurm.cmd("scancel", "--signal=USR1", "--batch", job)

    # 2. it checkpoints at the next step boundary, exits cleanly and requeues itself
    wait_for("the requeue", lambda j: j.get("Restarts") == "1", 120)
    text = out.read_text()
    assert "SIGUSR1 received" in text and "requeueing job" in text, text[-4000:]
    stopped = re.search(r"stopped early at step (\d+)", text)
    assert stopped, text[-4000:]
    stop_step = int(stopped.group(1))
    assert every <= stop_step < max_steps
    assert (ckpt / ck.tag_for_step(stop_step) / ck.COMPLETE).exists()
    t_requeued = time.time()

    # 3. the requeued job starts again, resumes there and finishes. Slurm holds a requeued job back
    # about two minutes (its begin time; Slurm's pacing, not the job's), and the test lets it start
    # sooner, as an operator can. Not at once: slurmd refuses a launch credential made in the same
    # second as the old one's revocation, and the job then FAILS without running (a CI run did, when
    # the test set StartTime=now right after the requeue). So it waits until the first instance has
    # completed (PENDING, no longer REQUEUED or COMPLETING) and sets the start 3 s ahead
    wait_for("the first instance to complete", lambda j: j.get("JobState") in
             ("PENDING", "RUNNING", "COMPLETED"), 120)
    if slurm.job(job).get("JobState") == "PENDING":
        slurm.cmd("scontrol", "update", f"JobId={job}", "StartTime=now+3", check=False)
    wait_for("the requeued job to finish", lambda j: j.get("JobState") == "COMPLETED", 420)
    t_done = time.time()
    text = out.read_text()
    assert f"job {job} restart 1" in text
    assert f"resumed from {ck.tag_for_step(stop_step)} at step {stop_step}" in text, text[-4000:]
    assert f"step {max_steps}/{max_steps}" in text and f"finished at step {max_steps}" in text
    assert slurm.job(job).get("ExitCode") == "0:0"
    final = ck.read_client_state(ckpt, ck.tag_for_step(max_steps))
    assert final["world_size"] == 2
    first = ck.read_client_state(ckpt, ck.tag_for_step(stop_step))["client"]["mlflow_run_id"]
    assert final["client"]["mlflow_run_id"] == first

    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(first)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("resumed_from") == ck.tag_for_step(stop_step)
    print(json.dumps({"job": job, "stop_step": stop_step, "signal_after_s": round(t_signal - t0),
                      "checkpoint_and_requeue_s": round(t_requeued - t_signal),
                      "requeued_to_done_s": round(t_done - t_requeued), "total_s": round(t_done - t0)}))


def test_shard_build_array_and_merge(slurm, tmp_path):
    """``bash slurm/make_shards.sbatch --parts 2 --dedup -- ...``: index array, plan, build array and
    merge, chained with afterok, give the same train and validation shards as one local build."""
    src = tmp_path / "images"
    write_synthetic_images(src, 6, size=(192, 256), seed=9, fmt="png")
    Image.open(src / "img_00002.png").resize((128, 96)).save(src / "img_00002_small.jpg", quality=90)
    args = ["--src", str(src), "--patch-size", "64", "--shard-samples", "6", "--holdout", "0.3"]
    r = subprocess.run(["bash", str(ROOT / "slurm" / "make_shards.sbatch"), "--parts", "2", "--dedup",
                        "--cpus", "1", f"--output={tmp_path}/%x-%A_%a.out", "--",
                        *args, "--out", str(tmp_path / "shards")],
                       env=slurm.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    jobs = dict(line.split("=") for line in r.stdout.split())
    assert list(jobs) == ["index", "plan", "build", "merge"]
    deadline = time.time() + 600
    while slurm.job(jobs["merge"]).get("JobState") != "COMPLETED":
        states = {k: slurm.job(v).get("JobState") for k, v in jobs.items()}
        stuck = slurm.job(jobs["merge"]).get("Reason") == "DependencyNeverSatisfied"
        logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("*.out")))
        assert time.time() < deadline and not stuck and not {"FAILED", "CANCELLED"} & set(
            states.values()), f"{states}\n{logs}"
        time.sleep(1)
    assert make_shards([*args, "--out", str(tmp_path / "local"), "--dedup", "--quiet"]) == 0

    def samples(out):
        got = []
        for url in expand_urls([str(out)]):
            for key, comps in read_tar(Path(url)).items():
                got.append((key, json.loads(comps["json"])["source"], np.asarray(Image.open(
                    io.BytesIO(comps["jpg"]))).sum()))
        return got

    for a, b in (("shards", "local"), ("shards-val", "local-val")):
        assert samples(tmp_path / a) == samples(tmp_path / b)
    merged = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert len(merged["parts"]) == 2 and merged["dedup"]["images_dropped"] == {"exact": 0, "near": 1}
    assert all(s["name"].startswith(("shard-p0000-", "shard-p0001-")) for s in merged["shards"])


def test_paper_chain_pretrains_finetunes_evaluates_and_registers(slurm, tmp_path):
    """``bash slurm/paper.sh --toy ...``: pre-training, fine-tuning from its last checkpoint, then
    evaluation and registration, three jobs chained with afterok, at toy size (1 CPU rank, 4 steps
    each), to a registered model version with the alias pointing at the fine-tuning run's model."""
    from mlflow.tracking import MlflowClient

    t0 = time.time()
    make_tiny_shards(tmp_path)
    demo = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "dyntrain.data.finetune.paired", "demo", "--out", str(demo),
                    "--train-images", "4", "--test-images", "1", "--height", "40", "--width", "48"],
                   check=True, timeout=120, cwd=ROOT)
    uri, name, run_dir = f"sqlite:///{tmp_path / 'mlflow.db'}", "dynet-chain-test", tmp_path / "paper"
    short = ["run.max_steps=4", "run.log_every=2", "checkpoint.every=0", "tracking.system_metrics=false"]
    args = ["--toy", "--run-dir", str(run_dir), "--name", name, "--ntasks-per-node=1",
            "--all", f"tracking.uri={uri}", "--all", "tracking.experiment=chain",
            "--pretrain", f"data.train_urls=[{tmp_path}/shards/*.tar]", "--pretrain", "data.crop_size=32",
            "--pretrain", "optim.warmup_steps=0", "--finetune", f"data.root={demo}/train",
            "--finetune", "eval.every=0", "--finetune",
            f"eval.sets={{sots: {demo}/test/sots, rain100l: {demo}/test/rain100l, bsd68: {demo}/test/bsd68}}"]
    for stage in ("pretrain", "finetune"):
        for kv in short:
            args += [f"--{stage}", kv]
    r = subprocess.run(["bash", str(ROOT / "slurm" / "paper.sh"), *args], env=slurm.env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    jobs = dict(line.split("=") for line in r.stdout.split())
    assert list(jobs) == ["pretrain", "finetune", "evaluate"]

    def logs() -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("slurm-*.out")))

    deadline = time.time() + 600
    while (state := slurm.job(jobs["evaluate"])).get("JobState") != "COMPLETED":
        states = {k: slurm.job(v).get("JobState") for k, v in jobs.items()}
        stuck = state.get("Reason") == "DependencyNeverSatisfied"
        assert time.time() < deadline and not stuck and not {"FAILED", "CANCELLED", "TIMEOUT"} & set(
            states.values()), f"{states} {state.get('Reason')}\n{logs()}"
        time.sleep(1)
    records = {k: slurm.job(v) for k, v in jobs.items()}
    assert all(j.get("ExitCode") == "0:0" for j in records.values()), records
    # chained: each stage started only after the one before it had ended
    assert records["pretrain"]["EndTime"] <= records["finetune"]["StartTime"]
    assert records["finetune"]["EndTime"] <= records["evaluate"]["StartTime"]
    text = logs()
    finetune_log = (run_dir / f"slurm-finetune-{jobs['finetune']}.out").read_text()
    assert f"init.checkpoint={run_dir}/pretrain/checkpoints" in finetune_log, text
    pre_final = ck.read_client_state(run_dir / "pretrain" / "checkpoints", ck.tag_for_step(4))
    ft_final = ck.read_client_state(run_dir / "finetune" / "checkpoints", ck.tag_for_step(4))
    ft_run = ft_final["client"]["mlflow_run_id"]
    assert pre_final["client"]["mlflow_run_id"] != ft_run

    client = MlflowClient(uri, registry_uri=uri)  # not this process's registry of an earlier test
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.run_id == ft_run
    metrics = client.get_run(ft_run).data.metrics
    assert any(k.startswith("eval/") and "psnr" in k for k in metrics), sorted(metrics)
    print(json.dumps({"jobs": jobs, "version": version.version, "total_s": round(time.time() - t0)}))
