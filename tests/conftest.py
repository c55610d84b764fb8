"""Shared fixtures: tiny towers, a batch, deterministic seeds."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import IMAGE_SIZE, QUERY_LEN, VOCAB


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    """The tiny tokenizer's processor (the tiny towers' canvas), one per test module (a module may define its own)."""
    from tests.ddp_worker import make_processor

    return make_processor(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_batch(batch: int = 2, seed: int = 0, image_size: int = IMAGE_SIZE, query_len: int = QUERY_LEN,
               vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Random pixels, a right-padded pixel mask, token ids with padding and (cx, cy, w, h) labels."""
    g = torch.Generator().manual_seed(seed)
    pixel_mask = torch.ones(batch, image_size, image_size, dtype=torch.long)
    pixel_mask[-1, :, image_size * 3 // 4:] = 0
    attention_mask = torch.ones(batch, query_len, dtype=torch.long)
    attention_mask[-1, query_len // 2:] = 0
    return {
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g),
        "pixel_mask": pixel_mask,
        "input_ids": torch.randint(3, vocab, (batch, query_len), generator=g),
        "attention_mask": attention_mask,
        # boxes on the canvas: centres in [0.35, 0.65], sides in [0.2, 0.5]
        "labels": torch.rand(batch, 4, generator=g) * 0.3 + torch.tensor([0.35, 0.35, 0.2, 0.2]),
    }


@pytest.fixture
def one_thread():
    """Tiny models run ~20x faster on one thread than on two contended ones (``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()
