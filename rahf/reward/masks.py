"""Inpainting masks from predicted heatmaps (threshold, then dilate by an exact disk)."""

from __future__ import annotations

import numpy as np


def heatmap_to_mask(heatmap: np.ndarray, threshold: float, dilate: int = 0) -> np.ndarray:
    """Binary inpainting mask (bool, same shape): pixels with ``heatmap > threshold``, dilated by a
    disk of radius ``dilate`` pixels (every pixel within Euclidean distance ``dilate`` of a
    thresholded pixel; computed with ``scipy.ndimage.distance_transform_edt``)."""
    h = np.asarray(heatmap, dtype=np.float32)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {h.shape}")
    mask = np.nan_to_num(h, nan=0.0) > threshold
    if dilate and dilate > 0 and mask.any() and not mask.all():
        from scipy import ndimage

        mask = ndimage.distance_transform_edt(~mask) <= float(dilate)
    return mask
