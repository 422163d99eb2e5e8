"""The dense tasks by name, one row each: what the CLI (the subcommand), the run-folder owner (the result file, the
checkpoint kind) and weight conversion know of a task without importing it. A task's code is its module: its
flags' config class and its `DenseTask` (train/dense.py), with a data module, a head and a metric beside it; a
new task adds those and one row here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DenseTaskRow:
    """command: the subcommand; kind: the 'kind' its checkpoints record (an encoder under a head); result: the
    result JSON only it writes; module: where its config class `config` and run function `runner` live; outputs:
    the other files it writes in its folder (a folder no fastmae run owns that holds one is refused)."""

    command: str
    kind: str
    result: str
    module: str
    config: str
    runner: str
    outputs: tuple[str, ...] = ()


DENSE_TASKS = (
    DenseTaskRow("segment", "segmenter", "segment.json", "fastmae.commands.segment", "SegmentConfig", "run_segment",
                 ("segmentation.png", "learning_curve.png")),
    DenseTaskRow("detect", "detector", "detect.json", "fastmae.commands.detect", "DetectConfig", "run_detect",
                 ("detections.json", "detections.png", "learning_curve.png")),
    DenseTaskRow("pose", "pose", "pose.json", "fastmae.commands.pose", "PoseConfig", "run_pose",
                 ("keypoints.json", "pose.png", "learning_curve.png")),
)
DENSE_KINDS = tuple(row.kind for row in DENSE_TASKS)


def dense_task_row(command: str) -> DenseTaskRow:
    """The row of a dense task's subcommand."""
    return next(row for row in DENSE_TASKS if row.command == command)


__all__ = ["DENSE_KINDS", "DENSE_TASKS", "DenseTaskRow", "dense_task_row"]
