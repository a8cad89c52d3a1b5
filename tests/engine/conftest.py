"""Fixtures of the MoE engine tests (adapters, attribution, selection, routing)."""

from __future__ import annotations

import pytest
import torch

from tests.engine._moe_hand import make_batch

# One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core box
# oversubscribed threads made these tests 10x slower (86 s vs 8.6 s measured).
torch.set_num_threads(1)


@pytest.fixture
def padded_batches() -> list[dict]:
    """Two right-padded batches with different lengths (padding inside each)."""
    return [make_batch([9, 5, 7], 9, seed=1), make_batch([4, 8], 8, seed=2)]
