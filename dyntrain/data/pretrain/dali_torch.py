"""DALI outputs -> torch tensors, shared by the pre-training and the paired-shard loaders."""
from __future__ import annotations

import torch


def dali_to_torch(batch, device: torch.device) -> torch.Tensor:
    """A DALI batch (TensorList) of equal-shape uint8 images -> a (B, H, W, C) uint8 torch tensor:
    on ``device`` when DALI produced it on the GPU (nvJPEG), on the CPU otherwise. Copies once."""
    # lazy: DALI is loaded only by the code that runs a pipeline (the GPU image may lack it)
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.tensors import TensorListGPU

    dense = batch.as_tensor()
    if isinstance(batch, TensorListGPU):
        out = torch.empty(tuple(dense.shape()), dtype=torch.uint8, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    out = torch.empty(tuple(dense.shape()), dtype=torch.uint8)
    feed_ndarray(dense, out)
    return out
