"""Shared test helpers: paths, tiny models and determinism."""

from __future__ import annotations

import socket
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_torchrun_env(monkeypatch, world_size: int = 1) -> None:
    """The variables torchrun gives rank 0 of a one-node job."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
