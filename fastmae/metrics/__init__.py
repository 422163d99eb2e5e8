"""Scores as pure functions: weighted kNN, top-k, segmentation confusion counts and mIoU.
"""
