"""The DyNet family as an MLflow ``pyfunc`` model: ``DyNetModel`` restores a table of images.

MLflow keeps an instance of ``DyNetModel`` in the logged model (``python_model.pkl``, pickled by
reference to this module, so the project must be installed where the model is loaded) and calls
``load_context`` once with the model's artifacts, then ``predict`` per request:

    weights     the consolidated ``.safetensors`` export with its model config, or, for a model over
                ``tracking.model_max_mb``, ``weights_ref.json`` naming the checkpoint it came from
    router      (optional) the variant router, for ``variant=auto``
    serving     ``serving.json``: the default variant

The input and output tables, and the inference parameters, are ``dyntrain.serving.contract``'s.
A request that breaks the contract, or asks for more than the serving limits allow
(``dyntrain.serving.limits``, read from the environment in ``load_context``), raises
``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers with HTTP
400 and the message; every limit is checked before an image is decoded. Images are then decoded,
restored and encoded one at a time, by at most ``concurrency`` requests at once; a request that finds
no free slot within MLflow's request timeout gets 503 (``TEMPORARILY_UNAVAILABLE``).

The state kept between requests is bounded: one router, and the activation bytes per pixel of each
variant of the model (on CUDA they are measured once per variant); nothing is cached per parameter value.

This module imports mlflow at the top: only MLflow (loading a model) and ``dyntrain.serving.publish``
(logging one) import it, both where mlflow is installed.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from dynet.inference import gray_world
from dyntrain.checkpoint.weights import referenced_checkpoint
from dyntrain.devices import choose_device
from dyntrain.images import to_tensor
from dyntrain.restore import Restorer, RestoreOptions, load_model
from dyntrain.routing.router import Routing, load_routing
from dyntrain.serving.contract import (AUTO, IMAGE_COLUMN, ContractError, RowImage, decode_image, encode_png,
                                       image_rows, options_from_params, read_rows)
from dyntrain.serving.limits import LimitError, ServingLimits, env_name
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
        self.limits = ServingLimits.from_env()
        self.device = choose_device("auto")
        self.model = load_model(weights_source(artifacts), self.device)
        serving = json.loads(Path(artifacts[SERVING]).read_text()) if SERVING in artifacts else {}
        self.default_variant = serving.get("default_variant", "L")
        self.router_file: Optional[str] = artifacts.get(ROUTER)
        self._routing: Optional[Routing] = None
        self._bytes_per_pixel: dict[str, float] = {}  # one entry per variant of the model, at most
        self._slots = threading.BoundedSemaphore(self.limits.concurrency)

    @property
    def variants(self) -> list[str]:
        return list(self.model.variants)

    def predict(self, context, model_input, params: Optional[dict[str, Any]] = None):
        # lazy: pandas comes with mlflow; the table is built only here
        import pandas as pd

        try:
            options, tolerance = options_from_params(params, self.variants, self.default_variant,
                                                     self.router_file is not None, self.limits)
            images = read_rows(image_rows(model_input.columns, lambda c: model_input[c].tolist()), self.limits)
            self.check_tiling(images, options)
        except (ContractError, LimitError) as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
        if not self._slots.acquire(timeout=timeout):
            raise MlflowException(f"the server is busy: {self.limits.concurrency} request(s) at a time "
                                  f"({env_name('concurrency')}), none free within {timeout} s",
                                  error_code=TEMPORARILY_UNAVAILABLE)
        try:
            restored = []
            for image in images:  # one decoded image at a time
                try:
                    img = decode_image(image)
                except ContractError as exc:
                    raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
                restored.append(encode_png(self.restore(img, options, tolerance)))
                del img
        finally:
            self._slots.release()
        return pd.DataFrame({IMAGE_COLUMN: restored})

    def check_tiling(self, images: list[RowImage], options: RestoreOptions) -> None:
        """LimitError when an image's tiling, known from its header, needs a model pass over the
        request's ``max_memory_mb`` or the request more passes than the limit (``auto``: the variant
        that needs most)."""
        names = self.variants if options.variant == AUTO else [options.variant]
        restorers = [self.restorer(dataclasses.replace(options, variant=name)) for name in names]
        worst = max(restorers, key=lambda r: r.bytes_per_pixel)
        plans = [worst.plan(image.height, image.width) for image in images]
        self.limits.check_passes([(p.passes, p.pass_pixels, p.tile) for p in plans], worst.bytes_per_pixel,
                                 options.max_memory_mb, options.tile)

    def restorer(self, options: RestoreOptions) -> Restorer:
        """A Restorer for ``options`` (cheap: the bytes per pixel of its variant are kept)."""
        bpp = self._bytes_per_pixel.get(options.variant)
        restorer = Restorer(self.model, options, self.device, bytes_per_pixel=bpp)
        self._bytes_per_pixel[options.variant] = restorer.bytes_per_pixel
        return restorer

    def restore(self, img: np.ndarray, options: RestoreOptions, tolerance_db: float) -> np.ndarray:
        """One (H, W, 3) uint8 image restored as ``launch/restore.py`` does with the same options."""
        if options.variant == AUTO:
            routing = dataclasses.replace(self.routing(), tolerance_db=tolerance_db)
            x = to_tensor(img, self.device)
            chosen, _ = routing.choose(gray_world(x) if options.gray_world else x)
            del x
            options = dataclasses.replace(options, variant=chosen)
        with torch.no_grad():
            out, _ = self.restorer(options)(img)
        return out

    def routing(self) -> Routing:
        """The logged router, loaded at its first use (the tolerance is set per request)."""
        if self._routing is None:
            # the router file is checked against the model when it is loaded
            self._routing = load_routing(self.router_file, self.model, self.router_file)
        return self._routing
