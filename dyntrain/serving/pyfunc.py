"""The DyNet family as an MLflow ``pyfunc`` model: ``DyNetModel`` restores a table of images.

MLflow keeps an instance of ``DyNetModel`` in the logged model (``python_model.pkl``, pickled by
reference to this module, so the project must be installed where the model is loaded) and calls
``load_context`` once with the model's artifacts, then ``predict`` per request:

    weights     the consolidated ``.safetensors`` export with its model config, or, for a model over
                ``tracking.model_max_mb``, ``weights_ref.json`` naming the checkpoint it came from
    router      (optional) the variant router, for ``variant=auto``
    serving     ``serving.json``: the default variant

The input and output tables, and the inference parameters, are ``dyntrain.serving.contract``'s.
A request that breaks the contract raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which
MLflow's scoring server answers with HTTP 400 and the message.

This module imports mlflow at the top: only MLflow (loading a model) and ``dyntrain.serving.publish``
(logging one) import it, both where mlflow is installed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from dynet.inference import gray_world
from dyntrain.checkpoint.weights import referenced_checkpoint
from dyntrain.devices import choose_device
from dyntrain.images import to_tensor
from dyntrain.restore import Restorer, RestoreOptions, load_model
from dyntrain.routing.router import load_routing
from dyntrain.serving.contract import (AUTO, IMAGE_COLUMN, ContractError, decode_row, encode_png, image_rows,
                                       options_from_params)
from dyntrain.serving.pyfunc_names import ROUTER, SERVING, WEIGHTS, WEIGHTS_REF


def weights_source(artifacts: dict[str, str]) -> str:
    """The weights a logged model loads: its copy, or the checkpoint its ``weights_ref.json`` names."""
    if WEIGHTS in artifacts:
        return artifacts[WEIGHTS]
    return str(referenced_checkpoint(artifacts[WEIGHTS_REF]))  # inside the model unless allowed


class DyNetModel(mlflow.pyfunc.PythonModel):
    """A DyNet (every variant of one set of weights) and, when logged with one, its router."""

    def load_context(self, context) -> None:
        artifacts = dict(context.artifacts)
        self.device = choose_device("auto")
        self.model = load_model(weights_source(artifacts), self.device)
        serving = json.loads(Path(artifacts[SERVING]).read_text()) if SERVING in artifacts else {}
        self.default_variant = serving.get("default_variant", "L")
        self.router_file: Optional[str] = artifacts.get(ROUTER)
        self._routings: dict[float, Any] = {}
        self._restorers: dict[tuple, Restorer] = {}

    @property
    def variants(self) -> list[str]:
        return list(self.model.variants)

    def predict(self, context, model_input, params: Optional[dict[str, Any]] = None):
        # lazy: pandas comes with mlflow; the table is built only here
        import pandas as pd

        try:
            options, tolerance = options_from_params(params, self.variants, self.default_variant,
                                                     self.router_file is not None)
            rows = image_rows(model_input.columns, lambda c: model_input[c].tolist())
            images = [decode_row(value, i) for i, value in enumerate(rows)]
        except ContractError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        restored = [self.restore(img, options, tolerance) for img in images]
        return pd.DataFrame({IMAGE_COLUMN: [encode_png(img) for img in restored]})

    def restore(self, img: np.ndarray, options: RestoreOptions, tolerance_db: float) -> np.ndarray:
        """One (H, W, 3) uint8 image restored as ``launch/restore.py`` does with the same options."""
        if options.variant == AUTO:
            routing = self._routing(tolerance_db)
            x = to_tensor(img, self.device)
            chosen, _ = routing.choose(gray_world(x) if options.gray_world else x)
            options = dataclasses.replace(options, variant=chosen)
        key = dataclasses.astuple(options)
        restorer = self._restorers.get(key)
        if restorer is None:
            restorer = self._restorers[key] = Restorer(self.model, options, self.device)
        with torch.no_grad():
            out, _ = restorer(img)
        return out

    def _routing(self, tolerance_db: float):
        if tolerance_db not in self._routings:
            # the router file is checked against the model when it is loaded
            self._routings[tolerance_db] = load_routing(self.router_file, self.model, self.router_file,
                                                        tolerance_db)
        return self._routings[tolerance_db]
