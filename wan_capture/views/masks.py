"""Where a word is: per-frame masks from its attention maps, and how well they match a reference mask.

A mask is decided on the map grid, where the data is (one value per latent cell), then laid on the decoded video:
each cell covers its pixels, and decoded frame i takes the latent frame that produced it (frame 0 from latent frame
0, latent frame t >= 1 covers frames 4t-3..4t), the same alignment as the heatmap's overlay.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..grid import latent_frame_of, pixel_frame_count
from ..capture.time_layout import video_maps

METHODS = ("threshold", "otsu", "top_percent")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance of a 256-bin histogram."""
    v = values[np.isfinite(values)].ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))]) if bins > 1 else hi


def attention_masks(maps: np.ndarray, method: str = "otsu", value: float = 0.5) -> np.ndarray:
    """``[frames, H, W]`` maps -> boolean masks, each frame on its own.

    ``threshold``: cells at or above ``value`` of the frame's maximum (0..1). ``otsu``: Otsu's cut of the frame.
    ``top_percent``: the ``value`` percent of the frame's cells with the most attention (ties included).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if maps.ndim != 3:
        raise ValueError(f"expected maps [frames, height, width], got shape {maps.shape}")
    out = np.zeros(maps.shape, dtype=bool)
    for i, frame in enumerate(maps):
        if method == "threshold":
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold is a fraction of each frame's maximum, 0..1; got {value}")
            out[i] = frame >= value * float(frame.max())
        elif method == "otsu":
            out[i] = frame >= otsu_threshold(frame)
        else:
            if not 0.0 < value <= 100.0:
                raise ValueError(f"top_percent must be in (0, 100], got {value}")
            cut = np.percentile(frame, 100.0 - value)
            out[i] = frame >= cut
    return out


def mask_scores(mask: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    """``(IoU, coverage)`` of boolean masks over all frames: coverage is the part of the reference the mask holds."""
    if mask.shape != reference.shape:
        raise ValueError(f"the reference mask is {reference.shape}, the attention mask {mask.shape}: give a mask of "
                         "the decoded video's frames and size")
    inter = np.logical_and(mask, reference).sum()
    union = np.logical_or(mask, reference).sum()
    ref = reference.sum()
    return (float(inter / union) if union else 1.0), (float(inter / ref) if ref else 0.0)


def masks_on_video(masks: np.ndarray, meta: dict, height: Optional[int] = None, width: Optional[int] = None,
                   frames: Optional[int] = None) -> np.ndarray:
    """``[F, h, w]`` masks on the map grid -> ``[frames, height, width]`` on the decoded video (see the docstring)."""
    stride_t, vae_h, vae_w = meta.get("model", {}).get("vae_stride", [4, 8, 8])
    masks = video_maps(masks[None], meta, frames, stride_t)[0]  # reference/context frames left out, count checked
    f, h, w = masks.shape
    patch = meta.get("model", {}).get("patch_size", [1, 2, 2])
    lf, lh, lw = meta["latent_grid"]
    cell_h, cell_w = vae_h * patch[1] * -(-lh // h), vae_w * patch[2] * -(-lw // w)
    frames = frames or pixel_frame_count(f, stride_t)
    index = list(range(f)) if frames == f else [latent_frame_of(p, f, stride_t) for p in range(frames)]
    out = np.repeat(np.repeat(masks[index], cell_h, axis=1), cell_w, axis=2)
    height, width = height or h * cell_h, width or w * cell_w
    if -(-height // cell_h) == h and -(-width // cell_w) == w:
        return out[:, :height, :width]  # the grid covers the video rounded up to whole cells
    ys = (np.arange(height) * out.shape[1]) // height  # another size: nearest cell
    xs = (np.arange(width) * out.shape[2]) // width
    return out[:, ys][:, :, xs]
