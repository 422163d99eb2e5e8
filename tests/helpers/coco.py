"""Small COCO-format files the dense-task tests write: instances and keypoints."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image


def write_images(d, sizes, first_id: int, step: int) -> list[dict]:
    """Random RGB PNGs d/im{k}.png of the given sizes (WxH), seeded; their COCO 'images' entries, ids first_id,
    first_id + step, ..."""
    d.mkdir()
    rng = np.random.default_rng(0)
    images = []
    for k, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{k}.png")
        images.append({"id": first_id + step * k, "file_name": f"im{k}.png", "width": w, "height": h})
    return images


def write_coco(root, sizes=((40, 30), (24, 48), (32, 32)), name="train"):
    """Images of several sizes (WxH) with boxes, arbitrary ids, a crowd box and one image without boxes."""
    d = root / name
    images, anns = write_images(d, sizes, 100, 7), []
    for k, (w, h) in enumerate(sizes):
        if k < len(sizes) - 1:  # the last image is a negative
            anns.append({"id": len(anns) + 1, "image_id": 100 + 7 * k, "category_id": 42 if k % 2 else 7,
                         "bbox": [2.0, 3.0, w / 2, h / 3], "iscrowd": 0})
    anns.append({"id": 99, "image_id": 100, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    ann = {"images": images, "annotations": anns, "categories": [{"id": 42, "name": "cat"}, {"id": 7, "name": "dog"}]}
    path = root / f"{name}.json"
    path.write_text(json.dumps(ann))
    return d, path


def write_coco_kp(root, name="train", sizes=((50, 40), (36, 60)), K=3, bad=None):
    """Images (WxH) with instances of a 3-keypoint category (id 5), plus a crowd one, a zero box and one
    without labelled keypoints (left out and counted); arbitrary image ids."""
    d = root / name
    images, anns = write_images(d, sizes, 900, 3), []
    for k, (w, h) in enumerate(sizes):
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

