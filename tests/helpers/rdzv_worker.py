"""A torchrun worker for the multi-node test: joins the job's process group (fastmae's init_distributed), reads one
training epoch of the shards given as argv[1] for its rank, and writes the labels it saw to argv[2]/rank-R.json."""

import json
import sys
from pathlib import Path

from fastmae.config import DataConfig
from fastmae.data import build_loader
from fastmae.train.dist import all_reduce_mean, cleanup, init_distributed

import torch

info = init_distributed("cpu", 60)
cfg = DataConfig(source="shards", path=sys.argv[1], channels=1, num_workers=0)
loader = build_loader(cfg, "train", (8, 8), 4, train=True, seed=0, rank=info.rank, world_size=info.world_size)
loader.set_epoch(0)
seen = [int(y) for _, labels in loader for y in labels]
all_reduce_mean(torch.ones(1), info)  # a collective across the two "nodes"
Path(sys.argv[2], f"rank-{info.rank}.json").write_text(json.dumps({"world": info.world_size, "seen": seen}))
cleanup(wait_for_all=True)
