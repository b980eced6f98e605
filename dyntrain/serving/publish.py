"""Log a DyNet checkpoint as an MLflow Model (``pyfunc`` flavour) into its run, and register it.

``log_checkpoint_model`` builds the model from a DeepSpeed checkpoint folder (any ZeRO stage):

    artifacts   ``dynet.safetensors`` (the consolidated fp32 export with its model config), or, for
                weights over ``max_mb``, ``weights_ref.json`` naming the checkpoint instead of a copy
                (with a note in the tags: such a model loads only where the checkpoint is reachable);
                the router beside the checkpoint (``router.pt``) when there is one; ``serving.json``
    python model ``dyntrain.serving.pyfunc.DyNetModel``
    signature   input and output a table with a string column ``image``; the inference parameters
                of ``dyntrain.serving.contract.params_table`` with the training defaults
    example     one small PNG
    requirements pinned to the versions installed here (the project itself must be installed too:
                serve with ``--env-manager local``)
    tags        variants, reuse frequencies, step, checkpoint tag, data fingerprint, recipe, stage

It goes to run ``run_id`` (MLflow's ``Model.log`` with that run: nothing about the run's state
changes) and, with ``register_as``, becomes a new version of that registered model with the same tags.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from dyntrain.checkpoint.weights import consolidated_weights, save_weights
from dyntrain.config import dynet_config_from_dict
from dyntrain.logs import get_logger
from dyntrain.routing.router import router_path_for
from dyntrain.serving.contract import IMAGE_COLUMN, encode_png, params_table
from dyntrain.serving.pyfunc_names import ROUTER, SERVING, WEIGHTS, WEIGHTS_REF


log = get_logger(__name__)
MODEL_NAME = "model"        # the logged model's name in the run: runs:/<run id>/model
PINNED = ("torch", "numpy", "pillow", "safetensors", "einops", "pandas", "mlflow")
REFERENCE_NOTE = ("weights not copied: {mb:.0f} MB is over tracking.model_max_mb={max_mb:.0f}; this model "
                  "loads them from the checkpoint {path}, which must be reachable where it is loaded")


@dataclass(frozen=True)
class LoggedModel:
    """What was logged: the model's URI (``models:/m-...``), its registered name and version (or
    None), whether the weights are a reference, and its tags."""
    model_uri: str
    registered: Optional[str]
    version: Optional[str]
    reference: bool
    tags: dict[str, str]


def pinned_requirements() -> list[str]:
    """``name==version`` of the packages the python model imports, as installed here."""
    out = []
    for name in PINNED:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def data_fingerprint(data_section: Mapping[str, Any]) -> str:
    """16 hex digits of the run's data section (source, root, URLs, tasks ...): equal for runs that
    read the same data by the same settings (a fingerprint of the config, not of the files)."""
    text = json.dumps(dict(data_section), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_variant(variants: Mapping[str, Any]) -> str:
    """``launch/restore.py``'s default (L) when the model has it, else its last (largest) variant."""
    return "L" if "L" in variants else list(variants)[-1]


def model_tags(model_cfg: dict[str, Any], info: dict[str, Any], run_tags: Mapping[str, str],
               data_section: Mapping[str, Any]) -> dict[str, str]:
    """The tags of the logged model and its registered version."""
    variants = dynet_config_from_dict(model_cfg).variants
    return {
        "dyntrain.variants": ",".join(variants),
        "dyntrain.reuse": json.dumps({k: list(v) for k, v in variants.items()}),
        "dyntrain.step": str(info.get("step")),
        "dyntrain.checkpoint_tag": str(info.get("tag")),
        "dyntrain.data_fingerprint": run_tags.get("dyntrain.data_fingerprint") or data_fingerprint(data_section),
        "dyntrain.recipe": str(run_tags.get("recipe", "")),
        "dyntrain.stage": str(run_tags.get("dyntrain.stage", "")),
    }


def example_table():
    """The input example: one 16x16 grey PNG."""
    # lazy: pandas comes with mlflow
    import pandas as pd

    return pd.DataFrame({IMAGE_COLUMN: [encode_png(np.full((16, 16, 3), 128, np.uint8))]})


def signature(variant: str):
    """Input/output schema (a string column ``image``) and the inference parameters."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    table = Schema([ColSpec("string", IMAGE_COLUMN)])
    params = ParamSchema([ParamSpec(p.name, p.kind, p.default) for p in params_table(variant)])
    return ModelSignature(inputs=table, outputs=table, params=params)


def log_checkpoint_model(tracking_uri: str, run_id: str, checkpoint_dir: str | Path, *,
                         register_as: Optional[str] = None, max_mb: float = 2048.0,
                         run_tags: Optional[Mapping[str, str]] = None,
                         data_section: Optional[Mapping[str, Any]] = None) -> LoggedModel:
    """Log the newest complete checkpoint of ``checkpoint_dir`` as the model of ``run_id`` (see the
    module docstring); MLflow's and the checkpoint's exceptions pass through."""
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    import mlflow
    from mlflow.models import Model

    from dyntrain.serving.pyfunc import DyNetModel  # lazy: imports mlflow at its top

    weights, model_cfg, info = consolidated_weights(checkpoint_dir)
    if not model_cfg:
        raise ValueError(f"checkpoint {checkpoint_dir} carries no model config: cannot log it as a model")
    tags = model_tags(model_cfg, info, run_tags or {}, data_section or {})
    variant = default_variant(dynet_config_from_dict(model_cfg).variants)
    mb = sum(t.numel() * t.element_size() for t in weights.values()) / 2 ** 20
    router = router_path_for(checkpoint_dir)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # register_as goes to the run's store, not an inherited MLFLOW_REGISTRY_URI
    # MLflow files a logged model under the active experiment: the run's, so that runs:/<id>/model finds it
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory(prefix="dyntrain-model-") as tmp:
        artifacts = {SERVING: str(Path(tmp) / "serving.json")}
        Path(artifacts[SERVING]).write_text(json.dumps({"default_variant": variant}))
        reference = mb > max_mb
        if reference:
            tag_dir = Path(checkpoint_dir).resolve() / str(info["tag"])
            note = REFERENCE_NOTE.format(mb=mb, max_mb=max_mb, path=tag_dir)
            artifacts[WEIGHTS_REF] = str(Path(tmp) / "weights_ref.json")
            Path(artifacts[WEIGHTS_REF]).write_text(json.dumps({"checkpoint": str(tag_dir), "note": note}))
            tags.update({"dyntrain.weights": "reference", "dyntrain.weights_note": note})
            log.warning("MLflow model of run %s: %s", run_id, note)
        else:
            artifacts[WEIGHTS] = str(save_weights(Path(tmp) / "dynet.safetensors", weights, model_cfg, info))
            tags["dyntrain.weights"] = "copy"
        if router.is_file():
            artifacts[ROUTER] = str(router)
        tags["dyntrain.router"] = str(router.is_file()).lower()
        model_info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                          python_model=DyNetModel(), artifacts=artifacts, signature=signature(variant),
                          input_example=example_table(), pip_requirements=pinned_requirements(),
                          registered_model_name=register_as, tags=tags, step=int(info.get("step") or 0))
    version = getattr(model_info, "registered_model_version", None)
    return LoggedModel(model_info.model_uri, register_as, None if version is None else str(version), reference, tags)
