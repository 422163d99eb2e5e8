"""Issue #29: any file name the OS allows works, under any locale: names that are not UTF-8, hold a newline or a
backslash are read from folders and list files, and embed's SPLIT.txt keeps one row a line with the names' bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from fastmae.cli import main

NAMES = [b"caf\xe9-%d.png", b"new\nline-%d.png", b"back\\slash-%d.png", "\u00fcnicode-%d.png".encode()]
MODEL = ["--init", "random", "--model.name", "vit_tiny_patch4", "--model.img_size", "16", "16", "--model.embed_dim",
         "32", "--model.depth", "1", "--model.num_heads", "2", "--data.channels", "1"]


def _folder(root: bytes) -> list[bytes]:
    rng = np.random.default_rng(0)
    paths = []
    for c in (b"a", b"b"):
        os.makedirs(os.path.join(root, c))
        for i, name in enumerate(NAMES):
            p = os.path.join(root, c, name % i)
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(os.fsdecode(p), format="PNG")
            paths.append(p)
    return paths


def _unescape(line: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(line):
        if line[i:i + 1] == b"\\" and i + 1 < len(line):
            out += {b"n": b"\n", b"r": b"\r", b"\\": b"\\"}[line[i + 1:i + 2]]
            i += 2
        else:
            out += line[i:i + 1]
            i += 1
    return bytes(out)


def test_embed_rows_keep_any_file_name(tmp_path):
    root = os.fsencode(tmp_path / "img")
    paths = _folder(root)
    assert main(["embed", *MODEL, "--data.source", "folder", "--data.path", os.fsdecode(root), "--embed.split",
                 "train", "--run.output_dir", str(tmp_path / "e")]) == 0
    rows = (tmp_path / "e" / "train.txt").read_bytes().split(b"\n")[:-1]
    assert len(rows) == len(paths)  # one row a line, newline in a name or not
    assert sorted(_unescape(r) for r in rows) == sorted(paths)


def test_a_list_file_of_non_utf8_names_under_the_c_locale(tmp_path):
    root = os.fsencode(tmp_path / "img")
    paths = [p for p in _folder(root) if b"\n" not in p]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"".join(p + b" %d\n" % (b"/b/" in p) for p in paths))
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": ""}
    res = subprocess.run([sys.executable, "-m", "fastmae", "knn", *MODEL, "--data.source", "list", "--data.path",
                          str(listing), "--data.eval_path", str(listing), "--knn.k", "3", "--run.output_dir",
                          str(tmp_path / "k")], env=env, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "k" / "knn.json").exists()
