"""`fastmae pose`: crops and their affine maps, the built-in garment task, COCO keypoints files, OKS AP by
pycocotools, and the command end to end (CLI, outputs in COCO format, resume, load, Hugging Face VitPose in and out,
bad inputs)."""

from __future__ import annotations

import json

import pytest
import torch

import fastmae
from fastmae.cli import main
from fastmae.data.pose import (
    FASHION_KEYPOINTS,
    read_coco_keypoints,
)
from fastmae.models.pose import PoseModel, flip_index
from tests.helpers.cli import pretrain_tiny
from tests.helpers.coco import write_coco_kp

TINY = ["--model.name", "vit_tiny_patch4", "--model.embed_dim", "32", "--model.depth", "2", "--model.num_heads", "2"]



FAST = ["--optim.epochs", "1", "--optim.batch_size", "8", "--run.no_progress", "--run.precision", "fp32"]



def scene_args(data, out, train: int = 12, eval_: int = 6) -> list[str]:
    return ["pose", "--data.path", str(data), "--run.output_dir", str(out), "--pose.train_images", str(train),
            "--pose.eval_images", str(eval_), "--pose.scene_size", "40", "--model.img_size", "16", "16",
            "--pose.figure_rows", "2", *FAST]



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
    # --to fastmae keeps the whole pose model (head included), of the run and of the VitPose folder alike
    for i, src in enumerate((out, tmp_path / "vp")):
        assert main(["convert", "--init", str(src), "--output", str(tmp_path / f"whole{i}"), "--to", "fastmae"]) == 0
        whole = fastmae.load(tmp_path / f"whole{i}.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(whole(x), fastmae.load(src)(x), atol=1e-5, rtol=0)



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

