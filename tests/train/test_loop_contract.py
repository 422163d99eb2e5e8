"""The shared loop needs only the Loader contract (len, set_epoch, iteration) and the head interface: a loader that
is not a SampledLoader (as a streaming source will be) with dict targets trains, checkpoints and resumes."""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmae.config import RunConfig
from fastmae.data.loader import Loader
from fastmae.models.dense import DenseModel
from fastmae.models.vit import VisionTransformer
from fastmae.train.engine import Task
from fastmae.train.optim import build_adamw, param_groups_weight_decay
from fastmae.train.trainer import fit, model_meta, setup


class Stream(Loader):
    """Batches made from (seed, epoch, batch) alone: what a resumed epoch needs, with no sampler."""

    def __init__(self, batches: int, **kw):
        super().__init__(img_size=(16, 16), batch_size=4, train=True, channels=1, mean=(0.5,), std=(0.5,), **kw)
        self.batches = batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for b in range(self.start_batch, self.batches):
            g = torch.Generator().manual_seed(1000 * self.epoch + b)
            x = torch.randn(4, 1, 16, 16, generator=g)
            yield x, {"heat": (x[:, 0, ::4, ::4] > 0).float(), "weight": torch.ones(4)}


class HeatHead(nn.Module):
    """A 1x1 conv to one heatmap per patch; weighted MSE against a dict of targets."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, 1, 1)

    def forward(self, feats):
        return self.conv(feats)[:, 0]  # (B, h, w)

    def loss(self, out, targets):
        per = F.mse_loss(out.float(), targets["heat"], reduction="none").mean((1, 2))  # (B,)
        return (per * targets["weight"]).mean()

    def predict(self, out):
        return out.sigmoid()


@dataclasses.dataclass(frozen=True)
class Cfg:
    run: RunConfig


def run(tmp_path, epochs: int):
    cfg = Cfg(RunConfig(output_dir=str(tmp_path / "r"), device="cpu", precision="fp32", progress=False, seed=0))
    rt = setup(cfg.run, cfg)
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=(16, 16), patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                            num_classes=0, global_pool="token")
    head = HeatHead(32)
    model = DenseModel(enc, head, finetune=True)
    opt = build_adamw(param_groups_weight_decay(model, 0.0), 1e-3, (0.9, 0.999), rt.device)
    task = Task(model, opt, loss=lambda m, x, t: head.loss(m(x), t), lr=lambda step: 1e-3,
                meta=model_meta("test", {}, cfg))
    prog, last = fit(rt, task, Stream(3), epochs)
    return prog, last, model


def test_a_loader_without_sampler_and_dict_targets_train_and_resume(tmp_path):
    prog, last, model = run(tmp_path, 1)
    assert prog.epoch == 1 and last is not None and last.exists()
    prog, last2, resumed = run(tmp_path, 2)  # the same folder: resumes after epoch 1
    assert prog.epoch == 2 and prog.resumed_from
    losses = [json.loads(line)["loss"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(l == l for l in losses)

    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    _, _, straight = run(fresh_dir, 2)  # two epochs in one go: the same weights as one + a resumed one
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
