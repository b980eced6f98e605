"""The all-rank finite-weights check before every checkpoint save looks at each rank's own elements.

Under ZeRO-3 a parameter holds only its partition (``ds_tensor``), padded to one size on every rank;
DeepSpeed allocates it with ``torch.empty`` and never writes the padding, so the padding holds
whatever bits the memory had. The check must ignore it (it once refused a good checkpoint, "non-finite
weights after step 3", from finite losses) and must still catch a NaN in a real element. The partition
layout used here is DeepSpeed's: ``ds_numel`` elements split into ``ceil(ds_numel / world)`` per rank,
rank r holding elements ``[r * size, (r + 1) * size)``.
"""
from __future__ import annotations

import pytest
import torch

from dyntrain.train import trainer
from dyntrain.train.trainer import local_weights


NAN = float("nan")


def zero3_param(values: list[float], world: int, rank: int, pad: float = NAN) -> torch.nn.Parameter:
    size = -(-len(values) // world)
    own = values[rank * size:(rank + 1) * size]
    p = torch.nn.Parameter(torch.empty(0))          # what ZeRO-3 leaves in the module
    p.ds_numel = len(values)
    p.ds_tensor = torch.tensor(own + [pad] * (size - len(own)))
    p.ds_process_group = None
    return p


@pytest.fixture
def as_rank(monkeypatch):
    def set_rank(rank: int) -> None:
        monkeypatch.setattr(trainer.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(trainer.dist, "get_rank", lambda group=None: rank)
    return set_rank


def finite(params) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in local_weights(params))


def test_padding_of_the_last_partition_is_not_a_weight(as_rank):
    as_rank(1)
    padded = zero3_param([1.0, 2.0, 3.0, 4.0, 5.0], world=2, rank=1)      # rank 1: [4, 5, pad]
    assert torch.isnan(padded.ds_tensor).any()
    assert [t.tolist() for t in local_weights([padded])] == [[4.0, 5.0]]
    tiny = zero3_param([7.0], world=2, rank=1)                             # rank 1: [pad] only
    assert [t.numel() for t in local_weights([tiny])] == [0]
    assert finite([padded, tiny])


def test_a_nan_in_a_real_element_is_still_caught(as_rank):
    as_rank(1)
    assert not finite([zero3_param([1.0, 2.0, 3.0, NAN, 5.0], world=2, rank=1)])
    as_rank(0)
    assert not finite([zero3_param([1.0, NAN, 3.0, 4.0, 5.0], world=2, rank=0)])
    assert finite([zero3_param([1.0, 2.0, 3.0, NAN, 5.0], world=2, rank=0)])  # rank 1's element


def test_without_zero3_the_whole_tensor_is_checked():
    plain = torch.nn.Parameter(torch.tensor([1.0, NAN]))
    assert not finite([plain])
    assert finite([torch.nn.Parameter(torch.ones(3))])
