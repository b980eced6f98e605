"""The trained model as an MLflow Model, against the real MLflow tracking server of the session
(``conftest.mlflow_server``): a 2-rank CPU fine-tune (ZeRO-3, so the weights are consolidated from
partitions) with ``tracking.register_as`` logs its model into the run and registers a version with
the tags; ``mlflow.pyfunc.load_model`` restores images bit for bit as ``launch/restore.py
--checkpoint`` does (S and L, fp32, CPU); ``restore.py --model models:/NAME@ALIAS`` after
``compare.py --promote``; ``mlflow models serve`` answers scoring requests (and 400 for bad ones and
for requests over the serving limits, within seconds and with its memory bounded, serving on); and a
tracking server that is down at the end of the run costs one warning, not the run.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import deepspeed_cmd, free_port

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "tests/rank_entry.py"
CKPT = "runs/quickstart-finetune/checkpoints"
NAME = "dynet-serving-test"
EXPERIMENT = "dynet-serving"
TINY = ["model.dim=8", "model.heads=[1,2,4,8]", "model.num_refinement=1", "model.prompt_len=5",
        "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]", "model.prompt_heads=4"]
FT_ARGS = ["--config", ROOT / "configs/finetune_quickstart.yaml", "init.checkpoint=null", *TINY,
           "run.max_steps=2", "run.log_every=1", "eval.every=0", "checkpoint.every=0",
           "data.tasks={denoise: 1, derain: 1, dehaze: 1}", "deepspeed.zero_stage=3",
           f"tracking.experiment={EXPERIMENT}"]
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def _run(cmd, cwd: Path, timeout: float = 600, env=None, check: bool = True) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + "\n---stderr---\n" + proc.stderr[-4000:]
    print(f"{' '.join(str(c) for c in cmd[:3])}: {time.monotonic() - t0:.1f}s")
    return proc


def _cli(script: str):
    """``launch/<script>.py``'s ``main``, to run in this process (the same code as the command,
    without an interpreter start-up per call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{script}", ROOT / f"launch/{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _png(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Generated fine-tuning data, and the inputs: a JPEG of the test set and an odd-sized PNG."""
    from PIL import Image

    work = tmp_path_factory.mktemp("serving")
    _run([sys.executable, "-m", "dyntrain.data.finetune.paired", "demo", "--out", "data/finetune_demo",
          "--train-images", "4", "--test-images", "1", "--height", "40", "--width", "48"], work)
    inputs = work / "inputs"
    inputs.mkdir()
    (hazy,) = sorted((work / "data/finetune_demo/test/sots/outdoor/hazy").glob("*.jpg"))[:1]
    (inputs / "hazy.jpg").write_bytes(hazy.read_bytes())
    yy, xx = np.mgrid[0:37, 0:45]
    rng = np.random.default_rng(0)
    smooth = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.normal(0, 12, (37, 45, 3))
    Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(inputs / "odd.png")
    return work


@pytest.fixture(scope="module")
def finetuned(work, mlflow_server) -> dict:
    """The fine-tune with tracking.register_as; returns its run id and the registered version."""
    from mlflow.tracking import MlflowClient

    proc = _run(deepspeed_cmd(2, ROOT / "launch/finetune.py", *FT_ARGS, f"tracking.uri={mlflow_server.uri}",
                              f"tracking.register_as={NAME}"), work)
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                filter_string="tags.`dyntrain.stage` = 'finetune'")
    (version,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    return {"run": run, "version": version, "stdout": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def restored(work, finetuned) -> dict[str, dict[str, np.ndarray]]:
    """What ``launch/restore.py --checkpoint`` writes to a .png for each input, with S and with L
    (its ``main`` run in this process). One torch thread, as
    the tests' ``load_model`` has (conftest): on the CPU, bit-for-bit equality holds at equal thread
    counts (a module fixture runs before the per-test fixture that sets it, so it is set here)."""
    import torch

    out: dict[str, dict[str, np.ndarray]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _restore_all(_cli("restore"), work, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _restore_all(restore_main, work: Path, out: dict) -> None:
    from PIL import Image

    for variant in ("S", "L"):
        out[variant] = {}
        for src in sorted((work / "inputs").iterdir()):
            dst = work / "restored" / variant / f"{src.stem}.png"
            assert restore_main(["--checkpoint", str(work / CKPT), "--variant", variant, "--device", "cpu",
                             str(src), str(dst)]) == 0
            out[variant][src.name] = np.asarray(Image.open(dst))


def test_the_run_holds_the_model_and_the_registry_a_version_with_the_tags(finetuned, mlflow_server):
    from mlflow.tracking import MlflowClient

    run, version = finetuned["run"], finetuned["version"]
    assert f"registered as {NAME} version {version.version}" in finetuned["stdout"]
    assert version.name == NAME and version.run_id == run.info.run_id
    tags = version.tags
    assert tags["dyntrain.variants"] == "S,L"
    assert json.loads(tags["dyntrain.reuse"]) == {"S": [2, 3, 3, 4], "L": [4, 6, 6, 8]}
    assert tags["dyntrain.step"] == "2" and tags["dyntrain.checkpoint_tag"] == "step_00000002"
    assert len(tags["dyntrain.data_fingerprint"]) == 16 and tags["dyntrain.recipe"] == "paper"
    assert tags["dyntrain.weights"] == "copy" and tags["dyntrain.router"] == "false"
    client = MlflowClient(mlflow_server.uri)
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.tags["dyntrain.step"] == "2"
    assert logged.experiment_id == run.info.experiment_id


def test_load_model_restores_bit_for_bit_as_restore_py(work, finetuned, restored, mlflow_server):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server.uri)
    run_id, number = finetuned["run"].info.run_id, finetuned["version"].version
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{number}")
    params = model.metadata.get_params_schema()
    assert {p.name: p.default for p in params.params} == {
        "variant": "L", "tile": -1, "overlap": 32, "max_memory_mb": 4096.0, "gray_world": False,
        "tolerance_db": 0.05}
    names = sorted(restored["S"])
    table = pd.DataFrame({"image": [_b64(work / "inputs" / n) for n in names]})
    for variant in ("S", "L"):
        out = model.predict(table, params={"variant": variant})
        assert list(out.columns) == ["image"] and len(out) == len(names)
        for name, text in zip(names, out["image"]):
            assert np.array_equal(_png(text), restored[variant][name]), (variant, name)
    by_run = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(table)  # default variant: L
    assert all(np.array_equal(_png(t), restored["L"][n]) for n, t in zip(names, by_run["image"]))


def test_promote_then_restore_by_alias(work, finetuned, restored, mlflow_server, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    monkeypatch.chdir(work)
    uri, run_id = mlflow_server.uri, finetuned["run"].info.run_id
    assert _cli("compare")(["--tracking-uri", uri, "--promote", run_id, "--alias", "production"]) == 0
    assert f"{NAME}@production -> version {finetuned['version'].version}" in capsys.readouterr().out
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias(NAME, "production").run_id == run_id
    assert _cli("restore")(["--model", f"models:/{NAME}@production", "--tracking-uri", uri, "--variant", "S",
                            "--device", "cpu", "inputs/hazy.jpg", "by_alias.png"]) == 0
    assert np.array_equal(np.asarray(Image.open(work / "by_alias.png")), restored["S"]["hazy.jpg"])
    # evaluate.py --model: the metrics go to a child of the run the model came from
    assert _cli("evaluate")(["--model", f"models:/{NAME}@production", "--variant", "S", "--child", "--device",
                             "cpu", "--config", str(ROOT / "configs/finetune_quickstart.yaml"),
                             f"tracking.uri={uri}", "eval.max_images=1"]) == 0
    (child,) = client.search_runs([finetuned["run"].info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert "eval/S/average/psnr" in child.data.metrics
    # a run whose model was never logged is refused, by name
    bare = client.create_run(finetuned["run"].info.experiment_id, run_name="no-model").info.run_id
    client.set_terminated(bare)
    proc = _run([sys.executable, ROOT / "launch/compare.py", "--tracking-uri", uri, "--promote", bare,
                 "--alias", "production"], work, check=False)
    assert proc.returncode == 2
    assert f"run {bare} (no-model) has no logged model" in proc.stderr
    assert client.get_model_version_by_alias(NAME, "production").run_id == run_id


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_mlflow_models_serve_answers_scoring_requests(work, finetuned, restored, mlflow_server):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/{finetuned['version'].version}",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = (work / "serve.log").open("wb")
    # MLflow starts the scoring server as a plain `uvicorn` command: the environment's bin on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    server = subprocess.Popen(cmd, cwd=work, env=_env(MLFLOW_TRACKING_URI=mlflow_server.uri, PATH=path), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (work / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 120 s"
            time.sleep(0.3)
        jpeg = _b64(work / "inputs/hazy.jpg")
        status, body = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[jpeg]]},
                                                     "params": {"variant": "S"}})
        assert status == 200, body
        got = _png(body["predictions"][0]["image"])
        assert got.shape == restored["S"]["hazy.jpg"].shape
        assert _psnr(got, restored["S"]["hazy.jpg"]) > 60
        png = _b64(work / "inputs/odd.png")
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"image": png}]})  # default L
        assert status == 200 and _psnr(_png(body["predictions"][0]["image"]), restored["L"]["odd.png"]) > 60
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]})
        assert 400 <= status < 500 and "row 0" in body["message"] and "neither PNG nor JPEG" in body["message"]
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"image": png}], "params": {"variant": "XL"}})
        assert 400 <= status < 500 and "unknown variant 'XL'" in body["message"]
        _refuses_over_limit_requests_with_memory_bounded(url, server.pid)
        status, body = _post(f"{url}/invocations", {"dataframe_records": [{"image": jpeg}], "params": {"variant": "S"}})
        assert status == 200 and _psnr(_png(body["predictions"][0]["image"]), restored["S"]["hazy.jpg"]) > 60
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:  # killed already, by the memory guard of the limits' check
            pass
        server.wait()
        log.close()


REFUSAL_S = 15          # each over-limit request is answered within this (0.1 s measured; 2 shared cores)
RSS_GROWTH_MB = 200     # the server's process tree grows by less than this while refusing them


def _tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and its descendants (``mlflow models serve`` -> uvicorn)."""
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _refuses_over_limit_requests_with_memory_bounded(url: str, pid: int) -> None:
    """A 13000x13000 PNG (a 0.5 MB file: 507 MB decoded), tile=0 on a 4000x3000 image (12 MP, within
    the pixel limit; whole, the tiny model would need ~19 GB of activations by the project's estimate)
    and a huge max_memory_mb each get a 400 naming the limit within REFUSAL_S, while the server's
    process tree stays within RSS_GROWTH_MB of where it was (sampled every 50 ms). Before the limits
    the first of them had no answer in 30 s and the tree passed 4.7 GB."""
    import threading

    from png_files import zero_png

    huge, large = base64.b64encode(zero_png(13000, 13000)).decode(), base64.b64encode(zero_png(4000, 3000)).decode()
    base = peak = _tree_rss(pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(pid))
            if peak - base > 4 * RSS_GROWTH_MB * 2 ** 20:  # limits broken: fail before the machine runs out
                os.killpg(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for image, params, words in [(huge, {}, "13000x13000 = 169000000 pixels, over DYNTRAIN_SERVE_MAX_PIXELS="),
                                     (large, {"tile": 0}, "the whole image (tile=0) needs about"),
                                     (large, {"max_memory_mb": 1e8}, "over this server's budget "
                                                                     "DYNTRAIN_SERVE_MAX_MEMORY_MB=4096")]:
            start = time.monotonic()
            try:
                status, body = _post(f"{url}/invocations", {"dataframe_records": [{"image": image}], "params": params})
            except OSError as exc:
                raise AssertionError(f"{params}: no answer ({exc!r}); the server's tree grew by "
                                     f"{(peak - base) / 2 ** 20:.0f} MiB (killed over {4 * RSS_GROWTH_MB})") from None
            seconds = time.monotonic() - start
            print(f"refused {params or 'a 13000x13000 PNG'}: {status} in {seconds:.2f} s")
            assert status == 400 and words in body["message"], (status, body.get("message", "")[-500:])
            assert seconds < REFUSAL_S
    finally:
        done.set()
        sampler.join()
    print(f"server tree RSS {base / 2 ** 20:.0f} MiB before the refusals, peak {peak / 2 ** 20:.0f} MiB")
    assert peak - base < RSS_GROWTH_MB * 2 ** 20, (base, peak)


def test_tracking_server_down_at_the_end_costs_one_warning_not_the_run(work, tmp_path):
    """The server dies after the last step (the run held there by --pause-at; one process): the run
    still ends with status 0, the final checkpoint is complete, and the model logging says so once."""
    from conftest import MlflowServer

    server = MlflowServer(tmp_path / "mlflow").start()
    go = tmp_path / "go"
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, ENTRY, "--pause-at", f"2@{go}", ROOT / "launch/finetune.py", *FT_ARGS,
           f"tracking.uri={server.uri}", "tracking.register_as=dynet-serving-down",
           "tracking.flush_timeout_s=2", f"checkpoint.dir={ckpt}"]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=work, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not Path(f"{go}.waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
            time.sleep(0.1)
        server.stop()
        go.write_text("go")
        out, _ = proc.communicate(timeout=240)
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert (ckpt / "step_00000002" / "COMPLETE").is_file()
    warnings = [line for line in out.splitlines() if "MLflow model of run" in line and "not logged" in line]
    assert len(warnings) == 1, out[-4000:]
    assert f"checkpoints in {ckpt} are intact" in warnings[0]
    from dyntrain.checkpoint.weights import load_weights
    state, model_cfg = load_weights(ckpt)
    assert state and model_cfg["dim"] == 8


def test_a_model_over_the_size_limit_is_logged_as_a_reference_to_its_checkpoint(work, finetuned, restored,
                                                                               mlflow_server, monkeypatch):
    import mlflow
    import pandas as pd

    from mlflow.tracking import MlflowClient

    from dyntrain.serving.publish import log_checkpoint_model

    # a run of its own, so that the fine-tuning run keeps exactly one logged model
    run_id = MlflowClient(mlflow_server.uri).create_run(finetuned["run"].info.experiment_id,
                                                        run_name="reference").info.run_id
    logged = log_checkpoint_model(mlflow_server.uri, run_id, work / CKPT, max_mb=0.01)
    assert logged.reference and logged.registered is None
    assert logged.tags["dyntrain.weights"] == "reference"
    assert "over tracking.model_max_mb=0" in logged.tags["dyntrain.weights_note"]
    assert str((work / CKPT).resolve() / "step_00000002") in logged.tags["dyntrain.weights_note"]
    monkeypatch.setenv("DYNTRAIN_CHECKPOINT_ROOTS", str(work))  # a model may name checkpoints under it
    model = mlflow.pyfunc.load_model(logged.model_uri)
    out = model.predict(pd.DataFrame({"image": [_b64(work / "inputs/odd.png")]}), params={"variant": "S"})
    assert np.array_equal(_png(out["image"][0]), restored["S"]["odd.png"])


def test_a_router_beside_the_checkpoint_is_logged_and_serves_variant_auto(work, finetuned, mlflow_server):
    """variant=auto: the router in the logged model chooses as ``restore.py --variant auto`` does."""
    import shutil

    import mlflow
    import pandas as pd
    import torch
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from dynet.router import RouterConfig, VariantRouter
    from dyntrain.restore import load_model
    from dyntrain.routing.router import save_router
    from dyntrain.serving.publish import log_checkpoint_model

    routed = work / "routed_ckpt"
    shutil.copytree(work / CKPT, routed, dirs_exist_ok=True)
    model = load_model(routed)
    torch.manual_seed(0)
    save_router(routed / "router.pt", VariantRouter(RouterConfig(variants=model.variants)), model)
    run_id = MlflowClient(mlflow_server.uri).create_run(finetuned["run"].info.experiment_id,
                                                        run_name="routed").info.run_id
    logged = log_checkpoint_model(mlflow_server.uri, run_id, routed)
    assert logged.tags["dyntrain.router"] == "true"
    assert _cli("restore")(["--checkpoint", str(routed), "--variant", "auto", "--device", "cpu",
                            str(work / "inputs/odd.png"), str(work / "auto.png")]) == 0
    out = mlflow.pyfunc.load_model(logged.model_uri).predict(
        pd.DataFrame({"image": [_b64(work / "inputs/odd.png")]}), params={"variant": "auto"})
    assert np.array_equal(_png(out["image"][0]), np.asarray(Image.open(work / "auto.png")))
    with pytest.raises(Exception, match="needs a router"):  # the fine-tuning run's model has none
        mlflow.pyfunc.load_model(f"runs:/{finetuned['run'].info.run_id}/model").predict(
            pd.DataFrame({"image": [_b64(work / "inputs/odd.png")]}), params={"variant": "auto"})
