"""The chaos soak's parts (``chaos_soak.py``): the services it breaks (a moto S3 server behind
``s3_fault_proxy.py``, an MLflow server that can be stopped and started on the same port and store),
the rank processes of a launcher, and the comparison of the faulted run with the clean one."""
from __future__ import annotations

import json
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
        # without MLflow 3's job execution (seven huey consumers and a job runner, ~15 CPU-s per start
        # and a steady share of a core on this 2-core machine; the soak submits no MLflow job)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with (self.mlflow_root / "server.log").open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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


def _all_ranks(directory: Path) -> dict[int, dict[str, Any]]:
    """step -> that step's trace record of rank 0 with ``keys`` the samples of every data rank, in
    data-rank order: the ranks' own keys one after the other, or on 1 rank hosting the readers of 2,
    its own (the hosted readers' micro-batches in data-rank order), so that a 1-rank segment compares
    with a 2-rank run."""
    from dyntrain.train.state import read_trace

    ranks = sorted(int(p.name[len("trace_rank"):].split(".")[0]) for p in directory.glob("trace_rank*.steps.jsonl"))
    traces = [t for t in (read_trace(directory, r) for r in ranks) if t is not None]
    steps: dict[int, dict[str, Any]] = {}
    for t in traces:
        for rec in t["steps"]:
            if rec["step"] in steps:
                steps[rec["step"]]["keys"] = steps[rec["step"]]["keys"] + rec["keys"]
            else:
                steps[rec["step"]] = dict(rec)
    return steps


def _same(field: str, a: Any, b: Any) -> bool:
    """Equal; the loss to float32 rounding (2 ranks all-reduce their losses in float32, 1 rank hosting
    both readers adds the same two in float64: the weights are bit-identical either way)."""
    if field == "loss":
        return abs(a - b) <= 2 ** -22 * max(abs(a), abs(b))
    return a == b


def _first_difference(clean_dir: Path, segment_dirs: list[Path]) -> Optional[dict[str, Any]]:
    """The first step (0-based, over every segment, a killed one's included) whose variant, loss or
    sample keys (of every data rank) differ from the clean run's; None when every traced step matches."""
    want = _all_ranks(clean_dir)
    for i, d in enumerate(segment_dirs):
        for step, rec in sorted(_all_ranks(d).items()):
            ref = want.get(step)
            for field in ("variant", "loss", "keys"):
                if ref is None or not _same(field, rec[field], ref[field]):
                    return {"step": step, "segment": i, "field": field,
                            "clean": None if ref is None else ref[field], "chaos": rec[field]}
    return None


SAVING_TOLERANCE_POINTS = 3.0   # a faulted run whose saving moves further than this is flagged
LOST_KEYS = ("gpu_hours_lost_stall", "gpu_hours_lost_replay", "gpu_hours_lost_restart")


def account_figures(clean: Optional[dict], final: Optional[dict]) -> dict[str, Any]:
    """The GPU-hour account of both runs (each run's final ``account`` metrics, from rank 0's trace):
    the saving at equal iterations of each, their difference in points, the faulted run's hours lost
    by cause, and whether productive + lost = total holds; ``account_ok`` when the saving moved at
    most SAVING_TOLERANCE_POINTS and the identity holds."""
    a, c = (final or {}).get("account") or {}, (clean or {}).get("account") or {}
    faulted, ref = a.get("gpu_hours_saved_frac"), c.get("gpu_hours_saved_frac")
    diff = None if faulted is None or ref is None else round((faulted - ref) * 100, 2)
    identity = "gpu_hours_productive" in a and abs(
        a["gpu_hours_productive"] + a["gpu_hours_lost"] - a["gpu_hours"]) <= 1e-9 + 1e-6 * a["gpu_hours"]
    return {"saving_clean": ref, "saving_faulted": faulted, "saving_diff_points": diff,
            "gpu_hours": {k: a.get(k) for k in ("gpu_hours", "gpu_hours_productive", "gpu_hours_lost")},
            "gpu_hours_clean": c.get("gpu_hours"),
            "gpu_hours_lost_by_cause": {k[len("gpu_hours_lost_"):]: a.get(k) for k in LOST_KEYS},
            "replayed_steps": a.get("replayed_steps"), "stalled_steps": a.get("stalled_steps"),
            "account_identity_ok": identity,
            "account_ok": bool(identity and diff is not None and abs(diff) <= SAVING_TOLERANCE_POINTS)}


def compare_runs(args, services: Services, faults: list[dict], restarts: int) -> dict[str, Any]:
    from dyntrain import checkpoint as ck

    from dyntrain.train.state import read_trace

    # every segment's trace, a killed one's too (its steps were appended as they happened)
    segment_dirs = sorted((args.workdir / "trace").glob("chaos-*"))
    segments = [read_trace(d) for d in segment_dirs]
    traces = [t for t in segments if t is not None]
    ended = [t for t in traces if not t["killed"]]
    final = ended[-1] if ended else {}
    clean = read_trace(args.workdir / "trace" / "clean-00")
    first_difference = _first_difference(args.workdir / "trace" / "clean-00", segment_dirs)
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
            "clean_weights_sha256": clean["weights_sha256"], "chaos_weights_sha256": final.get("weights_sha256"),
            **account_figures(clean, final)}
