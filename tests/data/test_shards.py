"""Tar shards (data/shards.py, data/stream.py, `fastmae shard`): the epoch plan's properties, exact resume, pipe:
URLs, damaged shards and members, missing shards, and shards read like the folders they were written from."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.cli import main
from fastmae.data.shards import (
    index_shards,
    plan_epoch,
    rank_batches,
    shard_urls,
    window_order,
)
from fastmae.data.stream import ShardLoader

NORM = dict(channels=1, mean=(0.5,), std=(0.5,))


def write_shards(folder: Path, sizes: list[int], hw=(12, 10), labelled=True) -> list[Path]:
    """Shards of grey PNGs whose label (.cls) is the sample's global number, so batches tell which samples they
    hold; pixel values also encode it."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s, n in enumerate(sizes):
        path = folder / f"part-{s:03d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for _ in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.full(hw, k % 251, dtype=np.uint8)).save(buf, format="PNG")
                sample = {"__key__": f"k{k:05d}", "png": buf.getvalue()}
                if labelled:
                    sample["cls"] = str(k).encode()
                w.write(sample)
                k += 1
        paths.append(path)
    return paths


def loader(index, *, rank=0, world=1, workers=0, batch=4, train=True, **kw) -> ShardLoader:
    return ShardLoader(index, img_size=(8, 8), batch_size=batch, train=train, rank=rank, world_size=world,
                       num_workers=workers, seed=3, buffer=kw.pop("buffer", 6), **NORM, **kw)


def epoch_of(index, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of epoch 0 of a loader over `index` (kw: the `loader` helper's)."""
    ld = loader(index, **kw)
    ld.set_epoch(0)
    return list(ld)


def ids(batches) -> list[int]:
    return [int(v) for _, y in batches for v in y]


def test_window_order_is_a_permutation_within_its_buffer():
    order = window_order(500, 16, seed=1)
    assert sorted(order.tolist()) == list(range(500))
    assert all(order[j] < j + 16 for j in range(500))  # never ahead of what a 16-sample buffer has read
    assert not np.array_equal(order, np.arange(500))
    assert np.array_equal(order, window_order(500, 16, seed=1))


def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers():
    counts = (12,) * 8  # 8 shards for 2 ranks x 2 workers: they divide evenly
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            plans = plan_epoch(counts, epoch=epoch, seed=0, train=True, rank=rank, world_size=2, workers=2,
                               batch_size=4, buffer=5)
            assert sum(len(p.positions) for p in plans) == rank_batches(96, 2, 4, True) == 12
            for p in plans:
                starts = np.cumsum((0,) + p.counts)
                for v in p.order.tolist():
                    s = int(np.searchsorted(starts, v, side="right")) - 1
                    seen.append((p.shards[s], v - starts[s]))
        assert len(seen) == 96 and len(set(seen)) == 96
    a = plan_epoch(counts, epoch=4, seed=0, train=True, rank=1, world_size=2, workers=2, batch_size=4, buffer=5)
    b = plan_epoch(counts, epoch=4, seed=0, train=True, rank=1, world_size=2, workers=2, batch_size=4, buffer=5)
    c = plan_epoch(counts, epoch=5, seed=0, train=True, rank=1, world_size=2, workers=2, batch_size=4, buffer=5)
    assert all(np.array_equal(x.order, y.order) and x.shards == y.shards for x, y in zip(a, b))
    assert any(x.shards != y.shards or not np.array_equal(x.order, y.order) for x, y in zip(a, c))


def test_loaders_of_two_ranks_with_two_workers_see_every_image_once(tmp_path):
    index = index_shards(shard_urls(str(tmp_path / "part-{000..007}.tar")) if write_shards(tmp_path, [8] * 8)
                         else [])
    seen = []
    for rank in range(2):
        ld = loader(index, rank=rank, world=2, workers=2)
        ld.set_epoch(1)
        batches = list(ld)
        assert len(batches) == len(ld) == 8
        seen += ids(batches)
    assert sorted(seen) == list(range(64))


def test_unequal_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    write_shards(tmp_path, [3, 17, 5, 9, 6])
    index = index_shards(shard_urls(str(tmp_path / "part-{000..004}.tar")))
    for epoch in range(3):
        lengths = []
        for rank in range(2):
            ld = loader(index, rank=rank, world=2, workers=2)
            ld.set_epoch(epoch)
            got = ids(list(ld))
            lengths.append(len(got))
            assert len(got) == len(ld) * 4 == rank_batches(40, 2, 4, True) * 4
        assert lengths[0] == lengths[1]


def test_resume_mid_epoch_yields_the_same_batches_without_repeats(tmp_path):
    write_shards(tmp_path, [10, 10, 10])
    index = index_shards(shard_urls(str(tmp_path / "part-{000..002}.tar")))
    ld = loader(index, workers=2, buffer=8)
    ld.set_epoch(2)
    full = list(ld)
    for start in (1, 3, 6):
        ld.set_epoch(2, start)
        rest = list(ld)
        assert len(rest) == len(full) - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[start:], rest))
    assert Counter(ids(full)).most_common(1)[0][1] == 1


def test_evaluation_reads_every_sample_once_in_shard_order(tmp_path):
    write_shards(tmp_path, [5, 6])
    index = index_shards(shard_urls(str(tmp_path / "part-{000..001}.tar")))
    assert ids(epoch_of(index, train=False, batch=4)) == list(range(11))


def test_pipe_urls_and_list_files(tmp_path):
    paths = write_shards(tmp_path / "s", [4, 4])
    listed = tmp_path / "s" / "shards.txt"
    listed.write_text("part-000.tar\n# a comment\npart-001.tar\n")  # relative to the list's folder
    assert shard_urls(str(listed)) == [str(p) for p in paths]
    urls = [f"pipe:cat {p}" for p in paths]
    index = index_shards(urls)
    assert index.counts == (4, 4)
    assert ids(epoch_of(index, train=False)) == list(range(8))
    assert len(shard_urls("::".join(urls))) == 2


def test_missing_shard_is_one_line_naming_it(tmp_path):
    write_shards(tmp_path, [2])
    with pytest.raises(FileNotFoundError, match=r"part-001.tar does not exist"):
        shard_urls(str(tmp_path / "part-{000..001}.tar"))


def test_damaged_shard_stops_naming_it_or_is_filled_in_with_skip_corrupt(tmp_path):
    paths = write_shards(tmp_path, [8, 8])
    index = index_shards([str(p) for p in paths])  # counted whole
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # the tar stream breaks half way
    with pytest.raises(ValueError, match=r"part-001.tar.*--data.skip_corrupt"):
        epoch_of(index, train=False)
    ld = loader(index, train=False, skip_corrupt=True)
    ld.set_epoch(0)
    got = ids(list(ld))
    assert len(got) == 16 and set(range(8)) <= set(got) and ld.skipped


def test_corrupt_image_member_names_the_sample(tmp_path):
    import webdataset as wds

    path = tmp_path / "bad-000.tar"
    good = io.BytesIO()
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(good, format="PNG")
    with wds.TarWriter(str(path), encoder=False) as w:
        w.write({"__key__": "ok", "png": good.getvalue(), "cls": b"0"})
        w.write({"__key__": "broken", "png": b"not a png", "cls": b"1"})
    index = index_shards([str(path)])
    with pytest.raises(ValueError, match=r"bad-000.tar#broken"):
        epoch_of(index, train=False)
    ld = loader(index, train=False, skip_corrupt=True)
    ld.set_epoch(0)
    assert ids(list(ld)) == [0, 0] and any("broken" in s for s in ld.skipped)


def _class_folder(root: Path, n_per_class=6) -> None:
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            img = (rng.random((16, 16)) * 60 + 80 * c).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")


def test_shard_command_and_knn_gives_the_folders_top1(tmp_path, capsys):
    _class_folder(tmp_path / "train")
    _class_folder(tmp_path / "eval", 3)
    for split in ("train", "eval"):
        assert main(["shard", "--data.source", "folder", "--data.path", str(tmp_path / split), "--output",
                     str(tmp_path / "sh" / f"{split}-%03d.tar"), "--shard.max_count", "5"]) == 0
    out = capsys.readouterr().out
    assert "wrote 9 samples in 2 shards" in out and "train-{000..003}.tar" in out
    sizes = json.loads((tmp_path / "sh" / "sizes.json").read_text())
    assert sizes == {"train-000.tar": 5, "train-001.tar": 5, "train-002.tar": 5, "train-003.tar": 3,
                     "eval-000.tar": 5, "eval-001.tar": 4}
    assert json.loads((tmp_path / "sh" / "classes.json").read_text()) == ["c0", "c1", "c2"]
    # shards keep each file's bytes
    first = index_shards([str(tmp_path / "sh" / "train-000.tar")])
    assert first.counts == (5,)
    # never replaced
    assert main(["shard", "--data.source", "folder", "--data.path", str(tmp_path / "train"), "--output",
                 str(tmp_path / "sh" / "train-%03d.tar")]) == 2
    assert "exists: shards are never replaced" in capsys.readouterr().err
    model = ["--init", "random", "--model.name", "vit_tiny_patch4", "--model.img_size", "16", "16",
             "--model.embed_dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--data.channels", "1",
             "--run.no_progress", "--run.precision", "fp32", "--knn.k", "3"]
    assert main(["knn", "--data.source", "folder", "--data.path", str(tmp_path / "train"), "--data.eval_path",
                 str(tmp_path / "eval"), "--run.output_dir", str(tmp_path / "k1"), *model]) == 0
    assert main(["knn", "--data.source", "shards", "--data.path", str(tmp_path / "sh" / "train-{000..003}.tar"),
                 "--data.eval_path", str(tmp_path / "sh" / "eval-{000..001}.tar"), "--data.num_workers", "2",
                 "--run.output_dir", str(tmp_path / "k2"), *model]) == 0
    a, b = (json.loads((tmp_path / k / "knn.json").read_text()) for k in ("k1", "k2"))
    assert a["top1"] == b["top1"] and a["train"] == b["train"] == 18 and a["eval"] == b["eval"] == 9


@pytest.mark.parametrize(("args", "message"), [
    (["--output", "x.tar"], "needs one integer field"),
    (["--output", "x-%s.tar"], "needs one integer field"),
    (["--data.source", "folder", "--data.path", "/nonexistent/x"], "/nonexistent/x"),
])
def test_shard_command_bad_input(tmp_path, capsys, args, message):
    os.chdir(tmp_path)
    assert main(["shard", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_pretrain_on_shards_stopped_mid_epoch_resumes_bit_exactly(tmp_path, monkeypatch):
    """A seeded run from shards with two loader workers, stopped in its second epoch and resumed, ends with the
    weights of an uninterrupted run (the resumed epoch re-reads the buffer's shards and skips what was emitted)."""
    from fastmae.commands.pretrain import run_pretrain
    from tests.helpers.cli import tiny_args
    from tests.faults.test_stops import QUIET, assert_same_weights, cfg_of, stop_at_call

    write_shards(tmp_path / "sh", [12] * 4, hw=(20, 20))

    def args(out):
        return tiny_args(str(tmp_path / "sh" / "part-{000..003}.tar"), out, epochs=2) + QUIET + [
            "--data.source", "shards", "--data.channels", "1", "--data.num_workers", "2", "--data.shuffle_buffer",
            "10", "--model.img_size", "16", "16", "--optim.batch_size", "8"]

    run_pretrain(cfg_of(args(tmp_path / "full")))
    stop_at_call(monkeypatch, 9)  # one poll a batch (and one before the first), 6 batches an epoch: epoch 2, batch 4
    run_pretrain(cfg_of(args(tmp_path / "part")))
    from fastmae.weights.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "part")[0]
    assert (state["epoch"], state["batch"]) == (1, 4)
    monkeypatch.undo()
    run_pretrain(cfg_of(args(tmp_path / "part")))
    assert_same_weights(tmp_path / "full", tmp_path / "part")


def test_embed_rows_name_each_shard_sample_in_order(tmp_path):
    """fastmae embed of shards lists SHARD#N per row, matching the labels it wrote (the labels are the ids)."""
    from safetensors.torch import load_file

    write_shards(tmp_path / "sh", [5, 6, 3], hw=(16, 16))
    pattern = str(tmp_path / "sh" / "part-{000..002}.tar")
    assert main(["embed", "--init", "random", "--model.name", "vit_tiny_patch4", "--model.img_size", "16", "16",
                 "--model.embed_dim", "32", "--model.depth", "1", "--model.num_heads", "2", "--data.source", "shards",
                 "--data.path", pattern, "--data.channels", "1", "--data.num_workers", "2", "--embed.split", "train",
                 "--embed.batch_size", "4", "--run.output_dir", str(tmp_path / "e")]) == 0
    rows = (tmp_path / "e" / "train.txt").read_text().splitlines()
    labels = load_file(str(tmp_path / "e" / "train.safetensors"))["labels"].tolist()
    starts = {"part-000.tar": 0, "part-001.tar": 5, "part-002.tar": 11}
    assert len(rows) == len(labels) == 14
    assert [starts[Path(r.split("#")[0]).name] + int(r.split("#")[1]) for r in rows] == labels


@pytest.mark.parametrize("kind", ["pipe", "garbage", "label"])
def test_unreadable_shards_are_one_line_naming_them(tmp_path, capsys, kind):
    import webdataset as wds

    if kind == "pipe":
        path = f"pipe:cat {tmp_path / 'nothere.tar'}"
    elif kind == "garbage":
        (tmp_path / "bad.tar").write_text("not a tar file")
        path = str(tmp_path / "bad.tar")
    else:
        path = str(tmp_path / "lab.tar")
        with wds.TarWriter(path, encoder=False) as w:
            w.write({"__key__": "x", "png": b"\x89PNG", "cls": b"cat"})
    code = main(["knn", "--init", "random", "--data.source", "shards", "--data.path", path, "--data.eval_path", path,
                 "--run.output_dir", str(tmp_path / "k")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert {"pipe": "its command failed", "garbage": "not a readable tar file",
            "label": "x.cls holds b'cat', not an integer class index"}[kind] in err[0]


def test_a_shard_command_that_does_not_finish_leaves_no_shard(tmp_path, monkeypatch, capsys):
    """Stopped (or failing) after some shards were written, `fastmae shard` removes them: the rerun starts afresh
    instead of being refused by the shards it left."""
    from fastmae.commands import shard as cmd

    _class_folder(tmp_path / "train")
    real, calls = cmd._payload, {"n": 0}

    def fail_late(item):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(5, "Input/output error")
        return real(item)

    monkeypatch.setattr(cmd, "_payload", fail_late)
    args = ["shard", "--data.source", "folder", "--data.path", str(tmp_path / "train"), "--output",
            str(tmp_path / "sh" / "t-%03d.tar"), "--shard.max_count", "4"]
    assert main(args) != 0  # the I/O error ends the command
    assert not list((tmp_path / "sh").iterdir())  # shards 0 and 1 were complete, and are gone with the rest
    monkeypatch.undo()
    assert main(args) == 0 and len(list((tmp_path / "sh").glob("*.tar"))) == 5
    assert main(["shard", "--output", str(tmp_path / "x-%d" / "t.tar")]) == 2
    assert "goes in the file name" in capsys.readouterr().err
