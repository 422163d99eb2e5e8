"""Pose data (data/pose.py): top-down crops and their affine maps, the built-in garment task, COCO
keypoints files, the loader."""

from __future__ import annotations

import pytest
import torch

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
from fastmae.models.pose import flip_index
from tests.helpers.cli import make_fmnist
from tests.helpers.coco import write_coco_kp


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



def test_coco_keypoints_are_read_with_ids_and_skips_counted(tmp_path):
    d, ann = write_coco_kp(tmp_path)
    split = read_coco_keypoints(str(d), str(ann), 3, ("--data.path", "--pose.annotations"))
    assert split.image_ids == [900, 903] and split.category_id == 5 and split.skeleton == [(0, 2), (1, 2)]
    assert split.keypoints.shape == (2, 3, 3) and split.skipped == {"crowd": 1, "box of zero size": 1,
                                                                   "no labelled keypoint": 1}
    assert flip_index(split.keypoint_names) == [1, 0, 2]
    assert split.images[1].shape == (3, 60, 36)



def test_sigmas_are_given_coco_or_a_stated_default():
    from fastmae.data.pose import COCO_KEYPOINTS, COCO_SIGMAS, DEFAULT_SIGMA

    assert sigmas_for(COCO_KEYPOINTS)[0] == list(COCO_SIGMAS)
    assert sigmas_for(["a", "b"])[0] == [DEFAULT_SIGMA] * 2 and "--pose.sigmas" in sigmas_for(["a"])[1]
    assert sigmas_for(["a", "b"], (0.1, 0.2))[0] == [0.1, 0.2]
    with pytest.raises(ValueError, match="2 keypoints"):
        sigmas_for(["a", "b"], (0.1,))



@pytest.mark.parametrize("box,rotation", [([300.0, 200.0, 80.0, 160.0], 0.0), ([10.0, 5.0, 60.0, 90.0], 35.0),
                                          ([-40.0, 350.0, 100.0, 120.0], -20.0), ([900.0, 900.0, 50.0, 50.0], 0.0)])
def test_warping_the_sampled_region_equals_warping_the_whole_image(box, rotation):
    """Workers warp only the part of a large image a crop samples: the same crop as from the whole image (a box
    inside, at the border, partly and wholly outside)."""
    from fastmae.data.pose import crop_region, warp_region

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 400, 640), dtype=torch.uint8, generator=g)
    cx, cy, sw, _ = box_centre_scale(box, 24 / 32)
    A = crop_matrix(cx, cy, sw, (32, 24), rotation)
    whole = warp(img.float().div(255)[None], A, (32, 24))[0]
    torch.testing.assert_close(warp_region(img, A, (32, 24)), whole, atol=1e-4, rtol=0)  # << half a uint8 step
    x0, y0, x1, y1 = crop_region(A, (32, 24), (400, 640))
    assert (x1 - x0) * (y1 - y0) < 400 * 640 / 4 or box[0] < 0  # a small part of the image is read
