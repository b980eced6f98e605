"""The model's contract without MLflow: the image table's cells, the inference parameters and their
errors, and which jobs log their model (``tracking.log_model``)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from dyntrain.config import load_config
from dyntrain.errors import ConfigError
from dyntrain.serving.contract import (ContractError, decode_png, decode_row, encode_png, image_rows,
                                       options_from_params, params_table)
from dyntrain.serving.hook import ModelLogging, model_logging


def _file(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_png_and_jpeg_rows_decode_and_the_output_is_an_exact_png():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (13, 21, 3), dtype=np.uint8)
    assert np.array_equal(decode_row(base64.b64encode(_file(img, "PNG")).decode(), 0), img)
    jpeg = decode_row(base64.b64encode(_file(img, "JPEG")), 1)  # bytes are accepted too
    assert jpeg.shape == img.shape and jpeg.dtype == np.uint8
    grey = decode_row(base64.b64encode(_file(img[..., 0], "PNG")), 2)  # grey -> RGB, as restore.py reads it
    assert grey.shape == (13, 21, 3) and np.array_equal(grey[..., 1], img[..., 0])
    assert np.array_equal(decode_png(encode_png(img)), img)


@pytest.mark.parametrize("cell, words", [
    ("not base64 !", "not valid base64"),
    (base64.b64encode(b"plain text, not an image").decode(), "neither PNG nor JPEG"),
    (base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode(), "does not decode"),
    (42, "must hold base64 text"),
])
def test_a_bad_cell_is_a_contract_error_naming_the_row(cell, words):
    with pytest.raises(ContractError, match=f"row 3: .*{words}"):
        decode_row(cell, 3)


def test_the_table_needs_an_image_column():
    assert image_rows(["image"], lambda c: ["a", "b"]) == ["a", "b"]
    with pytest.raises(ContractError, match=r"needs a column 'image'.*\['picture'\]"):
        image_rows(["picture"], lambda c: [])


def test_parameters_defaults_and_errors():
    assert {p.name: p.default for p in params_table("L")} == {
        "variant": "L", "tile": -1, "overlap": 32, "max_memory_mb": 4096.0, "gray_world": False,
        "tolerance_db": 0.05}
    options, tol = options_from_params(None, ["S", "L"], "L", has_router=False)
    assert (options.variant, options.tile, options.overlap, options.gray_world, tol) == ("L", None, 32, False, 0.05)
    options, _ = options_from_params({"variant": "S", "tile": 0, "gray_world": True}, ["S", "L"], "L", False)
    assert (options.variant, options.tile, options.gray_world) == ("S", 0, True)
    assert options_from_params({"variant": "auto"}, ["S", "L"], "L", True)[0].variant == "auto"
    for params, words in [({"variant": "XL"}, r"unknown variant 'XL'; this model has \['S', 'L'\]"),
                          ({"variant": "auto"}, "needs a router"),
                          ({"tile": 12}, "tile: a multiple of 8"),
                          ({"overlap": -1}, "overlap >= 0"),
                          ({"colour": 1}, r"unknown parameter\(s\) \['colour'\]")]:
        with pytest.raises(ContractError, match=words):
            options_from_params(params, ["S", "L"], "L", has_router=False)


def test_which_jobs_log_their_model():
    cfg = load_config(None, [])
    assert cfg.tracking.log_model == "auto" and cfg.tracking.register_as is None
    assert [type(h) for h in model_logging(cfg, default=True)] == [ModelLogging]  # fine-tuning
    assert model_logging(cfg, default=False) == []                                # pre-training
    on = load_config(None, ["tracking.log_model=true"])
    assert len(model_logging(on, default=False)) == 1
    assert model_logging(load_config(None, ["tracking.log_model=false"]), default=True) == []
    assert model_logging(load_config(None, ["tracking.enabled=false"]), default=True) == []
    with pytest.raises(ConfigError, match="tracking.register_as"):
        load_config(None, ["tracking.register_as=' '"])
    with pytest.raises(ConfigError, match="tracking.model_max_mb"):
        load_config(None, ["tracking.model_max_mb=0"])
