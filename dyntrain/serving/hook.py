"""The end of a training run logs its model: ``ModelLogging``, an end hook of ``run_training``.

On rank 0, after the last step and its checkpoint, before the MLflow run is ended: the newest
checkpoint of ``checkpoint.dir`` becomes the run's MLflow Model (``dyntrain.serving.publish``) and,
with ``tracking.register_as``, a new version of that registered model. The tracking rules hold: a
failure (the server down, a full disk, a registry refusing the name) is one warning naming it and
saying the checkpoints are intact; the run still ends, with its own status.

Whether a job logs its model is ``tracking.log_model``: true, false, or "auto" = the job's default
(``model_logging(cfg, default=...)``: fine-tuning yes, pre-training no).
"""
from __future__ import annotations

from typing import Optional

from dyntrain.config import Config
from dyntrain.logs import get_logger
from dyntrain.redaction import mlflow_uri, redact
from dyntrain.train.run import RunEnd


log = get_logger(__name__)


class ModelLogging:
    """``run_training`` end hook: log (and register) the run's model on rank 0; never raises."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.logged = None  # the LoggedModel, once logged

    def __call__(self, end: RunEnd) -> None:
        if end.rank != 0:
            return
        t, where = self.cfg.tracking, redact("tracking.uri", self.cfg.tracking.uri)
        ckpt = self.cfg.checkpoint.dir
        if not ckpt:
            log.warning("MLflow model not logged: the run has no checkpoint.dir to take the weights from")
            return
        if end.run_id is None:
            log.warning("MLflow model not logged: there is no MLflow run at %s (the tracking server was "
                        "unreachable); the checkpoints in %s are intact", where, ckpt)
            return
        try:
            # lazy: publish imports mlflow inside its functions; kept off the import of every job
            from dyntrain.serving.publish import log_checkpoint_model

            self.logged = log_checkpoint_model(mlflow_uri(t.uri), end.run_id, ckpt, register_as=t.register_as,
                                               max_mb=t.model_max_mb, run_tags=end.tags,
                                               data_section=self.cfg.public_dict().get("data", {}))
        except Exception as exc:  # noqa: BLE001 - the tracking rules: warn, never stop the run
            log.warning("MLflow model of run %s not logged at %s (%s: %s); the run goes on and its "
                        "checkpoints in %s are intact", end.run_id, where, type(exc).__name__,
                        _first_line(exc), ckpt)
            return
        registered = (f", registered as {self.logged.registered} version {self.logged.version}"
                      if self.logged.registered else "")
        log.info("MLflow model of run %s logged: %s%s", end.run_id, self.logged.model_uri, registered)


def model_logging(cfg: Config, default: bool) -> list[ModelLogging]:
    """The end hooks a job passes to ``run_training``: one ``ModelLogging`` when ``tracking.log_model``
    (or, when it is "auto", ``default``) says so and tracking is on; none otherwise."""
    wanted: Optional[bool] = default if cfg.tracking.log_model == "auto" else bool(cfg.tracking.log_model)
    if not wanted or not cfg.tracking.enabled:
        return []
    return [ModelLogging(cfg)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else ""
