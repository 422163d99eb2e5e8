"""Shared test helpers: paths, tiny models and determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "official_mae_small.pt"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def official():
    """The official-implementation parity fixture (tests/fixtures/README.md): part of the repository, so a
    missing file fails the parity tests instead of skipping them."""
    assert FIXTURE.exists(), f"parity fixture missing: {FIXTURE} (it is committed with the tests; restore it)"
    return torch.load(FIXTURE, weights_only=True)


TINY_MAE = dict(
    img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4,
    decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
)
