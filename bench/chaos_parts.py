"""The chaos soak's parts (``chaos_soak.py``): the services it breaks (a moto S3 server behind
``s3_fault_proxy.py``, an MLflow server that can be stopped and started on the same port and store),
the rank processes of a launcher, and the comparison of the faulted run with the clean one."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "chaos-soak"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"chaos: {what} exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"chaos: {what} did not start within {timeout:.0f} s")


class Services:
    """moto + fault proxy + MLflow server for one soak, and the shards in the bucket."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mode = workdir / "s3_mode"
        self.mlflow_root = workdir / "mlflow"
        self.mlflow_port = _port()
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.timers: list[threading.Thread] = []

    def __enter__(self) -> "Services":
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = _port()
        self.procs["moto"] = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(port, self.procs["moto"], "moto.server")
        self.moto = f"http://127.0.0.1:{port}"
        self.mode.write_text("pass")
        self.proxy_port = _port()
        self.procs["proxy"] = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "s3_fault_proxy.py"), "--port", str(self.proxy_port),
             "--target", self.moto, "--mode-file", str(self.mode)],
            stdout=open(self.workdir / "proxy.log", "a"), stderr=subprocess.STDOUT)
        _wait_port(self.proxy_port, self.procs["proxy"], "the fault proxy")
        self._shards()
        self.start_mlflow()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.write_text("pass")
        for t in self.timers:
            t.join(timeout=120)
        self.stop_mlflow()
        for proc in self.procs.values():
            proc.kill()
            proc.wait()

    def env(self) -> dict[str, str]:
        env = dict(os.environ, **S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.proxy_port}",
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
            env.pop(k, None)
        return env

    def free_port(self) -> int:
        return _port()

    def _shards(self) -> None:
        """4 generated photographs cut into 64 px patches, 4 per shard, uploaded through the proxy."""
        # lazy: boto3 is needed only here
        import boto3

        from dyntrain.data.shards.writer import ShardBuildConfig, build_shards
        from dyntrain.data.synthetic import write_synthetic_images

        src = self.workdir / "shards"
        if not (src / "manifest.json").exists():
            write_synthetic_images(self.workdir / "images", 4, size=(192, 256), seed=11)
            build_shards([self.workdir / "images"], str(src),
                         ShardBuildConfig(patch_size=64, shard_samples=4, workers=1), progress=False)
        s3 = boto3.client("s3", endpoint_url=self.moto, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)
        for p in sorted(src.iterdir()):
            s3.upload_file(str(p), BUCKET, f"pre/{p.name}")

    # ----------------------------------------------------------------------------- faults
    def s3_fault(self, mode: str, seconds: float) -> None:
        """The proxy in ``mode`` for ``seconds``, then back to pass (in the background)."""
        self.mode.write_text(mode)
        self._later(seconds, lambda: self.mode.write_text("pass"))

    def mlflow_outage(self, seconds: float) -> None:
        self.stop_mlflow()
        self._later(seconds, self.start_mlflow)

    def _later(self, seconds: float, fn) -> None:
        t = threading.Thread(target=lambda: (time.sleep(seconds), fn()), daemon=True)
        t.start()
        self.timers.append(t)

    def settle(self) -> None:
        for t in self.timers:
            t.join()

    def start_mlflow(self) -> None:
        self.mlflow_root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
               "--backend-store-uri", f"sqlite:///{self.mlflow_root / 'mlflow.db'}",
               "--artifacts-destination", str(self.mlflow_root / "artifacts"), "--workers", "1"]
        with (self.mlflow_root / "server.log").open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs["mlflow"] = proc
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.mlflow_uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise SystemExit("chaos: the MLflow server did not start")

    def stop_mlflow(self) -> None:
        proc = self.procs.pop("mlflow", None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def rank_pids(launcher_pid: int) -> list[int]:
    """The rank processes (``rank_entry.py`` children, not the launcher's own) under a launcher."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [launcher_pid]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            try:
                argv = (Path("/proc") / str(c) / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if any(a.endswith("rank_entry.py") for a in argv) and not any("deepspeed.launcher" in a for a in argv):
                out.append(c)
    return sorted(out)


# ---------------------------------------------------------------------------------- comparison
def _histories(uri: str, experiment: str) -> dict[int, list[str]]:
    """step -> the variants of every 'loss_<variant>' record logged at that step, over every run of
    the experiment (a resumed run is the same run or one linked by tags)."""
    # lazy: mlflow is slow to import
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    steps: dict[int, list[str]] = {}
    if exp is None:
        return steps
    for run in client.search_runs([exp.experiment_id]):
        for key in run.data.metrics:
            if key.startswith("loss_") and key[5:].isalpha() and key[5:].isupper():
                for m in client.get_metric_history(run.info.run_id, key):
                    steps.setdefault(int(m.step), []).append(key[5:])
    return steps


def _first_difference(clean: dict, traces: list[dict],
                      clean1: Optional[dict] = None) -> Optional[dict[str, Any]]:
    """The first step (0-based, over every segment, a killed one's included) whose variant, sample
    keys or loss on rank 0 differ from the clean run's; None when every traced step matches. A
    1-rank segment hosting both data ranks reads rank 0's and rank 1's samples (``clean1``: the
    clean run's rank 1) and adds the two losses in float64 where the 2-rank run all-reduced them in
    float32: its loss matches to float32 rounding (relative 1e-7), its weights still bit for bit."""
    want = {rec["step"]: rec for rec in clean["steps"]}
    want1 = {rec["step"]: rec for rec in (clean1 or {}).get("steps", [])}
    for i, t in enumerate(traces):
        for rec in t["steps"]:
            ref = want.get(rec["step"])
            both = ref["keys"] + want1[rec["step"]]["keys"] if ref and rec["step"] in want1 else None
            if rec["keys"] == both:
                ref = {**ref, "keys": rec["keys"]}
                if math.isclose(rec["loss"], ref["loss"], rel_tol=1e-7):
                    ref["loss"] = rec["loss"]
            for field in ("variant", "keys", "loss"):
                if ref is None or rec[field] != ref[field]:
                    return {"step": rec["step"], "segment": i, "field": field,
                            "clean": None if ref is None else ref[field], "chaos": rec[field]}
    return None


def compare_runs(args, services: Services, faults: list[dict], restarts: int) -> dict[str, Any]:
    from dyntrain import checkpoint as ck

    from dyntrain.train.state import read_trace

    # every segment's trace, a killed one's too (its steps were appended as they happened)
    segments = [read_trace(d) for d in sorted((args.workdir / "trace").glob("chaos-*"))]
    traces = [t for t in segments if t is not None]
    ended = [t for t in traces if not t["killed"]]
    final = ended[-1] if ended else {}
    clean = read_trace(args.workdir / "trace" / "clean-00")
    first_difference = _first_difference(clean, traces, read_trace(args.workdir / "trace" / "clean-00", 1))
    # what the last segment could not send before it ended (the server down at the end) waits in
    # its checkpoint folder: delivered now, as `python -m dyntrain.tracking sync` would
    from mlflow.tracking import MlflowClient

    from dyntrain.tracking.pending import sync_pending

    synced = sync_pending(args.workdir / "chaos", MlflowClient(tracking_uri=services.mlflow_uri)) or 0
    want = _histories(services.mlflow_uri, "chaos-soak-clean")
    got = _histories(services.mlflow_uri, "chaos-soak-chaos")
    expected = sorted(want)
    missing = [s for s in expected if s not in got]
    duplicated = [s for s in expected if len(got.get(s, [])) > 1]
    for t in traces:  # every segment traced its steps (0-based; MLflow's are 1-based)
        for rec in t["steps"]:
            got.setdefault(rec["step"] + 1, []).append(rec["variant"])
    checked = [s for s in expected if s in got]
    draws_ok = bool(checked) and all(set(got[s]) == set(want[s]) for s in checked)
    ckpt = args.workdir / "chaos"
    newest = ck.newest_complete(ckpt)
    latest = (ckpt / ck.LATEST).read_text().strip() if (ckpt / ck.LATEST).exists() else None
    latest_ok = newest is not None and latest == newest.tag and ck.verify_files(newest) is None
    complete = [i.tag for i in ck.list_checkpoints(ckpt) if (ckpt / i.tag / ck.COMPLETE).exists()]
    weights_ok = bool(final) and final.get("weights_sha256") == clean["weights_sha256"] \
        and final.get("final_step") == args.steps
    order = sorted(faults, key=lambda f: f["at_step"])
    for f in order:  # a lost metric is blamed on the first fault at or after its step (after the
        # last fault: on the last one, e.g. an MLflow outage the run ended in)
        f["metrics_lost"] = [s for s in missing if (s <= f["at_step"] or f is order[-1])
                             and not any(g["at_step"] < f["at_step"] and s <= g["at_step"] for g in order)]
        if f["survived"] is None:
            f["survived"] = bool(weights_ok and draws_ok and not f["metrics_lost"]
                                 and (f["kind"] not in ("s3_down", "s3_503", "mlflow_down") or f["restarts"] == 0))
    return {"faults": faults, "weights_identical": weights_ok, "draws_identical": draws_ok,
            "draws_checked": len(checked), "metrics_missing": len(missing), "metrics_duplicated": len(duplicated),
            "metrics_synced_after_end": synced, "missing_steps": missing[:50], "duplicated_steps": duplicated[:50],
            "latest_complete": latest_ok, "latest": latest, "complete_tags": complete,
            "retention_ok": len(complete) <= args.keep, "restarts": restarts,
            "loader_stats": final.get("loader_stats"), "segments": len(traces),
            "killed_segments_traced": sum(t["killed"] for t in traces), "first_difference": first_difference,
            "clean_weights_sha256": clean["weights_sha256"], "chaos_weights_sha256": final.get("weights_sha256")}
