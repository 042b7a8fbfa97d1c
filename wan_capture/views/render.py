"""Rendering maps to pictures with numpy and Pillow: normalisation, colour, overlays, legends, labelled grids, plots.

Images are float32 ``[H, W, 3]`` in [0, 1] (ComfyUI's IMAGE layout without the batch axis).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .colormaps import COLORMAPS, apply_colormap

NORMALIZE = ("per_frame", "per_video", "shared", "fixed", "percentile")
INK = (0, 0, 0)
ABSENT = (0.82, 0.82, 0.82)  # light grey: a cell with no value (NaN), e.g. a key frame not in the cache


@lru_cache(maxsize=8)
def font(size: int = 12):
    """Pillow's bundled font (FreeType when available, else its bitmap font): works on a bare machine."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def value_ranges(maps: np.ndarray, mode: str, vmin: float = 0.0, vmax: float = 1.0, p_low: float = 0.0,
                 p_high: float = 100.0) -> np.ndarray:
    """``(lo, hi)`` per frame for ``maps [N, F, H, W]`` under a normalisation mode -> ``[N, F, 2]``.

    per_frame: each frame its own range; per_video: one range per sequence N; shared: one range for everything
    rendered together (so steps and tokens compare). Within each group the range runs from the ``p_low`` to the
    ``p_high`` percentile (0 and 100: minimum and maximum). fixed: ``vmin..vmax``; percentile: shared (kept for
    0.1.0 callers).
    """
    if mode not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {mode!r}")
    n, f = maps.shape[:2]
    if mode == "fixed":
        if not vmax > vmin:
            raise ValueError(f"fixed normalisation needs vmax > vmin, got {vmin}..{vmax}")
        lo, hi = np.full((n, f), vmin), np.full((n, f), vmax)
        return np.stack([lo, hi], axis=-1).astype(np.float64)
    if not 0 <= p_low < p_high <= 100:
        raise ValueError(f"percentiles need 0 <= low < high <= 100, got {p_low}..{p_high}")
    axes = {"per_frame": (2, 3), "per_video": (1, 2, 3)}.get(mode, (0, 1, 2, 3))
    if (p_low, p_high) == (0, 100):
        lo, hi = maps.min(axis=axes, keepdims=True), maps.max(axis=axes, keepdims=True)
    else:
        lo, hi = np.percentile(maps, [p_low, p_high], axis=axes, keepdims=True)
    lo, hi = np.broadcast_to(lo[..., 0, 0], (n, f)), np.broadcast_to(hi[..., 0, 0], (n, f))
    return np.stack([lo, hi], axis=-1).astype(np.float64)


def normalize(maps: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Scale ``maps [N, F, H, W]`` into [0, 1] with per-frame ranges (values outside are clipped)."""
    lo, hi = ranges[..., 0][..., None, None], ranges[..., 1][..., None, None]
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((maps - lo) / span, 0.0, 1.0).astype(np.float32)


def blend(heat: np.ndarray, image: Optional[np.ndarray], alpha: float) -> np.ndarray:
    """Heat colours over an image: ``(1 - alpha) * image + alpha * heat`` (the heat alone without an image)."""
    if image is None:
        return heat
    return ((1.0 - alpha) * image[..., :3] + alpha * heat).astype(np.float32)


def _to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


def _from_pil(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


LEGEND_TEXT = 12  # the legend's label size; smaller only where the frame is too narrow, never under MIN_TEXT
MIN_TEXT = 8


def legend_layout(width: int, lo: float, hi: float) -> dict:
    """Where a legend of ``width`` pixels writes its two labels: side by side when they fit (the font shrinking to
    ``MIN_TEXT`` first), else the high value on a line of its own, so they never overlap."""
    lo_t, hi_t = fmt(lo), fmt(hi)
    for size in range(LEGEND_TEXT, MIN_TEXT - 1, -1):
        if text_size(lo_t, size)[0] + text_size(hi_t, size)[0] + 8 <= width:
            return {"size": size, "lines": 1, "lo": (2, 0), "hi": (width - 2 - text_size(hi_t, size)[0], 0)}
    line = text_size("0", MIN_TEXT)[1] + 2
    return {"size": MIN_TEXT, "lines": 2, "lo": (2, 0), "hi": (max(2, width - 2 - text_size(hi_t, MIN_TEXT)[0]), line)}


def legend(width: int, lo: float, hi: float, cmap: str, height: int = 20) -> np.ndarray:
    """A strip: the colour gradient of the range used, with its low and high values written under it, readable at
    any width (see :func:`legend_layout`)."""
    layout = legend_layout(width, lo, hi)
    bar_h = max(4, height // 3)
    text_h = (text_size("0", layout["size"])[1] + 3) * layout["lines"]
    img = np.ones((bar_h + text_h + 2, width, 3), dtype=np.float32)
    img[:bar_h] = apply_colormap(np.linspace(0, 1, width), cmap)[None]
    pil = _to_pil(img)
    d = ImageDraw.Draw(pil)
    f = font(layout["size"])
    for text, (x, y) in ((fmt(lo), layout["lo"]), (fmt(hi), layout["hi"])):
        d.text((x, bar_h + 1 + y), text, fill=INK, font=f)
    return _from_pil(pil)


def with_legend(frame: np.ndarray, lo: float, hi: float, cmap: str) -> np.ndarray:
    return np.concatenate([frame, legend(frame.shape[1], lo, hi, cmap)], axis=0)


def text_size(text: str, size: int) -> Tuple[int, int]:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(size))
    return box[2] - box[0], box[3] - box[1]


def labelled_grid(cells: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], col_labels: Sequence[str],
                  title: str = "", pad: int = 4, size: int = 12) -> np.ndarray:
    """Cells ``[rows][cols]`` of equal-size images, row labels on the left, column labels on top, a title above."""
    rows, cols = len(cells), len(cells[0])
    ch, cw = cells[0][0].shape[:2]
    left = max([text_size(t, size)[0] for t in row_labels] + [0]) + 2 * pad
    top_title = text_size(title, size + 2)[1] + 2 * pad if title else 0
    top = top_title + max([text_size(t, size)[1] for t in col_labels] + [0]) + 2 * pad
    out = np.ones((top + rows * (ch + pad), left + cols * (cw + pad), 3), dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            y, x = top + r * (ch + pad), left + c * (cw + pad)
            out[y:y + ch, x:x + cw] = cells[r][c][..., :3]
    pil = _to_pil(out)
    d = ImageDraw.Draw(pil)
    if title:
        d.text((pad, pad), title, fill=INK, font=font(size + 2))
    for c, t in enumerate(col_labels):
        d.text((left + c * (cw + pad) + (cw - text_size(t, size)[0]) // 2, top_title + pad), t, fill=INK, font=font(size))
    for r, t in enumerate(row_labels):
        d.text((pad, top + r * (ch + pad) + (ch - text_size(t, size)[1]) // 2), t, fill=INK, font=font(size))
    return _from_pil(pil)


def matrix_plot(matrix: np.ndarray, cmap: str, lo: float, hi: float, xlabel: str, ylabel: str, title: str = "",
                xticks: Sequence[Tuple[int, str]] = (), yticks: Sequence[Tuple[int, str]] = (),
                max_side: int = 640, size: int = 12) -> np.ndarray:
    """A matrix as a heatmap with axis labels, tick labels, a title and a colorbar with its range."""
    rows, cols = matrix.shape
    scale = max(1, min(max_side // max(rows, cols, 1), 64))
    heat = apply_colormap(normalize(np.nan_to_num(matrix)[None, None], np.array([[[lo, hi]]]))[0, 0], cmap)
    heat[np.isnan(matrix)] = ABSENT  # NaN: absent (a key not in the cache), told apart from any value
    heat = np.repeat(np.repeat(heat, scale, axis=0), scale, axis=1)
    hh, hw = heat.shape[:2]
    tick_w = max([text_size(t, size)[0] for _, t in yticks] + [0])
    left = text_size(ylabel, size)[1] + tick_w + 16
    top = text_size(title, size + 2)[1] + 12 if title else 8
    bottom = text_size("0", size)[1] + text_size(xlabel, size)[1] + 18
    bar_w, bar_gap = 14, 12
    right = bar_gap + bar_w + max(text_size(fmt(lo), size)[0], text_size(fmt(hi), size)[0]) + 10
    right = max(right, text_size(title, size + 2)[0] + 8 - hw) if title else right  # the whole title shows
    out = np.ones((top + hh + bottom, left + hw + right, 3), dtype=np.float32)
    out[top:top + hh, left:left + hw] = heat
    bar = apply_colormap(np.linspace(1, 0, hh), cmap)[:, None, :]
    out[top:top + hh, left + hw + bar_gap:left + hw + bar_gap + bar_w] = bar
    pil = _to_pil(out)
    d = ImageDraw.Draw(pil)
    f = font(size)
    if title:
        d.text((left, 4), title, fill=INK, font=font(size + 2))
    for pos, t in xticks:
        x = left + int((pos + 0.5) * scale)
        d.line([(x, top + hh), (x, top + hh + 3)], fill=INK)
        d.text((x - text_size(t, size)[0] // 2, top + hh + 4), t, fill=INK, font=f)
    for pos, t in yticks:
        y = top + int((pos + 0.5) * scale)
        d.line([(left - 3, y), (left, y)], fill=INK)
        d.text((left - 5 - text_size(t, size)[0], y - text_size(t, size)[1] // 2), t, fill=INK, font=f)
    d.text((left + (hw - text_size(xlabel, size)[0]) // 2, top + hh + bottom - text_size(xlabel, size)[1] - 6),
           xlabel, fill=INK, font=f)
    label = Image.new("RGB", (text_size(ylabel, size)[0] + 4, text_size(ylabel, size)[1] + 6), (255, 255, 255))
    ImageDraw.Draw(label).text((2, 0), ylabel, fill=INK, font=f)
    rotated = label.rotate(90, expand=True)
    pil.paste(rotated, (2, top + (hh - rotated.size[1]) // 2))
    bx = left + hw + bar_gap + bar_w + 4
    d.text((bx, top), fmt(hi), fill=INK, font=f)
    d.text((bx, top + hh - text_size(fmt(lo), size)[1] - 2), fmt(lo), fill=INK, font=f)
    return _from_pil(pil)


def pad_to(images: List[np.ndarray]) -> np.ndarray:
    """Stack images of different sizes into one batch, padding with the background colour."""
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    out = np.ones((len(images), h, w, 3), dtype=np.float32)
    for k, img in enumerate(images):
        out[k, :img.shape[0], :img.shape[1]] = img[..., :3]
    return out


@dataclass(frozen=True)
class HeatmapStyle:
    """How values become colours: the colormap, the range grouping and its ends, the legend.

    ``low``/``high`` are percentiles of the values within each group (0 and 100: minimum and maximum), or with
    ``normalize="fixed"`` the values themselves.
    """

    colormap: str = "inferno"
    normalize: str = "per_video"
    low: float = 0.0
    high: float = 100.0
    legend: bool = False  # off: pictures the size of the video, to blend or set beside its frames

    def __post_init__(self):
        if self.colormap not in COLORMAPS:
            raise ValueError(f"colormap must be one of {sorted(COLORMAPS)}, got {self.colormap!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        value_ranges(np.zeros((1, 1, 1, 2)), self.normalize, self.low, self.high,
                     *((0.0, 100.0) if self.normalize == "fixed" else (self.low, self.high)))  # checks the ends now

    def norm(self) -> dict:
        """Keyword arguments of the view functions (``cmap``, ``mode``, range ends)."""
        fixed = self.normalize == "fixed"
        return dict(cmap=self.colormap, mode=self.normalize, vmin=self.low, vmax=self.high,
                    p_low=0.0 if fixed else self.low, p_high=100.0 if fixed else self.high)
