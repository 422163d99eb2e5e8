"""Faults round 4 (issue #43), each case through the CLI: one line naming the file, field and fix (exit 2), never a
traceback, nothing a user wrote replaced, no silently wrong result."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastmae.cli import main
from tests.helpers.cli import make_fmnist, tiny_args
from tests.helpers.coco import write_coco, write_coco_kp

TINY = ["--init", "random", "--model.name", "vit_tiny_patch4", "--model.embed_dim", "16", "--model.depth", "1",
        "--model.num_heads", "2", "--optim.epochs", "1", "--optim.batch_size", "4", "--run.no_progress",
        "--run.precision", "fp32", "--model.img_size", "16", "16"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastmae: error: "), err
    return err


def pose_args(d, ann, out) -> list[str]:
    return ["pose", *TINY, "--data.source", "coco", "--data.path", str(d), "--pose.annotations", str(ann),
            "--data.eval_path", str(d), "--pose.eval_annotations", str(ann), "--run.output_dir", str(out)]


def det_args(d, ann, ev, out) -> list[str]:
    return ["detect", *TINY, "--data.source", "coco", "--data.path", str(d), "--det.annotations", str(ann),
            "--data.eval_path", str(d), "--det.eval_annotations", str(ev), "--run.output_dir", str(out)]


def edit(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("category_id", None, r"annotation 10 has category_id None; each annotation needs the integer category_id"),
    ("area", "big", r"annotation 10 has area 'big'; area is a non-negative number"),
])
def test_a_bad_pose_annotation_field_is_one_line_naming_file_and_annotation(tmp_path, capsys, field, value, message):
    d, ann = write_coco_kp(tmp_path)
    edit(ann, lambda c: c["annotations"][0].update({field: value}))
    assert main(pose_args(d, ann, tmp_path / "o")) == 2
    err = one_line(capsys)
    assert str(ann) in err and re.search(message, err)


def test_detect_with_no_evaluation_box_is_refused_before_training(tmp_path, capsys):
    d, ann = write_coco(tmp_path)
    ev = tmp_path / "empty.json"
    ev.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    assert main(det_args(d, ann, ev, tmp_path / "o")) == 2
    assert "the evaluation split has no (non-crowd) box, so box AP cannot be computed" in one_line(capsys)
    assert not (tmp_path / "o" / "checkpoint-0001.pt").exists()


def test_an_image_listed_twice_is_refused(tmp_path, capsys):
    d, ann = write_coco(tmp_path)
    edit(ann, lambda c: c["images"].append(dict(c["images"][0])))
    assert main(det_args(d, ann, ann, tmp_path / "o")) == 2
    assert "image id 100 is listed twice in 'images'" in one_line(capsys)


def test_a_pose_box_outside_its_image_is_refused(tmp_path, capsys):
    d, ann = write_coco_kp(tmp_path)
    edit(ann, lambda c: c["annotations"][0].update(bbox=[400.0, 300.0, 20.0, 20.0]))
    assert main(pose_args(d, ann, tmp_path / "o")) == 2
    assert "lies outside the 50x40 (WxH) image" in one_line(capsys)


def test_a_keypoint_in_two_flip_pairs_is_refused(tmp_path, capsys):
    d, ann = write_coco_kp(tmp_path)
    assert main(pose_args(d, ann, tmp_path / "o") + ["--pose.flip_pairs", "0", "1", "1", "2"]) == 2
    assert "puts keypoint [1] in more than one pair" in one_line(capsys)


@pytest.mark.parametrize("command", ["pose", "detect"])
def test_a_users_own_result_file_in_a_plain_folder_is_not_replaced(tmp_path, capsys, command):
    out = tmp_path / "mine"
    out.mkdir()
    name = {"pose": "pose.json", "detect": "detections.json"}[command]
    (out / name).write_text('{"mine": true}')
    if command == "pose":
        d, ann = write_coco_kp(tmp_path)
        args = pose_args(d, ann, out)
    else:
        d, ann = write_coco(tmp_path)
        args = det_args(d, ann, ann, out)
    assert main(args) == 2
    assert f"holds {name}, which no fastmae run wrote there" in one_line(capsys)
    assert (out / name).read_text() == '{"mine": true}'


def test_recipe_given_twice_is_refused(capsys):
    with pytest.raises(SystemExit) as e:  # a malformed command line: refused while parsing
        main(["finetune", "--recipe", "fmnist-small", "--recipe", "paper"])
    assert e.value.code == 2
    assert "--recipe is given 2 times (fmnist-small, paper)" in capsys.readouterr().err


def test_fsdp_where_nothing_is_sharded_is_refused_before_any_work(tmp_path, capsys):
    data = make_fmnist(tmp_path)
    assert main(["knn", "--init", "random", "--data.path", str(data), "--run.output_dir", str(tmp_path / "k"),
                 "--run.parallel", "fsdp"]) == 2
    assert "--run.parallel fsdp is for fastmae pretrain and finetune" in one_line(capsys)
    assert not (tmp_path / "k").exists()


def test_a_bare_memory_error_is_the_out_of_memory_line(tmp_path, capsys, monkeypatch):
    import fastmae.commands.knn as knn

    def no_memory(cfg):
        raise MemoryError()

    monkeypatch.setattr(knn, "run_knn", no_memory)
    assert main(["knn", "--init", "random", "--run.output_dir", str(tmp_path / "k")]) == 2
    assert "out of memory (MemoryError); use a smaller model" in one_line(capsys)


def write_shard(folder, labels: dict[str, int]) -> None:
    """folder/s-000000.tar with one 8x8 PNG (and .cls) per key."""
    folder.mkdir(exist_ok=True)
    with tarfile.open(folder / "s-000000.tar", "w") as tar:
        for key, label in labels.items():
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8), 100, dtype=np.uint8)).save(buf, format="PNG")
            for suffix, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def shard_pretrain(tmp_path) -> list[str]:
    args = tiny_args(tmp_path / "unused", tmp_path / "run", epochs=1)
    args[args.index("--data.path") + 1] = str(tmp_path / "sh" / "s-000000.tar")
    return args + ["--data.source", "shards", "--data.num_workers", "0", "--knn_every", "-1", "--figure_every", "0",
                   "--optim.batch_size", "2", "--model.img_size", "8", "8"]


@pytest.mark.parametrize(("sizes", "message"), [
    ("eight", r"sizes.json gives shard s-000000.tar the count 'eight', not a whole number of samples >= 0"),
    (-8, r"sizes.json gives shard s-000000.tar the count -8"),
    (10**9, r"sizes.json says shard s-000000.tar holds 1000000000 samples, but its \d+ bytes hold at most \d+"),
    (0, r"sizes.json gives every shard 0 samples"),
])
def test_shard_counts_are_checked_before_they_are_trusted(tmp_path, capsys, sizes, message):
    write_shard(tmp_path / "sh", {f"k{i}": i % 2 for i in range(4)})
    (tmp_path / "sh" / "sizes.json").write_text(json.dumps({"s-000000.tar": sizes}))
    (tmp_path / "sh" / "classes.json").write_text(json.dumps(["a", "b"]))
    assert main(shard_pretrain(tmp_path)) == 2
    assert re.search(message, one_line(capsys))


def test_a_shard_label_beyond_classes_json_is_one_line(tmp_path, capsys):
    write_shard(tmp_path / "sh", {"k0": 0, "k1": 1, "zz": 7, "k3": 1})
    (tmp_path / "sh" / "sizes.json").write_text(json.dumps({"s-000000.tar": 4}))
    (tmp_path / "sh" / "classes.json").write_text(json.dumps(["a", "b"]))
    assert main(shard_pretrain(tmp_path)) == 2
    assert "s-000000.tar#zz.cls holds 7, but the classes.json beside the shards names 2 classes" in one_line(capsys)


def test_a_vitpose_config_unlike_its_weights_is_refused():
    import torch

    from fastmae.weights.convert.vitpose import check_config_against_weights

    pose = {"encoder.patch_embed.proj.weight": torch.zeros(32, 3, 16, 16),
            "encoder.blocks.0.mlp.fc1.weight": torch.zeros(128, 32), "encoder.blocks.0.norm1.weight": torch.zeros(32)}
    check_config_against_weights({"hidden_size": 32, "num_channels": 3, "mlp_ratio": 4}, pose, 1, 16)
    with pytest.raises(ValueError, match=r"config.json says hidden_size=768 but its weights have 32"):
        check_config_against_weights({"hidden_size": 768}, pose, 1, 16)
    with pytest.raises(ValueError, match=r"says num_hidden_layers=12 but its weights have 1"):
        check_config_against_weights({}, pose, 12, 16)


def test_instances_whose_keypoints_all_score_low_keep_a_ranking_score():
    import torch

    from fastmae.commands.pose import coco_results
    from fastmae.data.pose import PoseSplit

    split = PoseSplit(None, [7, 8], ["a", "b"], torch.tensor([0, 1]), torch.zeros(2, 4), torch.zeros(2, 2, 3),
                      ["p", "q"], [])
    low = {0: torch.tensor([[1.0, 1.0, 0.08], [2.0, 2.0, 0.12]]), 1: torch.tensor([[1.0, 1.0, 0.5], [2.0, 2.0, 0.1]])}
    scores = [r["score"] for r in coco_results(split, low)]
    assert scores == pytest.approx([0.10, 0.5])  # all below 0.2: their mean, not 0; else the mean of those above


def write_foreign_lock(folder, pid: int = 4242) -> None:
    (folder / ".fastmae.lock").write_text(json.dumps({"pid": pid, "host": "node-that-was-preempted", "start": "1"}))


def test_a_requeued_job_waits_for_another_hosts_silent_lock_then_takes_it(tmp_path, monkeypatch, capsys):
    import fastmae.train.runlock as runlock

    monkeypatch.setattr(runlock, "STALE_AFTER_S", 1.0)
    monkeypatch.setattr(runlock, "POLL_S", 0.1)
    write_foreign_lock(tmp_path)
    path = runlock.acquire(tmp_path)
    out = capsys.readouterr().out
    assert "locked by pid 4242 on node-that-was-preempted" in out and "waiting up to 1 s" in out
    assert json.loads(path.read_text())["pid"] == __import__("os").getpid()
    runlock.release(path)


def test_a_live_holder_on_another_host_keeps_its_folder(tmp_path, monkeypatch):
    import os
    import threading
    import time

    import fastmae.train.runlock as runlock

    monkeypatch.setattr(runlock, "STALE_AFTER_S", 5.0)
    monkeypatch.setattr(runlock, "POLL_S", 0.05)
    write_foreign_lock(tmp_path)
    lock = tmp_path / ".fastmae.lock"
    stop = threading.Event()

    def heartbeat():  # the other host's run, alive
        while not stop.wait(0.2):
            os.utime(lock, (time.time() + 1, time.time() + 1))

    beat = threading.Thread(target=heartbeat)
    beat.start()
    try:
        t0 = time.time()
        with pytest.raises(runlock.RunFolderInUseError, match="in use by another fastmae run .pid 4242 on node-that"):
            runlock.acquire(tmp_path)
        assert time.time() - t0 < 2.0  # refused at the first touch, not after the stale time
    finally:
        stop.set()
        beat.join()
    assert json.loads(lock.read_text())["pid"] == 4242


def test_a_grid_of_images_of_several_sizes_neither_overlaps_nor_cuts(tmp_path):
    from fastmae.figures.grid import save_grid

    red, blue = Image.new("RGB", (30, 50), (255, 0, 0)), Image.new("RGB", (60, 20), (0, 0, 255))
    path = save_grid(("a", "b"), [[red, blue], [blue, red]], tmp_path / "g.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape[1] >= 4 + 60 + 4 + 60 + 4 and grid.shape[0] >= 18 + 50 + 4 + 50 + 4
    assert (grid[..., 0] == 255).sum() + 0 >= 2 * 30 * 50  # both red cells whole, nothing drawn over
    assert ((grid[..., 2] == 255) & (grid[..., 0] == 0)).sum() == 2 * 60 * 20  # both blue cells whole


def test_colour_images_for_a_grey_encoder_are_said_once_and_drawn_in_colour(tmp_path, caplog):
    import logging

    from fastmae.data.detection import read_coco

    d, ann = write_coco(tmp_path)
    with caplog.at_level(logging.WARNING):
        split = read_coco(str(d), str(ann), 1, ("--data.path", "--det.annotations"))
    assert caplog.text.count("are colour") == 1 and "read as grey" in caplog.text
    assert split.images.load(0).shape[0] == 1 and split.images.load_for_display(0).shape[0] == 3


def test_bench_says_what_it_measured_of_the_transports():
    from fastmae.commands.bench import nbytes

    assert (nbytes(9.2 * 2**20), nbytes(48 * 2**10), nbytes(512)) == ("9.2 MiB", "48.0 KiB", "512 B")


def test_a_sparse_tar_member_is_refused_by_its_declared_size_before_it_is_read(tmp_path):
    import shutil
    import subprocess

    from fastmae.data.shards import index_shards

    if shutil.which("tar") is None:
        pytest.skip("GNU tar writes the sparse member")
    hole = tmp_path / "k0.png"
    with open(hole, "wb") as f:
        f.truncate(3 * 2**30)  # 3 GiB, a few KB on disk and in the tar
    subprocess.run(["tar", "-S", "-cf", str(tmp_path / "s.tar"), "-C", str(tmp_path), "k0.png"], check=True)
    assert (tmp_path / "s.tar").stat().st_size < 2**20
    with pytest.raises(ValueError, match=r"s.tar: k0.png is a sparse member of 3221225472 bytes once read"):
        index_shards([str(tmp_path / "s.tar")])


def test_an_idx_header_claiming_more_than_its_data_reserves_nothing_up_front(tmp_path):
    import gzip
    import struct
    import tracemalloc

    from fastmae.data.sources import read_idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:  # a header for 20,000 x 100 x 100 bytes (200 MB), 10 bytes of data
        f.write(struct.pack(">I", 2051) + struct.pack(">3I", 20000, 100, 100) + b"\0" * 10)
    tracemalloc.start()
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path, 2051)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20  # a 16 MiB read at a time, not the 200 MB the header claims


def test_a_shard_list_names_shards_in_its_own_folder(tmp_path):
    from fastmae.data.shards import shard_urls

    write_shard(tmp_path / "sh", {"k0": 0})
    (tmp_path / "sh" / "ok.txt").write_text("s-000000.tar\n./s-000000.tar\n")
    assert shard_urls(str(tmp_path / "sh" / "ok.txt")) == [str(tmp_path / "sh" / "s-000000.tar")] * 2
    for line in ("../s-000000.tar", str(tmp_path / "elsewhere.tar"), "sub/../../x.tar"):
        (tmp_path / "sh" / "bad.txt").write_text(line + "\n")
        with pytest.raises(ValueError, match=r"outside the list's folder"):
            shard_urls(str(tmp_path / "sh" / "bad.txt"))


@pytest.mark.parametrize(("where", "message"), [
    ("annotations", r"two annotations have the id 1"),
    ("categories", r"two categories have the id 42"),
])
def test_ids_pycocotools_would_collapse_are_refused(tmp_path, where, message):
    from fastmae.data.detection import read_coco

    d, ann = write_coco(tmp_path)
    edit(ann, lambda c: c[where].append(dict(c[where][0])))
    with pytest.raises(ValueError, match=message):
        read_coco(str(d), str(ann), 3, ("--data.path", "--det.annotations"))


def test_a_pose_annotation_of_an_unknown_category_is_refused(tmp_path, capsys):
    d, ann = write_coco_kp(tmp_path)
    edit(ann, lambda c: c["annotations"][0].update(category_id=77))
    assert main(pose_args(d, ann, tmp_path / "o")) == 2
    assert "annotation 10 has category_id 77, which is not in 'categories'" in one_line(capsys)
