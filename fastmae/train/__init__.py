"""Running a model: device and precision, the process group, the epoch loop (engine), the trainer (setup, resume,
checkpoints, preemption), optimizers and schedules, logs, the run-folder lock, the parallelism seam, and the
evaluation commands' shared pieces (probe, results).
"""
