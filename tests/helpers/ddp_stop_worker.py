"""A torchrun worker for the DDP preemption test: on rank STOP_RANK only, the stop flag fires after STOP_AFTER
checks (as if SIGTERM reached that one rank first); the other ranks must stop after the same batch and save."""

import os
import sys

import fastmae.train.trainer as trainer
from fastmae.cli import main

if os.environ.get("RANK") == os.environ.get("STOP_RANK", "1"):
    calls = {"n": 0}

    def fire_after(self):
        calls["n"] += 1
        if calls["n"] >= int(os.environ["STOP_AFTER"]):
            self.signal = 15
        return self.signal is not None

    trainer.StopFlag.__call__ = fire_after

sys.exit(main(sys.argv[1:]))
