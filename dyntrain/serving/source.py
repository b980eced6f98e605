"""``--model models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``, ``runs:/RUN/model``) for the entry
points that otherwise take ``--checkpoint``: the logged model's files, fetched from MLflow.

``fetch_model`` downloads the model into a temporary folder (removed when the process exits) and
returns its weights file (or, for a model logged as a reference, the checkpoint it names), its router
when it has one, and its default variant; the caller loads them as it loads a checkpoint.
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dyntrain.checkpoint.weights import referenced_checkpoint
from dyntrain.errors import DyntrainError
from dyntrain.redaction import redact_uri
from dyntrain.serving.pyfunc_names import ROUTER, SERVING, WEIGHTS, WEIGHTS_REF


URI_SCHEMES = ("models:/", "runs:/")


class ModelSourceError(DyntrainError, ValueError):
    """A model URI that does not resolve, or a model that is not a logged DyNet."""


@dataclass(frozen=True)
class FetchedModel:
    """Args:
    uri: the model URI asked for.
    weights: the weights file (or checkpoint folder) to load.
    router: the router file, or None.
    default_variant: the variant the model serves when none is asked for.
    """
    uri: str
    weights: Path
    router: Optional[Path]
    default_variant: str


def fetch_model(uri: str, tracking_uri: str) -> FetchedModel:
    """The files of the logged DyNet model ``uri`` (see the module docstring)."""
    if not uri.startswith(URI_SCHEMES):
        raise ModelSourceError(f"--model {uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or "
                               "runs:/RUN_ID/model")
    # lazy: mlflow is needed only where a model is fetched from it (the GPU image has none)
    import mlflow
    from mlflow.models import Model

    dst = tempfile.mkdtemp(prefix="dyntrain-model-")
    atexit.register(shutil.rmtree, dst, True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # models:/ URIs are resolved by the registry
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
        pyfunc = Model.load(str(local)).flavors.get("python_function", {})
    except mlflow.exceptions.MlflowException as exc:
        raise ModelSourceError(f"--model {uri} at {redact_uri(tracking_uri)}: {exc.message}") from None
    files = {name: local / spec["path"] for name, spec in (pyfunc.get("artifacts") or {}).items()}
    if WEIGHTS in files:
        weights = files[WEIGHTS]
    elif WEIGHTS_REF in files:
        weights = referenced_checkpoint(files[WEIGHTS_REF])  # inside the model unless allowed
        if not weights.exists():
            raise ModelSourceError(f"--model {uri} is logged as a reference to the checkpoint {weights}, "
                                   "which is not reachable from here")
    else:
        raise ModelSourceError(f"--model {uri} is not a DyNet model logged by dyntrain (no weights artifact)")
    serving = json.loads(files[SERVING].read_text()) if SERVING in files else {}
    return FetchedModel(uri, weights, files.get(ROUTER), serving.get("default_variant", "L"))
