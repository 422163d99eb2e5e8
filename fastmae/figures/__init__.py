"""Figures a run writes: the reconstruction figure, learning curves, image grids, the segmentation figure.
"""
