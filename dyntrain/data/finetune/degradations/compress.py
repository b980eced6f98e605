"""JPEG: a standard baseline JPEG encode and decode (libjpeg through Pillow, 4:2:0 chroma)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    """The JPEG file of an (H, W, 3) uint8 image at IJG ``quality`` (1..100)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``I = decode(encode(J, q))`` with the IJG quantisation tables scaled to quality q
    (In-Dis U(30, 70), Out-Dis U(10, 30), rounded to an integer).

    Where it runs: when clean patches come from shards (``synthetic_shards``), JPEG does not come
    here: ``fn.jpeg_compression_distortion`` runs inside the DALI pipeline at the same drawn quality
    (on the GPU when decoding is ``mixed``; on the CPU its output equals this function's, checked in
    tests/test_synthetic_shards.py). The folder form and ``launch/make_testsets.py`` have no DALI
    pipeline (images are read by Pillow on the host), so they keep this host path: libjpeg through
    Pillow, one call per image, then the batch goes back to ``x``'s device."""
    host = x.detach().round().clamp(0, 255).to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img, q in zip(host, p["quality"].tolist()):
        with Image.open(io.BytesIO(jpeg_bytes(img, round(q)))) as dec:
            out.append(np.asarray(dec.convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, torch.float32)
