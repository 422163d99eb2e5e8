"""A torchrun worker for the DDP fault test: rank 1 raises inside its first training epoch."""

import os
import sys

import fastmae.train.trainer as trainer
from fastmae.cli import main

if os.environ.get("RANK") == "1":
    def broken_epoch(*args, **kwargs):
        raise RuntimeError("injected fault on rank 1")

    trainer.train_one_epoch = broken_epoch

sys.exit(main(sys.argv[1:]))
