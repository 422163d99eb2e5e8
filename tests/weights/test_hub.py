"""Released checkpoints by name (`fastmae.weights.hub`): downloaded once into the cache, atomically, size-checked.

A local HTTP server in a thread stands in for dl.fbaipublicfiles.com (the URL table is monkeypatched);
nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import fastmae
from fastmae.cli import main
from fastmae.models.mae import MaskedAutoencoderViT
from fastmae.weights import hub


def tiny_official_bytes() -> bytes:
    """A tiny MAE saved as the official release saves it: {'model': state_dict} (heads inferred: 64/64, 32/32)."""
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(img_size=16, patch_size=4, in_chans=3, embed_dim=64, depth=1, num_heads=1,
                               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=1)
    buf = io.BytesIO()
    torch.save({"model": mae.state_dict()}, buf)
    return buf.getvalue()


class Server:
    """Serves `files` (path -> bytes); mode 'drop' sends half of a file, then closes the connection."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.hits, self.mode = files, 0, "ok"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.hits += 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if outer.mode == "ok" else body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """(server, fixture bytes) with the release table pointing at the server and the cache in tmp_path."""
    data = tiny_official_bytes()
    srv = Server({"/visualize/mae_visualize_vit_base.pth": data, "/pretrain/mae_pretrain_vit_base_full.pth": data})
    table = dict(hub.RELEASES)
    table["mae_visualize_vit_base"] = hub.Release(f"{srv.url}/visualize/mae_visualize_vit_base.pth", "mae", False)
    table["mae_pretrain_vit_base_full"] = hub.Release(f"{srv.url}/pretrain/mae_pretrain_vit_base_full.pth", "mae", True)
    monkeypatch.setattr(hub, "RELEASES", table)
    monkeypatch.setenv("FASTMAE_CACHE", str(tmp_path / "cache"))
    yield srv, data
    srv.close()


def test_load_by_name_downloads_once_and_sets_the_pixel_target(served, tmp_path):
    srv, data = served
    model = fastmae.load("mae_visualize_vit_base")
    assert isinstance(model, MaskedAutoencoderViT) and model.norm_pix_loss is False
    cached = tmp_path / "cache" / "mae_visualize_vit_base.pth"
    assert cached.read_bytes() == data and srv.hits == 1
    again = fastmae.load("mae_visualize_vit_base.pth")  # the file name works too; no second request
    assert srv.hits == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    full = fastmae.load("mae_pretrain_vit_base_full")  # trained on normalised pixels
    assert full.norm_pix_loss is True and srv.hits == 2
    assert fastmae.load("mae_pretrain_vit_base_full", norm_pix_loss=False).norm_pix_loss is False  # override wins


def test_dropped_connection_leaves_no_file(served, tmp_path):
    srv, _ = served
    srv.mode = "drop"
    with pytest.raises(FileNotFoundError, match="could not download mae_visualize_vit_base"):
        fastmae.load("mae_visualize_vit_base")
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file, no temp file


def test_size_and_hash_mismatches_are_refused(served, tmp_path, monkeypatch):
    srv, data = served
    url = hub.RELEASES["mae_visualize_vit_base"].url
    hub.RELEASES["mae_visualize_vit_base"] = hub.Release(url, "mae", False, size=len(data) + 1)
    with pytest.raises(ValueError, match="bytes but the release table says"):
        fastmae.load("mae_visualize_vit_base")
    hub.RELEASES["mae_visualize_vit_base"] = hub.Release(url, "mae", False, sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        fastmae.load("mae_visualize_vit_base")
    assert list((tmp_path / "cache").iterdir()) == []
    good = hashlib.sha256(data).hexdigest()
    hub.RELEASES["mae_visualize_vit_base"] = hub.Release(url, "mae", False, sha256=good)
    assert isinstance(fastmae.load("mae_visualize_vit_base"), MaskedAutoencoderViT)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_says_which_file_to_put_where(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTMAE_CACHE", str(cache))
    url = f"http://127.0.0.1:{_closed_port()}/pretrain/mae_pretrain_vit_base.pth"
    monkeypatch.setitem(hub.RELEASES, "mae_pretrain_vit_base", hub.Release(url, "encoder"))
    with pytest.raises(FileNotFoundError) as e:
        fastmae.load("mae_pretrain_vit_base")
    assert f"put mae_pretrain_vit_base.pth in {cache}/ or pass --init PATH" in str(e.value)
    cache.mkdir()  # a file put there by hand is used as is
    (cache / "mae_pretrain_vit_base.pth").write_bytes(tiny_official_bytes())
    enc = fastmae.load("mae_pretrain_vit_base")
    assert isinstance(enc, MaskedAutoencoderViT)  # (the fixture holds a decoder; the name only picks the file)


def test_unknown_official_looking_name_lists_the_known_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTMAE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="known names: .*mae_pretrain_vit_base,"):
        fastmae.load("mae_pretrain_vit_tiny")
    assert main(["knn", "--init", "mae_visualize_vit_small", "--run.output_dir", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmae: error: mae_visualize_vit_small is neither")


def test_release_table_has_the_official_files():
    names = set(hub.RELEASES)
    for size in ("base", "large", "huge"):
        assert {f"mae_pretrain_vit_{size}", f"mae_pretrain_vit_{size}_full", f"mae_finetuned_vit_{size}",
                f"mae_visualize_vit_{size}"} <= names
    assert hub.RELEASES["mae_pretrain_vit_large_full"].url == \
        "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large_full.pth"
    assert all(r.sha256 is None for r in hub.RELEASES.values())  # none published: none invented


def test_temp_files_of_killed_downloads_are_removed_live_ones_kept(served, tmp_path):
    import os
    import time

    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live = cache / ".mae_visualize_vit_base.pth.abc123.tmp", cache / ".mae_visualize_vit_base.pth.def456.tmp"
    dead.write_bytes(b"x" * 1000)
    live.write_bytes(b"y" * 1000)
    old = time.time() - 2 * hub.STALE_DOWNLOAD_S
    os.utime(dead, (old, old))  # a SIGKILLed download's file; the other is still being written
    fastmae.load("mae_visualize_vit_base")
    assert not dead.exists() and live.exists()


def test_cache_that_is_a_file_or_read_only_is_one_line_naming_the_fix(served, tmp_path, monkeypatch):
    import errno
    import tempfile

    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"cache .*cache \(\$FASTMAE_CACHE\) is a file, not a folder; set "
                                                 r"FASTMAE_CACHE to a folder"):
        hub.fetch("mae_visualize_vit_base")
    (tmp_path / "cache").unlink()

    def read_only(*args, **kwargs):  # what mkstemp meets in a read-only cache (root ignores chmod)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError, match=r"cannot write the download cache .*cache \(Permission denied\); set "
                                              r"FASTMAE_CACHE to a folder you can write"):
        hub.fetch("mae_visualize_vit_base")


def test_full_disk_in_the_cache_names_the_cache_not_the_output_folder(served, tmp_path, monkeypatch):
    import errno

    import fastmae.weights.checkpoint as ckpt

    real = ckpt.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(ckpt.DiskFullError, match=r"writing .*mae_visualize_vit_base.pth; free space, or set "
                                                 r"FASTMAE_CACHE to a folder on a disk with room"):
        hub.fetch("mae_visualize_vit_base")
    monkeypatch.setattr(ckpt.os, "fsync", real)
    assert not any((tmp_path / "cache").iterdir())


def test_a_damaged_cached_download_says_to_delete_it(served, tmp_path):
    path = hub.fetch("mae_visualize_vit_base")
    path.write_bytes(path.read_bytes()[: 2000])  # cut short after the download
    with pytest.raises(ValueError, match=r"the cached download of mae_visualize_vit_base, .* cannot be read \(.*not a "
                                         r"readable PyTorch checkpoint.*\); delete it \(rm .*mae_visualize_vit_base.pth\) "
                                         r"and it is downloaded again"):
        fastmae.load("mae_visualize_vit_base")
