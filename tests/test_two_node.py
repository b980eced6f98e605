"""Two Slurm nodes, one CPU rank each: the rank arithmetic of ``slurm/_launch.sh`` across nodes.

The sbatch script (``slurm/pretrain.sbatch``, which sources ``slurm/_launch.sh`` unchanged) runs
twice side by side, once with the environment Slurm gives the batch step on node 0 and once with
node 1's (``SLURM_NODEID``, the same job id, node list and ``--ntasks-per-node``). Two ``slurmd``
on one host need a Slurm built with ``--enable-multiple-slurmd`` (a port and spool per node).
Debian's slurm-wlm 22.05.8 ``slurmd`` lists ``-N node``, but every build has that option, and
nothing in the packaged binaries shows the multiple-slurmd build; this test must also run where
Slurm is not installed at all. So the two Slurm commands the script calls stand in here, on PATH:

* ``scontrol show hostnames LIST`` expands the node list (a comma list);
* ``srun --nodes N --ntasks T --ntasks-per-node K ... CMD`` starts, on its node, the K tasks Slurm's
  default block distribution puts there: ``SLURM_PROCID = SLURM_NODEID * K + local id``,
  ``SLURM_LOCALID``, ``SLURM_NTASKS = T`` — and refuses ``T != N * K``. It forwards SIGUSR1/TERM.

What is under test is the script's own arithmetic: hosts -> MASTER_ADDR (first host), the port
from the job id, ranks per node, world size, and the RANK/LOCAL_RANK/WORLD_SIZE each task exports.
The two ranks must meet over gloo, train, checkpoint, and the requeued job
(``SLURM_RESTART_COUNT=1``) must resume across both nodes from the checkpoint's step.
"""
from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dyntrain import checkpoint as ck  # noqa: E402

pytestmark = pytest.mark.slow

HOSTS = ["127.0.0.1", "127.0.0.2"]  # two loopback addresses: node 0 and node 1

SCONTROL = """#!/usr/bin/env bash
# stand-in for `scontrol show hostnames LIST` (comma lists only)
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: only 'show hostnames'" >&2; exit 1; }
tr ',' '\\n' <<< "$3"
"""

SRUN = """#!{python}
# stand-in for srun on one node: Slurm's default block distribution of the step's tasks
import os, signal, subprocess, sys
opts, i = {{}}, 1
while sys.argv[i].startswith("--"):
    key, _, value = sys.argv[i][2:].partition("=")
    opts[key] = value
    i += 1
nodes, ntasks, per_node = int(opts["nodes"]), int(opts["ntasks"]), int(opts["ntasks-per-node"])
if ntasks != nodes * per_node:
    sys.exit(f"srun: --ntasks={{ntasks}} is not --nodes={{nodes}} x --ntasks-per-node={{per_node}}")
node = int(os.environ["SLURM_NODEID"])
children = []
for local in range(per_node):
    env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
               SLURM_NTASKS=str(ntasks), SLURM_NNODES=str(nodes), SLURM_STEP_NUM_TASKS=str(ntasks))
    children.append(subprocess.Popen(sys.argv[i:], env=env))
def forward(signum, _frame):
    for c in children:
        c.send_signal(signum)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
codes = [c.wait() for c in children]
sys.exit(next((c for c in codes if c), 0))
"""


TRACED_PYTHON = """#!/usr/bin/env bash
# DYNTRAIN_PYTHON for the test: the training entry runs under tests/rank_entry.py with a trace
# (per-rank variants, sample keys, weight hash) in $TWO_NODE_TRACE_DIR; other uses pass through
[ "$1" = "-m" ] && exec {python} "$@"
exec {python} {root}/tests/rank_entry.py --trace "$TWO_NODE_TRACE_DIR" "$@"
"""


def _stand_ins(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN.format(python=sys.executable)),
                       ("traced-python", TRACED_PYTHON.format(python=sys.executable, root=ROOT))):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _job_id_with_free_port() -> int:
    """A job id whose port (20000 + id % 20000, as _launch.sh derives it) is free here."""
    for _ in range(200):
        port = random.randint(20000, 39999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 100000 + (port - 20000)  # 100000 % 20000 == 0
    raise RuntimeError("no free port in 20000-39999")


def _run_job(tmp: Path, job: int, restarts: int, overrides: list[str]) -> list[str]:
    """Both nodes' batch steps of one (re)start of the job; returns their outputs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                         "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{tmp / 'bin'}:{env['PATH']}", PYTHONPATH=str(ROOT), DYNTRAIN_ROOT=str(ROOT),
               DYNTRAIN_PYTHON=str(tmp / "bin" / "traced-python"),
               TWO_NODE_TRACE_DIR=str(tmp / f"trace{restarts}"),
               SLURM_JOB_ID=str(job), SLURM_JOB_NODELIST=",".join(HOSTS), SLURM_NNODES="2",
               SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_ON_NODE="1",
               SLURM_RESTART_COUNT=str(restarts), SLURM_SUBMIT_DIR=str(ROOT))
    procs, outs = [], []
    for node, host in enumerate(HOSTS):
        out = open(tmp / f"node{node}-restart{restarts}.out", "w")
        outs.append(out)
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "slurm" / "pretrain.sbatch"), "configs/quickstart.yaml", *overrides],
            cwd=ROOT, env=dict(env, SLURM_NODEID=str(node), SLURMD_NODENAME=host),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.time() + 240
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for out in outs:
            out.close()
    texts = [(tmp / f"node{n}-restart{restarts}.out").read_text() for n in range(2)]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, "\n=====\n".join(t[-4000:] for t in texts)
    return texts


def test_two_nodes_train_checkpoint_and_resume_through_the_sbatch_script(tmp_path):
    from dyntrain.data.synthetic import write_synthetic_images

    _stand_ins(tmp_path / "bin")
    write_synthetic_images(tmp_path / "images", 4, size=(128, 128), seed=3)
    subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "--src",
                    str(tmp_path / "images"), "--out", str(tmp_path / "shards"), "--patch-size",
                    "64", "--shard-samples", "4", "--quiet"], check=True, timeout=120)
    ckpt = tmp_path / "ckpt"
    common = [f"data.train_urls=[{tmp_path}/shards/*.tar]", "data.crop_size=32",
              "data.micro_batch_size=2", "run.log_every=1", f"checkpoint.dir={ckpt}",
              "checkpoint.every=2", "checkpoint.keep=5", "tracking.enabled=false"]
    job = _job_id_with_free_port()
    port = 20000 + job % 20000

    first = _run_job(tmp_path, job, 0, common + ["run.max_steps=2"])
    for node, text in enumerate(first):
        assert (f"job {job} restart 0: 2 node(s) [{' '.join(HOSTS)}] x 1 rank(s) = world 2" in text
                and f"master {HOSTS[0]}:{port}" in text), text[-3000:]
    assert "step 2/2" in first[0], first[0][-3000:]
    assert (ckpt / ck.tag_for_step(2) / ck.COMPLETE).exists()
    state = ck.read_client_state(ckpt, ck.tag_for_step(2))
    assert state["world_size"] == 2
    traces = [json.loads((tmp_path / "trace0" / f"trace_rank{r}.json").read_text()) for r in range(2)]
    assert traces[0]["weights_sha256"] == traces[1]["weights_sha256"]  # one data-parallel job
    keys = [set(k for s in t["steps"] for k in s["keys"]) for t in traces]
    assert keys[0] and keys[1] and not keys[0] & keys[1]  # each node's rank read its own shard

    # the requeued job (same id, SLURM_RESTART_COUNT=1) resumes on both nodes from step 2
    second = _run_job(tmp_path, job, 1, common + ["run.max_steps=3"])
    assert f"job {job} restart 1" in second[0] and "checkpoint.resume=auto" in second[0]
    assert f"resumed from {ck.tag_for_step(2)} at step 2" in second[0], second[0][-3000:]
    assert "step 3/3" in second[0], second[0][-3000:]
    assert ck.read_client_state(ckpt, ck.tag_for_step(3))["world_size"] == 2
    resumed = [json.loads((tmp_path / "trace1" / f"trace_rank{r}.json").read_text()) for r in range(2)]
    before = [s["step"] for s in traces[0]["steps"]]
    assert len(before) == 2  # the trace counts steps from 0: steps 0, 1 ran first
    assert [s["step"] for s in resumed[0]["steps"]] == [s["step"] for s in resumed[1]["steps"]] \
        == [before[-1] + 1]  # continued after the checkpoint's step, on both nodes
