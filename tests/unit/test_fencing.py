"""Fence epochs: the floor each epoch gives, and the bound that keeps fences exact in Lua."""

from __future__ import annotations

import pytest

from sendscript.fencing import EPOCH_SHIFT, MAX_EPOCH, EpochExhausted, fence_floor


def test_each_epoch_floor_is_above_every_fence_of_the_epochs_before() -> None:
    assert fence_floor(0) == 0
    assert fence_floor(1) == 2 ** 32
    for epoch in (1, 2, 1000, MAX_EPOCH):
        # An earlier epoch hands out fewer than 2**EPOCH_SHIFT fences above its floor.
        assert fence_floor(epoch - 1) + 2 ** EPOCH_SHIFT - 1 < fence_floor(epoch)


def test_the_last_epoch_still_gives_fences_exact_as_doubles() -> None:
    top = fence_floor(MAX_EPOCH) + 2 ** EPOCH_SHIFT - 1
    assert top == 2 ** 53 - 1
    assert float(top) == top


@pytest.mark.parametrize("epoch", [-1, MAX_EPOCH + 1])
def test_an_epoch_outside_the_range_is_refused(epoch: int) -> None:
    with pytest.raises(EpochExhausted):
        fence_floor(epoch)
