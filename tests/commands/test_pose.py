"""`fastmae pose`: crops and their affine maps, the built-in garment task, COCO keypoints files, OKS AP by
pycocotools, and the command end to end (CLI, outputs in COCO format, resume, load, Hugging Face VitPose in and out,
bad inputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastmae
from fastmae.cli import main
from fastmae.data.pose import (
    FASHION_KEYPOINTS,
    PoseLoader,
    apply_matrix,
    box_centre_scale,
    crop_matrix,
    fashion_pose_scenes,
    invert_matrix,
    read_coco_keypoints,
    sigmas_for,
    silhouette_landmarks,
    unmap_keypoints,
    warp,
)
from fastmae.metrics.pose import coco_keypoint_metrics, pck
from fastmae.models.pose import PoseModel, flip_index
from tests.commands.test_cli_pretrain import make_fmnist, pretrain_tiny

TINY = ["--model.name", "vit_tiny_patch4", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2"]
FAST = ["--optim.epochs", "1", "--optim.batch_size", "8", "--run.no_progress", "--run.precision", "fp32"]


def scene_args(data, out, train: int = 12, eval_: int = 6) -> list[str]:
    return ["pose", "--data.path", str(data), "--run.output_dir", str(out), "--pose.train_images", str(train),
            "--pose.eval_images", str(eval_), "--pose.scene_size", "40", "--model.img_size", "16", "16",
            "--pose.figure_rows", "2", *FAST]


# ---------------------------------------------------------------------------------------------------
# Crops.


def test_box_widens_to_the_crop_aspect_and_pads():
    assert box_centre_scale([10, 20, 30, 60], aspect=0.75) == (25.0, 50.0, 45 * 1.25, 60 * 1.25)
    assert box_centre_scale([0, 0, 80, 20], aspect=0.75) == (40.0, 10.0, 80 * 1.25, 80 / 0.75 * 1.25)


@pytest.mark.parametrize("rotation", [0.0, 37.0])
def test_crop_matrix_maps_the_box_and_inverts(rotation):
    A = crop_matrix(30.0, 40.0, 24.0, (32, 24), rotation)  # 24 px wide region -> 24 px crop: scale 1
    assert torch.allclose(apply_matrix(A, torch.tensor([[30.0, 40.0]], dtype=torch.float64)),
                          torch.tensor([[12.0, 16.0]], dtype=torch.float64))
    pts = torch.rand(5, 2, dtype=torch.float64) * 50
    back = apply_matrix(invert_matrix(A), apply_matrix(A, pts))
    assert torch.allclose(back, pts, atol=1e-9)


def test_warp_puts_a_pixel_where_the_matrix_sends_it():
    img = torch.zeros(1, 1, 40, 50)
    img[0, 0, 25, 13] = 1.0  # pixel centre (13.5, 25.5)
    A = crop_matrix(20.0, 22.0, 25.0, (32, 32), 0.0)  # x1.28
    crop = warp(img, A, (32, 32))[0, 0]
    u = apply_matrix(A, torch.tensor([[13.5, 25.5]], dtype=torch.float64))[0]
    y, x = divmod(int(crop.argmax()), 32)
    assert abs(x + 0.5 - u[0]) <= 0.65 and abs(y + 0.5 - u[1]) <= 0.65


def test_landmarks_are_mirror_symmetric():
    """The landmarks of a mirrored garment are the mirrored landmarks with left and right swapped: what keeps the
    names true under the flip augmentation and the flip test."""
    g = torch.Generator().manual_seed(0)
    items = (torch.rand(6, 1, 28, 28, generator=g) > 0.5).to(torch.uint8) * 200
    items[:, :, :4] = 0  # not touching the top rows
    marks, ok = silhouette_landmarks(items)
    flipped, _ = silhouette_landmarks(items.flip(-1))
    index = flip_index(list(FASHION_KEYPOINTS))
    mirrored = torch.stack([28 - marks[..., 0], marks[..., 1]], -1)[:, index]
    assert ok.all() and torch.allclose(flipped, mirrored, atol=1e-4)


def test_scenes_are_deterministic_and_visibility_means_what_coco_says(tmp_path):
    data = make_fmnist(tmp_path, n_train=60)
    a = fashion_pose_scenes(str(data), "train", 30, 48, 2, seed=0)
    b = fashion_pose_scenes(str(data), "train", 30, 48, 2, seed=0)
    assert torch.equal(a.keypoints, b.keypoints) and a.coco == b.coco
    c = fashion_pose_scenes(str(data), "train", 30, 48, 2, seed=1)
    assert not torch.equal(a.keypoints[:5], c.keypoints[:5])
    xy, v = a.keypoints[..., :2], a.keypoints[..., 2]
    inside = ((xy >= 0) & (xy < 48)).all(-1)
    assert torch.equal(v > 0, inside)  # unlabelled = out of view
    assert (v == 1).any() and (v == 2).any() and (v == 0).any()
    assert (a.boxes[:, 2:] > 0).all() and (a.areas > 0).all()
    ann = a.coco["annotations"][0]
    assert len(ann["keypoints"]) == 21 and ann["num_keypoints"] == int((a.keypoints[0, :, 2] > 0).sum())


def test_loader_crops_follow_the_keypoints_through_scale_rotation_and_flip(tmp_path):
    """Bright dots at the keypoints of an image: in every augmented crop, each labelled keypoint lands on its dot,
    partners swapped on a flip (partners carry the same brightness here, the others their own)."""
    from fastmae.data.dense import ImageStore
    from fastmae.data.pose import PoseSplit, pose_coco_dict

    names = ["left_a", "right_a", "mid"]
    kp = torch.tensor([[[20.5, 30.5, 2], [40.5, 30.5, 2], [30.5, 45.5, 1]]])
    img = torch.zeros(1, 60, 64, dtype=torch.uint8)
    for (x, y, _), value in zip(kp[0].tolist(), (250, 250, 120)):
        img[0, int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = value
    split = PoseSplit(ImageStore(memory=[img]), [7], ["im"], torch.tensor([0]), torch.tensor([[15.0, 25.0, 31.0, 26.0]]), kp, names,
                      [(0, 2), (1, 2)])
    split.coco = pose_coco_dict(split)
    loader = PoseLoader(split, (32, 24), flip=flip_index(names), train=True, batch_size=1, channels=1, mean=(0.0,),
                        std=(1.0,), rotation=45.0)
    seen = set()
    for epoch in range(12):
        loader.set_epoch(epoch)
        (crop, t), = list(loader)
        for k in range(3):
            x, y = t["keypoints"][0, k].tolist()
            want = 120 / 255 if k == 2 else 250 / 255
            assert abs(float(crop[0, 0, int(y), int(x)]) - want) < 0.25, (epoch, k)
        seen.add(round(float(t["matrix"][0, 0, 1]), 3))
    assert len(seen) > 3  # rotations and scales differ between epochs
    evaluation = PoseLoader(split, (32, 24), flip=flip_index(names), train=False, batch_size=1, channels=1,
                            mean=(0.0,), std=(1.0,))
    (_, t), = list(evaluation)  # no augmentation: the crop's keypoints map back onto the image's
    assert torch.allclose(unmap_keypoints(t["keypoints"], t["matrix"])[0], kp[0, :, :2], atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# COCO keypoints files.


def write_coco_kp(root, name="train", sizes=((50, 40), (36, 60)), K=3, bad=None):
    """Images (WxH) with instances of a 3-keypoint category (id 5), plus a crowd one, a zero box and one
    without labelled keypoints (left out and counted); arbitrary image ids."""
    d = root / name
    d.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{k}.png")
        images.append({"id": 900 + 3 * k, "file_name": f"im{k}.png", "width": w, "height": h})
        kps = [4.0, 5.0, 2, w - 6.0, 7.0, 1, w / 2, h - 5.0, 2]
        anns.append({"id": 10 + k, "image_id": 900 + 3 * k, "category_id": 5, "bbox": [2.0, 3.0, w - 4.0, h - 6.0],
                     "area": (w - 4.0) * (h - 6.0), "num_keypoints": 3, "keypoints": kps, "iscrowd": 0})
    anns.append({"id": 50, "image_id": 900, "category_id": 5, "bbox": [0, 0, 9, 9], "keypoints": [1, 1, 2] * 3,
                 "iscrowd": 1})
    anns.append({"id": 51, "image_id": 900, "category_id": 5, "bbox": [3, 3, 0, 9], "keypoints": [4, 4, 2] * 3})
    anns.append({"id": 52, "image_id": 903, "category_id": 5, "bbox": [3, 3, 9, 9], "keypoints": [0, 0, 0] * 3})
    if bad == "count":
        anns[0]["keypoints"] = anns[0]["keypoints"][:6]
    cat = {"id": 5, "name": "thing", "keypoints": ["left_x", "right_x", "tail"][:K], "skeleton": [[1, 3], [2, 3]]}
    path = root / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "bg"}, cat]}))
    return d, path


def test_coco_keypoints_are_read_with_ids_and_skips_counted(tmp_path):
    d, ann = write_coco_kp(tmp_path)
    split = read_coco_keypoints(str(d), str(ann), 3, ("--data.path", "--pose.annotations"))
    assert split.image_ids == [900, 903] and split.category_id == 5 and split.skeleton == [(0, 2), (1, 2)]
    assert split.keypoints.shape == (2, 3, 3) and split.skipped == {"crowd": 1, "box of zero size": 1,
                                                                   "no labelled keypoint": 1}
    assert flip_index(split.keypoint_names) == [1, 0, 2]
    assert split.images[1].shape == (3, 60, 36)


def test_bad_coco_keypoints_file_is_one_line(tmp_path, capsys):
    d, ann = write_coco_kp(tmp_path, bad="count")
    with pytest.raises(ValueError, match=r"annotation 10 has 6 keypoint values, but category 'thing' has 3 keypoints"):
        read_coco_keypoints(str(d), str(ann), 3, ("--data.path", "--pose.annotations"))
    args = ["pose", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d), "--pose.annotations",
            str(ann), "--data.eval_path", str(d), "--pose.eval_annotations", str(ann), "--model.img_size", "16", "12",
            "--run.output_dir", str(tmp_path / "o"), *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.json: annotation 10 has 6 keypoint values" in err[0]


def test_oks_ap_is_pycocotools_own_and_pck_counts_labelled_keypoints():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    kp = [10.0, 10.0, 2, 30.0, 12.0, 2, 20.0, 40.0, 1]
    gt = {"images": [{"id": 4, "height": 60, "width": 50}],
          "annotations": [{"id": 1, "image_id": 4, "category_id": 2, "bbox": [5, 5, 30, 40], "area": 900.0,
                           "num_keypoints": 3, "keypoints": kp, "iscrowd": 0}],
          "categories": [{"id": 2, "name": "x", "keypoints": ["a", "b", "c"], "skeleton": []}]}
    sig = [0.05, 0.05, 0.1]
    perfect = [{"image_id": 4, "category_id": 2, "keypoints": [10, 10, 1, 30, 12, 1, 20, 40, 1], "score": 0.9}]
    assert coco_keypoint_metrics(gt, perfect, sig)["ap"] == pytest.approx(100.0)
    off = [{**perfect[0], "keypoints": [12, 10, 1, 30, 15, 1, 20, 40, 1]}]
    m = coco_keypoint_metrics(gt, off, sig)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(off), "keypoints")
    ev.params.kpt_oks_sigmas = np.array(sig)
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert m["ap"] == pytest.approx(100 * ev.stats[0]) and m["ar"] == pytest.approx(100 * ev.stats[5])
    assert 0 < m["ap"] < 100
    truth = torch.tensor([[[10.0, 10.0, 2], [30.0, 12.0, 2], [20.0, 40.0, 0]]])
    pred = torch.tensor([[[11.0, 10.0], [30.0, 17.0], [90.0, 90.0]]])
    p = pck(pred, truth, torch.tensor([[5.0, 5.0, 30.0, 40.0]]))  # 0.05 x 40 = 2 px, 0.1 x 40 = 4 px
    assert p == {"pck@0.05": 50.0, "pck@0.1": 50.0}


def test_sigmas_are_given_coco_or_a_stated_default():
    from fastmae.data.pose import COCO_KEYPOINTS, COCO_SIGMAS, DEFAULT_SIGMA

    assert sigmas_for(COCO_KEYPOINTS)[0] == list(COCO_SIGMAS)
    assert sigmas_for(["a", "b"])[0] == [DEFAULT_SIGMA] * 2 and "--pose.sigmas" in sigmas_for(["a"])[1]
    assert sigmas_for(["a", "b"], (0.1, 0.2))[0] == [0.1, 0.2]
    with pytest.raises(ValueError, match="2 keypoints"):
        sigmas_for(["a", "b"], (0.1,))


# ---------------------------------------------------------------------------------------------------
# The command.


def test_pose_end_to_end_on_garments_resumes_and_loads(tmp_path):
    data, run = pretrain_tiny(tmp_path)
    out = tmp_path / "pose"
    assert main(scene_args(data, out) + ["--init", str(run), "--pose.eval_every", "1"]) == 0
    res = json.loads((out / "pose.json").read_text())
    assert {"ap", "ap50", "ap75", "ar", "pck", "sigmas"} <= set(res) and set(res["pck"]) == {"0.05", "0.1"}
    assert res["sigmas"] == [0.067] * 7 and res["keypoints"] == list(FASHION_KEYPOINTS)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert logged[-1]["ap"] == pytest.approx(res["ap"]) and (out / "learning_curve.png").exists()
    kps = json.loads((out / "keypoints.json").read_text())
    assert len(kps) == res["eval"] and set(kps[0]) == {"image_id", "category_id", "keypoints", "score"}
    assert len(kps[0]["keypoints"]) == 21 and (out / "pose.png").exists()
    model = fastmae.load(out)  # a pose run is its pose model ...
    assert isinstance(model, PoseModel) and model(torch.zeros(1, 1, 16, 16)).shape == (1, 7, 16, 16)
    assert model.names == list(FASHION_KEYPOINTS) and model.flip == flip_index(list(FASHION_KEYPOINTS))
    from fastmae.weights.read import read_weights

    assert read_weights(out).encoder().model_kwargs["img_size"] == (16, 16)  # ... and an encoder for the others
    first = (out / "log.jsonl").read_text()
    assert main(scene_args(data, out) + ["--init", str(run), "--optim.epochs", "2"]) == 0  # resumes for epoch 2
    assert (out / "log.jsonl").read_text().startswith(first)
    assert json.loads((out / "pose.json").read_text())["epochs"] == 2


def test_pose_on_coco_files_writes_image_pixels_and_ids(tmp_path, capsys):
    d, ann = write_coco_kp(tmp_path)
    ed, eann = write_coco_kp(tmp_path, name="val", sizes=((40, 44), (30, 20), (64, 48)))
    out = tmp_path / "run"
    args = ["pose", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d), "--pose.annotations",
            str(ann), "--data.eval_path", str(ed), "--pose.eval_annotations", str(eann), "--model.img_size", "16",
            "12", "--pose.head", "classic", "--pose.channels", "8", "--pose.sigmas", "0.1", "0.1", "0.2",
            "--run.output_dir", str(out), *FAST, "--optim.batch_size", "2"]  # few instances
    assert main(args) == 0
    assert "left out 3 instances (1 crowd, 1 box of zero size, 1 no labelled keypoint)" in capsys.readouterr().out
    kps = json.loads((out / "keypoints.json").read_text())
    assert [r["image_id"] for r in kps] == [900, 903, 906] and {r["category_id"] for r in kps} == {5}
    res = json.loads((out / "pose.json").read_text())
    assert res["sigmas"] == [0.1, 0.1, 0.2] and res["head"] == "classic"


def test_hf_vitpose_folder_loads_fine_tunes_and_exports(tmp_path, capsys):
    """A VitPoseForPoseEstimation folder: `fastmae.load` gives its heatmaps, `fastmae pose --init` trains from it
    (head included: same keypoints and head), and `convert --to hf` of the run loads in transformers with the
    run's heatmaps."""
    transformers = pytest.importorskip("transformers")
    from tests.models.test_pose import hf_vitpose

    hf = hf_vitpose(True, (32, 24), patch=8)
    hf.config.id2label = {i: n for i, n in enumerate(["left_p", "right_p", "a", "b", "c"])}
    hf.save_pretrained(tmp_path / "vp")
    x = torch.randn(2, 3, 32, 24)
    model = fastmae.load(tmp_path / "vp")
    assert isinstance(model, PoseModel) and model.names[:2] == ["left_p", "right_p"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).heatmaps, atol=1e-4, rtol=0)
    d, ann = write_coco_kp(tmp_path, K=3)
    data = json.loads(ann.read_text())  # the 5 keypoints of the VitPose model
    data["categories"][1]["keypoints"] = ["left_p", "right_p", "a", "b", "c"]
    for a in data["annotations"]:
        a["keypoints"] = a["keypoints"] + [5.0, 5.0, 2, 6.0, 6.0, 2]
    ann.write_text(json.dumps(data))
    out = tmp_path / "ft"
    args = ["pose", "--init", str(tmp_path / "vp"), "--data.source", "coco", "--data.path", str(d),
            "--pose.annotations", str(ann), "--data.eval_path", str(d), "--pose.eval_annotations", str(ann),
            "--model.img_size", "32", "24", "--finetune", "--run.output_dir", str(out), *FAST, "--optim.batch_size", "2"]
    assert main(args) == 0
    assert f"simple head (from {tmp_path / 'vp'})" in capsys.readouterr().out
    assert main(["convert", "--init", str(out), "--output", str(tmp_path / "hf_out"), "--to", "hf"]) == 0
    again = transformers.VitPoseForPoseEstimation.from_pretrained(tmp_path / "hf_out").eval()
    ours = fastmae.load(out)
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).heatmaps, ours(x), atol=1e-4, rtol=0)


def test_pose_bad_input_is_one_line(tmp_path, capsys):
    d, ann = write_coco_kp(tmp_path)
    base = ["pose", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d),
            "--run.output_dir", str(tmp_path / "o"), *FAST]
    assert main(base) == 2
    assert "needs --pose.annotations FILE" in capsys.readouterr().err
    assert main(base + ["--pose.annotations", str(ann)]) == 2
    assert "no evaluation data: pass --data.eval_path DIR" in capsys.readouterr().err
    full = base + ["--pose.annotations", str(ann), "--data.eval_path", str(d), "--pose.eval_annotations", str(ann)]
    assert main(full + ["--model.img_size", "18", "16"]) == 2
    assert "not a multiple of the encoder's patch size 4" in capsys.readouterr().err
    assert main(full + ["--model.img_size", "16", "16", "--pose.sigmas", "0.1"]) == 2
    assert "--pose.sigmas has 1 values for 3 keypoints" in capsys.readouterr().err
    assert main(full + ["--model.img_size", "16", "16", "--pose.flip_pairs", "0", "7"]) == 2
    assert "--pose.flip_pairs [0, 7] names keypoints beyond the 3" in capsys.readouterr().err
