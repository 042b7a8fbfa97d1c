"""Colormaps without matplotlib: viridis, inferno, magma (9-colour anchor palettes), turbo (Google's polynomial),
jet and gray. Values in [0, 1] map to RGB in [0, 1]."""
from __future__ import annotations

import numpy as np

_ANCHORS = {
    # the 9-step palettes of matplotlib's perceptually uniform maps, interpolated linearly
    "viridis": "440154 472d7b 3b528b 2c728e 21918c 28ae80 5ec962 addc30 fde725",
    "inferno": "000004 1f0c48 550f6d 88226a ba3655 e35932 f98c0a f9c932 fcffa4",
    "magma": "000004 1c1044 4f127b 812581 b5367a e55064 fb8761 fec287 fcfdbf",
}
COLORMAPS = ("viridis", "inferno", "magma", "turbo", "jet", "gray")


def _anchor_map(name: str, x: np.ndarray) -> np.ndarray:
    cols = np.array([[int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4)] for h in _ANCHORS[name].split()])
    pos = np.linspace(0.0, 1.0, len(cols))
    return np.stack([np.interp(x, pos, cols[:, c]) for c in range(3)], axis=-1)


def _turbo(x: np.ndarray) -> np.ndarray:
    r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))))
    g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
    b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))))
    return np.stack([r, g, b], axis=-1)


def _jet(x: np.ndarray) -> np.ndarray:
    return np.stack([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2), 1.5 - np.abs(4 * x - 1)], axis=-1)


def apply_colormap(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` in [0, 1] (clipped; NaN shows as the low end) -> ``[..., 3]`` float32 RGB in [0, 1]."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {COLORMAPS}")
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    if name in _ANCHORS:
        rgb = _anchor_map(name, x)
    elif name == "turbo":
        rgb = _turbo(x)
    elif name == "jet":
        rgb = _jet(x)
    else:
        rgb = np.repeat(x[..., None], 3, axis=-1)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)
