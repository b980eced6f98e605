"""The model's contract without a server: the image table's cells, the inference parameters and their
errors, which jobs log their model (``tracking.log_model``), and the serving limits (each at and just
over its value; the python model in this process refuses with MLflow's 400 before decoding)."""
from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from png_files import png_header, zero_png

from dyntrain.config import load_config
from dyntrain.errors import ConfigError
from dyntrain.serving.contract import (ContractError, decode_png, decode_row, encode_png, image_rows,
                                       options_from_params, params_table, read_rows)
from dyntrain.serving.limits import LimitError, ServingLimits
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


# ------------------------------------------------------------------------------ serving limits
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_serving_limits_come_from_the_environment_with_defaults():
    assert ServingLimits.from_env({}) == ServingLimits()
    got = ServingLimits.from_env({"DYNTRAIN_SERVE_MAX_PIXELS": "1000", "DYNTRAIN_SERVE_MAX_MEMORY_MB": "512.5",
                                  "DYNTRAIN_SERVE_CONCURRENCY": " "})
    assert (got.max_pixels, got.max_memory_mb, got.concurrency) == (1000, 512.5, 1)
    with pytest.raises(LimitError, match="DYNTRAIN_SERVE_MAX_ROWS='many' is not an integer"):
        ServingLimits.from_env({"DYNTRAIN_SERVE_MAX_ROWS": "many"})
    with pytest.raises(LimitError, match="DYNTRAIN_SERVE_MAX_TILES must be a positive number, got 0"):
        ServingLimits.from_env({"DYNTRAIN_SERVE_MAX_TILES": "0"})


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_rows_text_and_pixels_are_refused_at_one_over_their_limit_from_the_header_alone():
    ten = _b64(_file(np.zeros((10, 10, 3), np.uint8), "PNG"))
    limits = ServingLimits(max_rows=2, max_pixels=120, max_request_pixels=220, max_request_mb=2 * len(ten) / 2 ** 20)
    assert [im.width * im.height for im in read_rows([ten, ten], limits)] == [100, 100]
    with pytest.raises(LimitError, match="3 rows .*over DYNTRAIN_SERVE_MAX_ROWS=2"):
        read_rows([ten] * 3, dataclasses.replace(limits, max_request_mb=64))
    with pytest.raises(LimitError, match="over DYNTRAIN_SERVE_MAX_REQUEST_MB="):
        read_rows([ten, ten + "="], limits)
    # pixels: only the header is there (no image data), so these are refused without decoding anything
    assert read_rows([_b64(png_header(12, 10))], limits)[0].height == 10  # 120: at the limit
    with pytest.raises(LimitError, match="row 1: the image is 11x11 = 121 pixels, over DYNTRAIN_SERVE_MAX_PIXELS=120"):
        read_rows([ten, _b64(png_header(11, 11))], limits)
    read_rows([ten, _b64(png_header(12, 10))], limits)  # 220 in all: at the request's limit
    with pytest.raises(LimitError, match="221 pixels together, over DYNTRAIN_SERVE_MAX_REQUEST_PIXELS=220"):
        read_rows([_b64(png_header(11, 11)), _b64(png_header(10, 10))], dataclasses.replace(limits, max_pixels=121))
    with pytest.raises(LimitError, match="13000x13000 = 169000000 pixels, over DYNTRAIN_SERVE_MAX_PIXELS=16777216"):
        decode_row(_b64(png_header(13000, 13000)), 0)  # the defaults
    with pytest.raises(LimitError, match="row 0: refused as a decompression bomb"):
        read_rows([_b64(png_header(20000, 20000))])  # over Pillow's own limit: its error, named as ours
    with pytest.raises(ContractError, match="row 0: the image does not decode"):
        decode_row(_b64(png_header(12, 10)), 0, limits)  # within the limit, decoded: no data


def test_parameter_ranges_at_and_just_over_their_limits():
    limits = ServingLimits(max_tile=128, max_overlap=40, max_memory_mb=1024)

    def options(**params):
        return options_from_params(params, ["S", "L"], "L", False, limits)[0]

    assert options(tile=128, overlap=32).tile == 128 and options(tile=64, overlap=16).tile == 64
    assert options(overlap=40).overlap == 40
    assert options(max_memory_mb=1024).max_memory_mb == 1024
    assert options().max_memory_mb == 1024  # the signature's default (4096) stands for the server's budget
    for params, words in [({"tile": 136}, r"tile=136 is out of \[64, 128\].*DYNTRAIN_SERVE_MAX_TILE"),
                          ({"tile": 56, "overlap": 8}, r"tile=56 is out of \[64, 128\]"),
                          ({"tile": 128, "overlap": 33}, "overlap=33 is over a quarter of tile=128"),
                          ({"overlap": 41}, "overlap=41 is over DYNTRAIN_SERVE_MAX_OVERLAP=40"),
                          ({"max_memory_mb": 1024.5}, "max_memory_mb=1024.5 is over this server's budget "
                                                      "DYNTRAIN_SERVE_MAX_MEMORY_MB=1024"),
                          ({"max_memory_mb": 1e8}, "max_memory_mb=1e[+]08 is over"),
                          ({"max_memory_mb": 0.0}, "max_memory_mb must be > 0")]:
        with pytest.raises(LimitError, match=words):
            options(**params)


def test_model_passes_and_pass_memory_at_and_just_over_their_limits():
    limits = ServingLimits(max_tiles=10)
    limits.check_passes([(4, 100, 64), (6, 100, 64)], bytes_per_pixel=2 ** 20, memory_mb=100, tile=64)
    with pytest.raises(LimitError, match="11 model passes .*over DYNTRAIN_SERVE_MAX_TILES=10"):
        limits.check_passes([(5, 100, 64), (6, 100, 64)], bytes_per_pixel=2 ** 20, memory_mb=100, tile=64)
    with pytest.raises(LimitError, match=r"row 1: the whole image \(tile=0\) needs about 101 MB .*over max_memory_mb=100"):
        limits.check_passes([(1, 100, None), (1, 101, None)], bytes_per_pixel=2 ** 20, memory_mb=100, tile=0)
    with pytest.raises(LimitError, match=r"row 0: the smallest tile \(72 px\) .*raise max_memory_mb"):
        limits.check_passes([(9, 101, 72)], bytes_per_pixel=2 ** 20, memory_mb=100, tile=None)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_python_model_refuses_over_limit_requests_with_400_and_keeps_no_state_per_value(tmp_path):
    """``DyNetModel`` in this process (as MLflow's server holds it): each refusal is MLflow's 400
    naming the limit, before decoding; a normal request then restores; what it keeps between
    requests does not grow with new parameter values."""
    from types import SimpleNamespace

    import pandas as pd
    from mlflow.exceptions import MlflowException

    from dynet import DyNet
    from dyntrain.checkpoint.weights import save_weights
    from dyntrain.config import dynet_config_from_dict
    from dyntrain.serving.pyfunc import DyNetModel

    arch = load_config(None, ["model.dim=8", "model.prompt_dims=[8,8,16]", "model.prompt_sizes=[16,8,4]",
                              "model.num_refinement=1"]).model.architecture()
    weights = save_weights(tmp_path / "w.safetensors", DyNet(dynet_config_from_dict(arch)).state_dict(), arch)
    model = DyNetModel()
    model.load_context(SimpleNamespace(artifacts={"weights": str(weights)}))

    def predict(cells, **params):
        return model.predict(None, pd.DataFrame({"image": cells}), params=params)

    big = _b64(png_header(4000, 3000))  # 12 MP, within the pixel limit; no image data: never decoded
    for cells, params, words in [([_b64(png_header(13000, 13000))], {}, "over DYNTRAIN_SERVE_MAX_PIXELS"),
                                 ([big], {"tile": 0}, "row 0: the whole image .* over max_memory_mb=4096"),
                                 ([big], {"max_memory_mb": 1e8}, "over this server's budget"),
                                 ([big], {"max_memory_mb": 10.0}, "model passes .*over DYNTRAIN_SERVE_MAX_TILES"),
                                 ([big], {"max_memory_mb": 1.0}, "smallest tile .*raise max_memory_mb"),
                                 ([big] * 17, {}, "17 rows")]:
        with pytest.raises(MlflowException, match=words) as caught:
            predict(cells, **params)
        assert caught.value.get_http_status_code() == 400
    small = _b64(_file(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8), "PNG"))
    for tile, overlap in [(64, 16), (128, 8), (-1, 0), (0, 32), (-1, 31)]:
        out = predict([small, small], variant="S", tile=tile, overlap=overlap, max_memory_mb=100.0 + overlap)
        assert decode_png(out["image"][1]).shape == (20, 28, 3)
    assert set(model._bytes_per_pixel) == set(model.variants) and not hasattr(model, "_restorers")
