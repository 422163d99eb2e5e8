"""Checkpoints in and out: read any supported format into `Weights` (read.py), training checkpoints and atomic writes
(checkpoint.py), releases by name (hub.py), the formats and their key tables (convert/), and models built from
weights (backbone.py).
"""
