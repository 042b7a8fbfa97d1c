"""Slices of saved recordings for the interactive viewer: one step x block x head x token map as float32 bytes,
read lazily, from files that must lie inside a given root (the ComfyUI output folder)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from ..recording.analyzer import AttentionAnalyzer
from ..recording import FolderRecording
from ..recording.recording import MAX_ASSEMBLED_BYTES
from .select import axis_positions, parse_selection

MAX_SLICE_BYTES = 1 << 30  # the largest array a slice reads (a full 14B recording's step of one word is ~0.25 GiB)


def reader(maps_dir: str, root: Optional[str] = None, max_bytes: Optional[int] = MAX_SLICE_BYTES) -> AttentionAnalyzer:
    """An analyzer confined to ``root`` (every file, symlinks resolved) that loads at most ``max_bytes`` an array."""
    return AttentionAnalyzer(maps_dir, confine_to=root, max_bytes=max_bytes)


def _pick(data: np.ndarray, summary: dict, block: str, head: str) -> np.ndarray:
    """``[blocks, heads, ...]`` -> ``[...]``: one block/head (a model index) or ``mean``; a head or block the
    recording kept only as a mean is a SelectionError, as in the view nodes."""
    bi = axis_positions(summary["blocks"], parse_selection(block, "blocks"), "blocks")
    hi = axis_positions(summary["heads"], parse_selection(head, "heads"), "heads")
    return data[bi][:, hi].mean(axis=(0, 1))


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
    meta = _bounded_by_metadata(an, video, token, step, "" if branch == "cond" else branch)
    data = _pick(FolderRecording(an, video).cross(token, step, branch), meta, block, head)  # [spatial, pieces]
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


def _self_attention(maps_dir: str, video: str, step: int, name: str, branch: str, block: str, head: str,
                    root: Optional[str]):
    """A sink statistic of one step, one block/head or their mean, whole video (causal Wan: assembled over the chunks
    in absolute frames, each chunk reduced first, the assembly bounded)."""
    an = reader(maps_dir, root)
    rec = FolderRecording(an, video)
    an.max_bytes = self_attention_bound(rec.summary)
    rec.assembly_limit = MAX_ASSEMBLED_BYTES
    return rec.sink(step, name, branch, pick=lambda a: _pick(a, rec.summary, block, head)), rec


def sink_slice(maps_dir: str, video: str, step: int, branch: str = "cond", block: str = "mean",
               head: str = "mean", root: Optional[str] = None) -> Tuple[np.ndarray, dict]:
    """``[F, H, W]`` attention received per key at one step, on the latent grid (causal Wan: assembled over the
    chunks, see :mod:`wan_capture.stats.causal`; a key no chunk attended to is 0)."""
    data, rec = _self_attention(maps_dir, video, step, "received", branch, block, head, root)
    f, h, w = rec.summary["latent_grid"]
    return np.ascontiguousarray(np.nan_to_num(data).reshape(f, h, w), dtype=np.float32), rec.summary


def frame_mass_slice(maps_dir: str, video: str, step: int, branch: str = "cond", block: str = "mean",
                     head: str = "mean", root: Optional[str] = None) -> Tuple[np.ndarray, dict]:
    """``[F, F]`` query-frame x key-frame probability mass at one step; causal Wan: the assembled causal matrix,
    with the sink frames in the returned summary's ``sink_frames``."""
    data, rec = _self_attention(maps_dir, video, step, "frame_mass", branch, block, head, root)
    summary = dict(rec.summary, sink_frames=rec.sink_frames)
    return np.ascontiguousarray(data, dtype=np.float32), summary


def point_probe(maps_dir: str, video: str, frame: int, y: int, x: int, branch: str = "cond",
                root: Optional[str] = None) -> dict:
    """Every tracked word's value at one map cell (latent frame, row, column) over the saved steps, per block and
    as the mean over blocks (mean over heads and the word's pieces), read from the saved arrays."""
    an = reader(maps_dir, root)
    rec = FolderRecording(an, video)
    f, h, w = rec.summary["map_grid"]
    if not (0 <= frame < f and 0 <= y < h and 0 <= x < w):
        raise ValueError("cell outside the map grid")
    b = "" if branch == "cond" else branch
    cell = (frame * h + y) * w + x
    steps = sorted({k.step for k in rec.keys_of("cross", branch)})
    out = {"steps": steps, "blocks": rec.blocks, "cell": [frame, y, x], "words": {}}
    for label in rec.labels_of(branch):
        rows = []
        for step in steps:
            _bounded_by_metadata(an, video, label, step, b)
            rows.append(rec.cross(label, step, branch)[:, :, cell, :].mean(axis=(1, 2)))  # [blocks]
        per = np.asarray(rows, dtype=np.float64)  # [steps, blocks]
        out["words"][label] = {"blocks": per.T.tolist(), "mean": per.mean(axis=1).tolist()}
    return out
