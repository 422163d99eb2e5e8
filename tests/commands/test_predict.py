"""`fastmae predict` and `fastmae.predict`: a trained model on new images gives what its training command's own
evaluation gave on the evaluation images (records and pycocotools scores), for detect, pose, segment and a
classifier; pose boxes from a detector, a boxes file or the whole image; masks, drawings, bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import fastmae
from fastmae.cli import main
from fastmae.metrics.detection import coco_box_metrics
from fastmae.metrics.pose import coco_keypoint_metrics
from tests.helpers.cli import pretrain_tiny
from tests.helpers.coco import write_coco, write_coco_kp

TINY = ["--model.name", "vit_tiny_patch4", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2"]
FAST = ["--optim.epochs", "2", "--optim.batch_size", "2", "--run.no_progress", "--run.precision", "fp32"]
PRED = ["--run.precision", "fp32", "--predict.batch_size", "2", "--data.num_workers", "0"]


def strip(records: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in keys} for r in records]


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    """A 2-epoch detector on COCO files of several sizes: (root, eval images, eval annotations, run)."""
    root = tmp_path_factory.mktemp("det")
    d, ann = write_coco(root)
    ed, eann = write_coco(root, sizes=((36, 28), (20, 40), (50, 30)), name="val")
    run = root / "det"
    assert main(["detect", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d),
                 "--det.annotations", str(ann), "--data.eval_path", str(ed), "--det.eval_annotations", str(eann),
                 "--model.img_size", "32", "32", "--run.output_dir", str(run), *FAST]) == 0
    return root, ed, eann, run


def test_detect_predictions_equal_the_evaluation(det_run, tmp_path):
    _, ed, eann, run = det_run
    out = tmp_path / "p"
    assert main(["predict", "--init", str(run), "--data.path", str(ed), "--run.output_dir", str(out), *PRED]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in preds} <= {"im0.png", "im1.png", "im2.png"}
    ids = {im["file_name"]: im["id"] for im in json.loads(eann.read_text())["images"]}
    evaluated = json.loads((run / "detections.json").read_text())
    as_results = [{"image_id": ids[r["file_name"]], **strip([r], "file_name", "class_name")[0]} for r in preds]
    assert as_results == evaluated  # the same boxes, bit for bit
    scored = coco_box_metrics(json.loads(eann.read_text()), as_results)
    assert scored["map"] == json.loads((run / "detect.json").read_text())["map"]
    assert {r["class_name"] for r in preds} <= {"cat", "dog"} and len(list((out / "vis").glob("*.png"))) == 3
    # with the annotations: scored as detect scores, detect.json beside the predictions
    out2 = tmp_path / "p2"
    assert main(["predict", "--init", str(run), "--data.path", str(ed), "--predict.annotations", str(eann),
                 "--run.output_dir", str(out2), *PRED]) == 0
    res, trained = (json.loads(p.read_text()) for p in (out2 / "detect.json", run / "detect.json"))
    assert {k: res[k] for k in ("map", "map50", "per_class_ap")} == {k: trained[k] for k in ("map", "map50",
                                                                                           "per_class_ap")}


def test_predict_refuses_what_it_cannot_do_in_one_line(det_run, tmp_path, capsys):
    _, ed, eann, run = det_run
    _, pre = pretrain_tiny(tmp_path)
    base = ["predict", "--data.path", str(ed), *PRED]
    cases = [
        (["--init", str(pre)], "holds an encoder without a trained head .* use `fastmae embed --init"),
        (["--init", str(run), "--predict.boxes", str(eann)], "--predict.boxes is for pose models"),
        (["--init", str(run), "--run.output_dir", str(run)], "holds a `fastmae detect` run"),
        (["--init", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for extra, expected in cases:
        before = sorted(p.name for p in run.iterdir())
        assert main(base + ["--run.output_dir", str(tmp_path / "o")] + extra if "--run.output_dir" not in extra
                    else base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and __import__("re").search(expected, err[0]), err
        assert sorted(p.name for p in run.iterdir()) == before
    assert not (tmp_path / "o" / "predictions.json").exists()
    # an unreadable image: one line naming it, or left out and counted with --data.skip_corrupt
    bad = tmp_path / "imgs"
    bad.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"not a png")
    assert main(base[:1] + ["--init", str(run), "--data.path", str(bad), "--run.output_dir", str(tmp_path / "b"),
                            *PRED]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "b" / "predictions.json").exists()
    assert main(base[:1] + ["--init", str(run), "--data.path", str(bad), "--run.output_dir", str(tmp_path / "b"),
                            "--data.skip_corrupt", *PRED]) == 0
    assert "1 unreadable skipped" in capsys.readouterr().out
    # a second run into the same folder stops before any work unless told to replace
    assert main(base[:1] + ["--init", str(run), "--data.path", str(bad), "--run.output_dir", str(tmp_path / "b"),
                            "--data.skip_corrupt", *PRED]) == 2
    assert "--predict.overwrite" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pose_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose")
    d, ann = write_coco_kp(root)
    ed, eann = write_coco_kp(root, name="val", sizes=((40, 44), (30, 20), (64, 48)))
    run = root / "pose"
    assert main(["pose", "--init", "random", *TINY, "--data.source", "coco", "--data.path", str(d),
                 "--pose.annotations", str(ann), "--data.eval_path", str(ed), "--pose.eval_annotations", str(eann),
                 "--model.img_size", "16", "12", "--pose.sigmas", "0.1", "0.1", "0.2", "--run.output_dir", str(run),
                 *FAST]) == 0
    return root, ed, eann, run


def test_pose_predictions_equal_the_evaluation(pose_run, det_run, tmp_path, capsys):
    _, ed, eann, run = pose_run
    evaluated = json.loads((run / "keypoints.json").read_text())
    trained = json.loads((run / "pose.json").read_text())
    # the annotations' boxes, scored as pose scores
    out = tmp_path / "a"
    assert main(["predict", "--init", str(run), "--data.path", str(ed), "--predict.annotations", str(eann),
                 "--run.output_dir", str(out), *PRED]) == 0
    res = json.loads((out / "pose.json").read_text())
    assert (res["ap"], res["pck"]) == (trained["ap"], trained["pck"])
    preds = json.loads((out / "predictions.json").read_text())
    assert strip(preds, "file_name", "bbox") == evaluated
    # the same boxes from a boxes file, the images unannotated: the same keypoints
    out = tmp_path / "b"
    gt = json.loads(eann.read_text())
    gt["annotations"] = [a for a in gt["annotations"] if a["id"] < 50]  # the instances the evaluation kept
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(gt))
    assert main(["predict", "--init", str(run), "--data.path", str(ed), "--predict.boxes", str(boxes),
                 "--run.output_dir", str(out), *PRED]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    ids = {im["file_name"]: im["id"] for im in gt["images"]}
    as_results = [{"image_id": ids[r["file_name"]], **strip([r], "file_name", "bbox")[0]} for r in preds]
    assert sorted(as_results, key=lambda r: r["image_id"]) == sorted(evaluated, key=lambda r: r["image_id"])
    assert coco_keypoint_metrics(gt, as_results, [0.1, 0.1, 0.2])["ap"] == pytest.approx(trained["ap"])
    assert all(len(r["keypoints"]) == 9 and len(r["bbox"]) == 4 for r in preds)
    # neither: the whole image is the box, one record per image, keypoints inside it
    out = tmp_path / "c"
    assert main(["predict", "--init", str(run), "--data.path", str(ed), "--run.output_dir", str(out), *PRED]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert [r["bbox"] for r in preds] == [[0, 0, 40, 44], [0, 0, 30, 20], [0, 0, 64, 48]]
    assert len(list((out / "vis").glob("*.png"))) == 3
    # a detector's boxes: a detector of two classes needs --predict.category
    det = det_run[3]
    args = ["predict", "--init", str(run), "--data.path", str(ed), "--predict.detector", str(det), *PRED]
    assert main(args + ["--run.output_dir", str(tmp_path / "d")]) == 2
    assert "has 2 classes (dog (7), cat (42)); pass --predict.category" in capsys.readouterr().err
    assert main(args + ["--predict.category", "bird", "--run.output_dir", str(tmp_path / "d")]) == 2
    assert "'bird' is not a class of the detector" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before any work: nothing written
    assert main(args + ["--predict.category", "cat", "--predict.score_threshold", "0",
                        "--run.output_dir", str(tmp_path / "d")]) == 0
    found = fastmae.predict(det, ed, batch_size=2)  # the detector on these images, through the API
    boxes = [r["bbox"] for dets in found for r in dets if r["category_id"] == 42]
    assert boxes and [r["bbox"] for r in json.loads((tmp_path / "d" / "predictions.json").read_text())] == boxes


def test_boxes_file_naming_missing_images_is_refused(pose_run, tmp_path, capsys):
    _, ed, _, run = pose_run
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"file_name": "elsewhere.png", "bbox": [0, 0, 5, 5], "score": 1.0}]))
    assert main(["predict", "--init", str(run), "--data.path", str(ed), "--predict.boxes", str(boxes),
                 "--run.output_dir", str(tmp_path / "o"), *PRED]) == 2
    assert "names image 'elsewhere.png', which is not among the images" in capsys.readouterr().err
    boxes.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 5, 5]}]))
    assert main(["predict", "--init", str(run), "--data.path", str(ed), "--predict.boxes", str(boxes),
                 "--run.output_dir", str(tmp_path / "o"), *PRED]) == 2
    assert "name images by image_id only" in capsys.readouterr().err
    assert not (tmp_path / "o" / "predictions.json").exists()


def write_seg(root, n: int = 4, size=(32, 32)):
    """root/images/x{i}.png (grey, brighter where the label is 1) and root/labels/x{i}.png."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        y = np.zeros(size, np.uint8)
        r, c = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
        y[r : r + 12, c : c + 12] = 1
        x = (rng.integers(0, 60, size) + 150 * y).astype(np.uint8)
        Image.fromarray(x).save(root / "images" / f"x{i}.png")
        Image.fromarray(y, "L").save(root / "labels" / f"x{i}.png")


def test_segment_predictions_equal_the_evaluation_and_masks_fit_any_size(tmp_path):
    data = tmp_path / "d"
    write_seg(data)
    run = tmp_path / "seg"
    assert main(["segment", "--init", "random", *TINY, "--data.source", "folder", "--data.path",
                 str(data / "images"), "--seg.labels", str(data / "labels"), "--data.eval_path", str(data / "images"),
                 "--seg.eval_labels", str(data / "labels"), "--seg.num_classes", "2", "--run.output_dir", str(run),
                 "--data.num_workers", "0", *FAST]) == 0
    out = tmp_path / "p"
    assert main(["predict", "--init", str(run), "--data.path", str(data / "images"), "--predict.annotations",
                 str(data / "labels"), "--run.output_dir", str(out), *PRED]) == 0
    res, trained = (json.loads(p.read_text()) for p in (out / "segment.json", run / "segment.json"))
    assert (res["miou"], res["pixel_acc"]) == (trained["miou"], trained["pixel_acc"])
    mask = np.array(Image.open(out / "masks" / "x0.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1}
    assert json.loads((out / "predictions.json").read_text())[0] == {"file_name": "x0.png", "mask": "masks/x0.png",
                                                                      "height": 32, "width": 32}
    # another size: letterboxed onto the training size, the mask at the image's own size; the API gives the same
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70), dtype=np.uint8)).save(odd / "y.png")
    assert main(["predict", "--init", str(run), "--data.path", str(odd / "y.png"), "--run.output_dir",
                 str(tmp_path / "q"), *PRED]) == 0
    mask = np.array(Image.open(tmp_path / "q" / "masks" / "y.png"))
    assert mask.shape == (50, 70)
    api = fastmae.predict(run, np.array(Image.open(odd / "y.png")))
    assert np.array_equal(api[0]["mask"], mask)


def test_classifier_predictions_score_as_finetune_and_api(tmp_path):
    _, pre = pretrain_tiny(tmp_path)
    data = tmp_path / "fmnist"
    run = tmp_path / "ft"
    assert main(["finetune", "--init", str(pre), "--data.path", str(data), "--optim.epochs", "1",
                 "--optim.warmup_epochs", "1", "--optim.batch_size", "8", "--run.output_dir", str(run),
                 "--run.no_progress", "--run.precision", "fp32"]) == 0
    folder = tmp_path / "eval"
    write_fmnist_pngs(data, folder)  # the 40 evaluation images, as PNG files
    image0 = np.array(Image.open(folder / "000.png"))
    out = tmp_path / "p"
    assert main(["predict", "--init", str(run), "--data.source", "list", "--data.path", str(folder / "list.txt"),
                 "--run.output_dir", str(out), "--predict.batch_size", "8", "--run.precision", "fp32"]) == 0
    res, trained = (json.loads(p.read_text()) for p in (out / "finetune.json", run / "finetune.json"))
    assert res["top1"] == pytest.approx(trained["top1"]) and res["top5"] == pytest.approx(trained["top5"])
    preds = json.loads((out / "predictions.json").read_text())
    assert preds[0]["file_name"] == "000.png" and len(preds[0]["topk"]) == 5
    assert preds[0]["class_name"] in fastmae.data.sources.FASHION_MNIST_CLASSES
    api = fastmae.predict(run, [image0, folder / "001.png"])
    assert api[0]["label"] == preds[0]["label"] and api[0]["score"] == pytest.approx(preds[0]["score"], abs=1e-5)
    assert api[1]["label"] == preds[1]["label"]
    feats = fastmae.predict(pre, folder / "000.png")  # a pretraining run gives features, deterministic
    assert feats[0]["features"].shape == (32,)
    assert torch.equal(feats[0]["features"], fastmae.predict(pre, folder / "000.png")[0]["features"])


def write_fmnist_pngs(data, folder) -> list[str]:
    """The tiny set's evaluation images as PNGs with a labelled list file; the list's lines."""
    from fastmae.data.sources import load_fashion_mnist

    images, labels = load_fashion_mnist(str(data), "eval")
    folder.mkdir()
    lines = []
    for i, (x, y) in enumerate(zip(images, labels)):
        Image.fromarray(x[0].numpy()).save(folder / f"{i:03d}.png")
        lines.append(f"{i:03d}.png {int(y)}")
    (folder / "list.txt").write_text("\n".join(lines))
    return lines


def test_a_linear_probe_predicts_as_it_scored(tmp_path):
    data, pre = pretrain_tiny(tmp_path)
    run = tmp_path / "lp"
    assert main(["linprobe", "--init", str(pre), "--data.path", str(data), "--optim.epochs", "3",
                 "--optim.warmup_epochs", "1", "--optim.batch_size", "32", "--run.output_dir", str(run),
                 "--run.no_progress", "--run.precision", "fp32"]) == 0
    write_fmnist_pngs(data, tmp_path / "eval")
    out = tmp_path / "p"
    assert main(["predict", "--init", str(run), "--data.source", "list", "--data.path",
                 str(tmp_path / "eval" / "list.txt"), "--run.output_dir", str(out), *PRED]) == 0
    res, trained = (json.loads(p.read_text()) for p in (out / "linprobe.json", run / "linprobe.json"))
    assert res["top1"] == pytest.approx(trained["top1"]) and res["top5"] == pytest.approx(trained["top5"])


def test_a_hugging_face_vitpose_folder_predicts_in_its_boxes(tmp_path):
    pytest.importorskip("transformers")
    from tests.models.test_pose import hf_vitpose

    hf = hf_vitpose(True, (32, 24), patch=8)
    hf.save_pretrained(tmp_path / "vp")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"file_name": "a.png", "bbox": [10, 12, 20, 30], "score": 0.9}]))
    out = tmp_path / "p"
    assert main(["predict", "--init", str(tmp_path / "vp"), "--data.path", str(folder), "--predict.boxes",
                 str(boxes), "--run.output_dir", str(out), *PRED]) == 0
    (rec,) = json.loads((out / "predictions.json").read_text())
    xy = np.array(rec["keypoints"]).reshape(5, 3)[:, :2]
    # inside the crop (the box widened to 24:32 and by 1.25 about its centre (20, 27): 28.125 x 37.5), give or take
    # the one heatmap pixel (2.6 px) that DARK may move a peak at the border
    assert rec["bbox"] == [10, 12, 20, 30] and (np.abs(xy - [20, 27]) <= [28.125 / 2 + 3, 37.5 / 2 + 3]).all()
    api = fastmae.predict(tmp_path / "vp", folder / "a.png", boxes=[[[10, 12, 20, 30]]], batch_size=2)
    assert api[0][0]["keypoints"] == rec["keypoints"] and rec["score"] == pytest.approx(api[0][0]["score"] * 0.9)


def test_a_run_of_the_one_level_detection_head_is_refused_in_one_line(det_run, tmp_path, capsys):
    """Runs written before the multi-level head record `stride`, not `strides`: retrain, one line, exit 2."""
    import shutil

    run = det_run[3]
    old = tmp_path / "old"
    old.mkdir()
    ck = sorted(run.glob("checkpoint-*.pt"))[-1]
    shutil.copy(ck, old / ck.name)
    meta = json.loads(ck.with_suffix(".json").read_text())
    kw = meta["model_kwargs"]
    kw["stride"] = kw.pop("strides")[0]
    ck_json = old / ck.with_suffix(".json").name
    ck_json.write_text(json.dumps(meta))
    assert main(["predict", "--init", str(old / ck.name), "--data.path", str(det_run[1]),
                 "--run.output_dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "one-level detection head" in err and "train it again with `fastmae detect`" in err
