"""Checkpoints are atomic, weights_only-loadable, and refuse other architectures and pickled code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.weights.checkpoint import (
    check_state_dict,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    torch_load,
)
from tests.conftest import TINY_MAE


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "epoch": step, "batch": 0,
            "step": step, "rng": {"torch": torch.get_rng_state()}}


def test_save_load_prune_and_no_temp_files(tmp_path):
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, _state(s), {"kind": "mae"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt", "checkpoint-00000003.pt"]
    state, meta = load_checkpoint(tmp_path)  # a folder resolves to its newest checkpoint
    assert state["step"] == 3 and meta["kind"] == "mae" and meta["epoch"] == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _at(epoch: int, step: int, batch: int = 0) -> dict:
    return {**_state(step), "epoch": epoch, "batch": batch}


def test_newest_is_by_progress_when_steps_per_epoch_shrink(tmp_path):
    """Resumed with fewer batches per epoch (more processes, less data), a run numbers its steps lower than the
    checkpoints it continues: the newest must stay last, not be pruned at once."""
    save_checkpoint(tmp_path, _at(19, 7020), {}, keep_last=2)
    save_checkpoint(tmp_path, _at(20, 9360), {}, keep_last=2)
    new = save_checkpoint(tmp_path, _at(21, 42), {}, keep_last=2)  # 2 batches per epoch now
    assert new.exists() and find_latest(tmp_path) == new
    assert [load_checkpoint(p)[0]["epoch"] for p in list_checkpoints(tmp_path)] == [20, 21]  # epoch 19 pruned
    mid = save_checkpoint(tmp_path, _at(21, 43, batch=1), {}, keep_last=0)  # mid-epoch 22 sorts after epoch 21's end
    assert find_latest(tmp_path) == mid


def test_a_step_number_taken_by_an_older_checkpoint_is_not_overwritten(tmp_path):
    first = save_checkpoint(tmp_path, _at(1, 42), {}, keep_last=0)
    save_checkpoint(tmp_path, _at(20, 9360), {}, keep_last=0)
    new = save_checkpoint(tmp_path, _at(21, 42), {}, keep_last=0)
    assert new != first and new.name == "checkpoint-00009361.pt"
    assert load_checkpoint(first)[0]["epoch"] == 1 and load_checkpoint(new)[0]["step"] == 42
    assert find_latest(tmp_path) == new
    again = save_checkpoint(tmp_path, _at(21, 42), {}, keep_last=0)  # the same progress again: same file
    assert again == new


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _state(1), {})

    def boom(obj, f, *a, **k):  # the disk fills up half-way through the write
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="no space left on device while writing .*checkpoint-00000002.pt"):
        save_checkpoint(tmp_path, _state(2), {})
    monkeypatch.undo()
    assert find_latest(tmp_path).name == "checkpoint-00000001.pt"
    assert load_checkpoint(tmp_path)[0]["step"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(ValueError, match="pickled Python objects"):
        torch_load(path)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        torch_load(path)


@pytest.mark.parametrize(("content", "what"), [(b'{"epoch": 1, "loss": 0.5}\n', "it is JSON text"),
                                               (b"epoch,loss\n1,0.5\n", "it is text"), (b"", "the file is empty"),
                                               (b"\x00\x01\x02\x03binary", "it starts with bytes 00 01 02 03")])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, what):
    """A log or config passed as --init is named as such, not as an unsafe pickle."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"is not a PyTorch checkpoint \\({what}"):
        torch_load(path)


def test_architecture_mismatch_names_keys_and_shapes():
    small = MaskedAutoencoderViT(**TINY_MAE)
    other = MaskedAutoencoderViT(**{**TINY_MAE, "embed_dim": 32, "depth": 3})
    with pytest.raises(ValueError) as e:
        check_state_dict(other.state_dict(), {k: tuple(v.shape) for k, v in small.state_dict().items()}, "small")
    msg = str(e.value)
    assert "blocks.0.attn.qkv.weight" in msg and "(96, 32)" in msg and "(192, 64)" in msg
    assert "unexpected keys 'blocks.2" in msg and msg.startswith("state dict does not fit small")
