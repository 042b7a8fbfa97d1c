"""Slices of saved recordings for the interactive viewer: one step x block x head x token map as float32 bytes,
read lazily, from files that must lie inside a given root (the ComfyUI output folder)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from .analyzer import AttentionAnalyzer

MAX_SLICE_BYTES = 1 << 30  # the largest array a slice reads (a full 14B recording's step of one word is ~0.25 GiB)


def reader(maps_dir: str, root: Optional[str] = None, max_bytes: Optional[int] = MAX_SLICE_BYTES) -> AttentionAnalyzer:
    """An analyzer confined to ``root`` (every file, symlinks resolved) that loads at most ``max_bytes`` an array."""
    return AttentionAnalyzer(maps_dir, confine_to=root, max_bytes=max_bytes)


class Refused(PermissionError):
    """The request points outside the allowed root (``..``, an absolute path, a symlink out)."""


def resolve(root: str, rel: str) -> str:
    """``root/rel`` if it exists and resolves (symlinks included) inside ``root``; else Refused/FileNotFoundError."""
    if not rel or os.path.isabs(rel) or "\\" in rel or any(p in ("..", "") for p in rel.strip("/").split("/")):
        raise Refused("path refused")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([real_root, real]) != real_root:
        raise Refused("path refused")
    if not os.path.exists(real):
        raise FileNotFoundError("not found")
    return real


def _axis(values: list, choice: str, name: str) -> Optional[int]:
    """Position along a saved blocks/heads axis for a model index, or None for the mean."""
    if choice in ("", "mean", "all") or values == [-1]:
        return None
    try:
        return values.index(int(choice))
    except ValueError:
        raise FileNotFoundError(f"{name} {choice} was not saved; saved: {values}") from None


def self_attention_bound(summary: dict) -> int:
    """The largest a self-attention array of this recording can be, from its summary (blocks x heads x the larger of
    the keys and the frame x frame matrix, float32): nothing larger is decompressed."""
    frames, h, w = summary.get("latent_grid") or [0, 0, 0]
    cells = max(frames * h * w, frames * frames)
    size = len(summary.get("blocks") or [1]) * len(summary.get("heads") or [1]) * cells * 4 + 4096
    return min(MAX_SLICE_BYTES, size)


def token_slice(maps_dir: str, video: str, token: str, step: int, branch: str = "cond", block: str = "mean",
                head: str = "mean", root: Optional[str] = None) -> Tuple[np.ndarray, dict]:
    """``[F, h, w]`` float32 map of a word at one step (one block/head, or their mean; mean over its pieces)."""
    an = reader(maps_dir, root)
    b = "" if branch == "cond" else branch
    meta = _bounded_by_metadata(an, video, token, step, b)
    data = an.load_step(video, token, step, b)  # [blocks, heads, spatial, pieces]
    bi, hi = _axis(meta["blocks"], block, "block"), _axis(meta["heads"], head, "head")
    data = data.mean(axis=0) if bi is None else data[bi]
    data = data.mean(axis=0) if hi is None else data[hi]
    f, h, w = meta["map_grid"]
    return np.ascontiguousarray(data.mean(axis=-1).reshape(f, h, w), dtype=np.float32), meta


def _bounded_by_metadata(an: AttentionAnalyzer, video: str, token: str, step: int, branch: str) -> dict:
    """The step's metadata; the reader then decompresses nothing larger than the array it describes (a planted gzip
    bomb is refused)."""
    meta = an.load_metadata(video, token, step, branch)
    shape = meta.get("attention_shape") or []
    expected = int(np.prod(shape)) * (4 if "float32" in str(meta.get("dtype")) else 2) if shape else MAX_SLICE_BYTES
    an.max_bytes = min(MAX_SLICE_BYTES, expected + 4096)
    return meta


def sink_slice(maps_dir: str, video: str, step: int, branch: str = "cond", block: str = "mean",
               head: str = "mean", root: Optional[str] = None) -> Tuple[np.ndarray, dict]:
    """``[F, H, W]`` attention received per key at one step, on the latent grid (causal Wan: assembled over the
    chunks, see :mod:`wan_capture.causal_stats`)."""
    an = reader(maps_dir, root)
    summary = an.summary(video)
    an.max_bytes = self_attention_bound(summary)
    br = "" if branch == "cond" else branch
    if "causal" in summary:  # causal Wan: per-chunk statistics assembled over the video in absolute frames
        data = np.nan_to_num(an.get_causal_self_attention(video, step, "received", br))
    else:
        data = an.load_self_attention(video, step, "received", br)
    bi, hi = _axis(summary["blocks"], block, "block"), _axis(summary["heads"], head, "head")
    data = data.mean(axis=0) if bi is None else data[bi]
    data = data.mean(axis=0) if hi is None else data[hi]
    f, h, w = summary["latent_grid"]
    return np.ascontiguousarray(data.reshape(f, h, w), dtype=np.float32), summary


def frame_mass_slice(maps_dir: str, video: str, step: int, branch: str = "cond", block: str = "mean",
                     head: str = "mean", root: Optional[str] = None) -> Tuple[np.ndarray, dict]:
    """``[F, F]`` query-frame x key-frame probability mass at one step; causal Wan: the assembled causal matrix,
    with the sink frames in the returned summary's ``sink_frames``."""
    an = reader(maps_dir, root)
    summary = dict(an.summary(video))
    an.max_bytes = self_attention_bound(summary)
    br = "" if branch == "cond" else branch
    if "causal" in summary:
        data = an.get_causal_self_attention(video, step, "frame_mass", br)
        summary["sink_frames"] = an.sink_frames(video)
    else:
        data = an.load_self_attention(video, step, "frame_mass", br)
        summary["sink_frames"] = []
    bi, hi = _axis(summary["blocks"], block, "block"), _axis(summary["heads"], head, "head")
    data = data.mean(axis=0) if bi is None else data[bi]
    data = data.mean(axis=0) if hi is None else data[hi]
    return np.ascontiguousarray(data, dtype=np.float32), summary


def point_probe(maps_dir: str, video: str, frame: int, y: int, x: int, branch: str = "cond",
                root: Optional[str] = None) -> dict:
    """Every tracked word's value at one map cell (latent frame, row, column) over the saved steps, per block and
    as the mean over blocks (mean over heads and the word's pieces), read from the saved arrays."""
    an = reader(maps_dir, root)
    summary = an.summary(video)
    f, h, w = summary["map_grid"]
    if not (0 <= frame < f and 0 <= y < h and 0 <= x < w):
        raise ValueError("cell outside the map grid")
    b = "" if branch == "cond" else branch
    cell = (frame * h + y) * w + x
    out = {"steps": list(summary["steps"]), "blocks": list(summary["blocks"]), "cell": [frame, y, x], "words": {}}
    for label in an.list_tokens(video, b):
        rows = []
        for step in out["steps"]:
            _bounded_by_metadata(an, video, label, step, b)
            data = an.load_step(video, label, step, b)  # [blocks, heads, spatial, pieces]
            rows.append(data[:, :, cell, :].mean(axis=(1, 2)))
        per = np.asarray(rows, dtype=np.float64)  # [steps, blocks]
        out["words"][label] = {"blocks": per.T.tolist(), "mean": per.mean(axis=1).tolist()}
    return out
