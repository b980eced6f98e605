"""The read side of MLflow (and the small writes done outside a training run): finding experiments
and runs, metric histories, logging evaluation, comparison and router runs, and the Model Registry's
aliases (``promote_run``).

Training runs log through ``mlflow_tracker`` + ``sender``; everything else that talks to MLflow's
client API (``dyntrain.analysis.compare``, ``dyntrain.eval.evaluate``, ``dyntrain.routing.train``)
goes through here. ``where`` is a tracking URI or a client from ``open_client`` (one client reused for
many calls). mlflow is imported inside the functions: the GPU image has none.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from dyntrain.errors import DyntrainError
from dyntrain.redaction import mlflow_uri, redact_uri
from dyntrain.tracking.mlflow_tracker import experiment_id_for


BATCH = 500  # metrics per log_batch call (MLflow accepts up to 1000)


def open_client(tracking_uri: str) -> Any:
    """An MLflow client of ``tracking_uri``, for the ``where`` argument of the functions here."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(tracking_uri)
    # the registry of the same store: MLflow would otherwise take MLFLOW_REGISTRY_URI, which any
    # mlflow.set_registry_uri in this process (or a parent's) leaves in the environment
    return MlflowClient(uri, registry_uri=uri)


def _client(where: Any) -> Any:
    return open_client(where) if isinstance(where, str) else where


# ------------------------------------------------------------------------------ reading
def find_experiment(where: Any, name: str) -> Optional[Any]:
    """MLflow experiment ``name``, or None."""
    return _client(where).get_experiment_by_name(name)


def find_experiments(where: Any, names: Optional[Sequence[str]]) -> list:
    """The experiments ``names`` (all experiments when None or empty); ValueError naming the known
    ones when one is missing."""
    client = _client(where)
    if names:
        out = []
        for name in names:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                known = [e.name for e in client.search_experiments()]
                raise ValueError(f"MLflow experiment {name!r} not found (known: {known})")
            out.append(exp)
        return out
    return list(client.search_experiments())


def search_runs(tracking_uri: str, experiment_names: Optional[Sequence[str]] = None
                ) -> tuple[dict[str, str], list]:
    """({experiment id: name}, runs oldest first) of the experiments ``experiment_names`` (all when
    None); ValueError when one is missing."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri(tracking_uri))
    exps = find_experiments(tracking_uri, experiment_names)
    if not exps:
        return {}, []
    names = {e.experiment_id: e.name for e in exps}
    runs = mlflow.search_runs(experiment_ids=list(names), output_format="list", max_results=50000,
                              order_by=["attributes.start_time ASC"])
    return names, runs


def search_experiment_runs(where: Any, experiment_id: str, filter_string: str = "",
                           order_by: Sequence[str] = ("attributes.start_time DESC",),
                           max_results: int = 5000) -> list:
    """Runs of one experiment matching ``filter_string`` (MLflow search syntax), newest first."""
    return list(_client(where).search_runs([experiment_id], filter_string, order_by=list(order_by),
                                           max_results=max_results))


def get_run(where: Any, run_id: str) -> Any:
    """The MLflow run ``run_id`` (MLflow's exception when there is none)."""
    return _client(where).get_run(run_id)


def metric_history(where: Any, run_id: str, key: str) -> dict[int, float]:
    """{step: value} of metric ``key`` of run ``run_id`` (the last value logged at a step)."""
    return {m.step: m.value for m in _client(where).get_metric_history(run_id, key)}


# ------------------------------------------------------------------------------ writing
def new_run(tracking_uri: str, experiment: str, name: str, tags: dict[str, str],
            client: Optional[Any] = None) -> str:
    """Id of a new run ``name`` in ``experiment`` (created when missing) with ``tags``; ``client``: an
    ``open_client(tracking_uri)`` to use instead of a new one."""
    client = client if client is not None else open_client(tracking_uri)
    return client.create_run(experiment_id_for(client, experiment, tracking_uri), run_name=name,
                             tags=tags).info.run_id


def log_batch_metrics(where: Any, run_id: str, metrics: Iterable[tuple[str, float, int]],
                      timestamp_ms: Optional[int] = None) -> None:
    """Log (key, value, step) triples to ``run_id``, ``BATCH`` per request, all stamped
    ``timestamp_ms`` (default now)."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.entities import Metric

    client = _client(where)
    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    batch = [Metric(k, float(v), now, step) for k, v, step in metrics]
    for i in range(0, len(batch), BATCH):
        client.log_batch(run_id, metrics=batch[i:i + BATCH])


def log_params(where: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` (values as str) to ``run_id`` in one request."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.entities import Param

    _client(where).log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def set_tag(where: Any, run_id: str, key: str, value: str) -> None:
    _client(where).set_tag(run_id, key, value)


def log_artifact(where: Any, run_id: str, path: str | Path) -> None:
    _client(where).log_artifact(run_id, str(path))


def log_text(where: Any, run_id: str, text: str, name: str) -> None:
    """``text`` as the artifact file ``name`` of ``run_id``."""
    _client(where).log_text(run_id, text, name)


def finish_run(where: Any, run_id: str, status: str = "FINISHED") -> None:
    """End ``run_id`` with ``status`` (FINISHED, FAILED, KILLED)."""
    _client(where).set_terminated(run_id, status)


def log_to_run(metrics: dict[str, float], tracking_uri: str, experiment: str, run_id: Optional[str] = None,
               child: bool = False, step: int = 0, run_name: str = "evaluation",
               tags: Optional[dict[str, str]] = None, texts: Optional[dict[str, str]] = None) -> str:
    """Log ``metrics`` (at ``step``) to run ``run_id``, to a new child run of it (``child``), or — with
    no run id — to a new run in ``experiment``; tags (``dyntrain.stage`` "evaluation" unless given)
    go on a new run, ``dyntrain.evaluated`` on an existing one; ``texts``: {artifact file: text}.
    A new run is ended FINISHED. Returns the id of the run written to."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    import mlflow

    client = open_client(tracking_uri)
    all_tags = {"dyntrain.stage": "evaluation", **(tags or {})}
    created = False
    if run_id is not None:
        try:
            parent = client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise ValueError(f"MLflow run {run_id} not found at {redact_uri(tracking_uri)}: {exc}") from None
        if child:
            run = client.create_run(parent.info.experiment_id, run_name=run_name,
                                    tags={"mlflow.parentRunId": run_id, **all_tags})
            target, created = run.info.run_id, True
        else:
            target = run_id
    else:
        target, created = new_run(tracking_uri, experiment, run_name, all_tags, client=client), True
    log_batch_metrics(client, target, [(k, v, step) for k, v in metrics.items()])
    if not created:
        client.set_tag(target, "dyntrain.evaluated", "true")
    for name, text in (texts or {}).items():
        client.log_text(target, text, name)
    if created:
        client.set_terminated(target, "FINISHED")
    return target


def log_comparison_run(tracking_uri: str, experiment: str, png: str | Path, text: str,
                       compared: Sequence[str]) -> str:
    """A run "comparison" in ``experiment`` (tag dyntrain.stage=comparison, dyntrain.compared_runs)
    holding ``png`` and ``text`` (comparison.txt); FAILED when storing them fails. Returns its id."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    import mlflow

    client = open_client(tracking_uri)
    run_id = new_run(tracking_uri, experiment, "comparison",
                     {"dyntrain.stage": "comparison", "dyntrain.compared_runs": ",".join(compared)[:5000]},
                     client=client)
    try:
        client.log_artifact(run_id, str(png))
        client.log_text(run_id, text + "\n", "comparison.txt")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    mlflow.set_tracking_uri(mlflow_uri(tracking_uri))
    return run_id


# ------------------------------------------------------------------------------ registry
class PromotionError(DyntrainError, ValueError):
    """A run that cannot be promoted: no such run, or its model was never logged or registered."""


def run_model_versions(where: Any, run_id: str) -> list:
    """The registered model versions made from run ``run_id``'s model, newest first."""
    versions = _client(where).search_model_versions(f"run_id = '{run_id}'")
    return sorted(versions, key=lambda v: int(v.creation_timestamp or 0), reverse=True)


def promote_run(tracking_uri: str, run_id: str, alias: str, name: Optional[str] = None) -> tuple[str, str]:
    """Point alias ``alias`` of the registered model at the version made from run ``run_id``'s model;
    returns (name, version). A model logged but not registered is registered as ``name`` first.
    PromotionError naming the run when it does not exist, its model was never logged, or it is
    ambiguous (versions under several names and no ``name``)."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    import mlflow

    client = open_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise PromotionError(f"run {run_id} not found at {redact_uri(tracking_uri)}: {exc.message}") from None
    label = f"run {run_id} ({run.info.run_name})"
    versions = [v for v in run_model_versions(client, run_id) if name is None or v.name == name]
    if not versions:
        outputs = run.outputs.model_outputs if run.outputs is not None else []
        if not outputs:
            raise PromotionError(f"{label} has no logged model (tracking.log_model was off, or logging "
                                 "failed: see the run's log); nothing to promote")
        if name is None:
            raise PromotionError(f"{label} has a logged model that is not registered; give --name to "
                                 "register it under that name")
        mlflow.set_tracking_uri(mlflow_uri(tracking_uri))
        mlflow.set_registry_uri(mlflow_uri(tracking_uri))  # the run's own store, not an inherited one
        version = mlflow.register_model(f"models:/{outputs[-1].model_id}", name)
        versions = [client.get_model_version(name, version.version)]
    names = sorted({v.name for v in versions})
    if len(names) > 1:
        raise PromotionError(f"{label}'s model is registered as {names}; give --name to choose one")
    chosen = versions[0]
    client.set_registered_model_alias(chosen.name, alias, chosen.version)
    return chosen.name, str(chosen.version)
