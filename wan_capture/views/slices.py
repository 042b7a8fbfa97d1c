"""Slices of saved recordings for the interactive viewer: one step x block x head x token map as float32 bytes,
read lazily, from files that must lie inside a given root (the ComfyUI output folder)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from ..recording.analyzer import AttentionAnalyzer
from ..recording.reader import ArrayTooLarge, DamagedFileError
from ..recording import FolderRecording
from ..keys import ArrayKey
from ..recording.recording import MAX_ASSEMBLED_BYTES, NotRecorded
from .select import axis_positions, parse_selection

MAX_PROBE_ARRAYS = 4096  # arrays one point probe reads (a real recording: words x steps, e.g. 4 x 30)
MAX_SLICE_BYTES = 1 << 30  # the largest array a slice reads (a full 14B recording's step of one word is ~0.25 GiB)
MAX_PROBE_BYTES = 2 << 30  # what one point probe may read or decompress in all (a few seconds of one worker)


def reader(maps_dir: str, root: Optional[str] = None, max_bytes: Optional[int] = MAX_SLICE_BYTES) -> AttentionAnalyzer:
    """An analyzer confined to ``root`` (every file, symlinks resolved) that loads at most ``max_bytes`` an array."""
    return AttentionAnalyzer(maps_dir, confine_to=root, max_bytes=max_bytes)


def _pick(data: np.ndarray, summary: dict, block: str, head: str) -> np.ndarray:
    """``[blocks, heads, ...]`` (any float dtype) -> float32 ``[...]``: one block/head (a model index) or ``mean``; a
    head or block the recording kept only as a mean is a SelectionError, as in the view nodes. The selection is
    taken before the conversion, and the mean accumulates in float32 without a converted copy."""
    bi = _run(axis_positions(summary["blocks"], parse_selection(block, "blocks"), "blocks"), data.shape[0])
    hi = _run(axis_positions(summary["heads"], parse_selection(head, "heads"), "heads"), data.shape[1])
    return data[bi][:, hi].mean(axis=(0, 1), dtype=np.float32)


def _run(positions, n: int):
    """A list of positions as a slice where it is one contiguous run (a view, not a copy)."""
    positions = list(positions)
    if positions and positions == list(range(positions[0], positions[-1] + 1)) and positions[-1] < n:
        return slice(positions[0], positions[-1] + 1)
    return positions


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
    rec = FolderRecording(an, video)
    meta = _bounded_by_metadata(an, rec, token, step, branch)
    data = _pick(rec.stored(ArrayKey("cross", token, step, branch), f"cross-attention maps of {token!r}"), meta,
                 block, head)  # [spatial, pieces]
    if meta.get("map_grid") != rec.summary.get("map_grid"):
        raise DamagedFileError(f"step {step} of {token!r}: its metadata's map_grid is not the summary's", "metadata")
    f, h, w = meta["map_grid"]
    return np.ascontiguousarray(data.mean(axis=-1).reshape(f, h, w), dtype=np.float32), meta


def _word_bytes(summary: dict, word: dict) -> int:
    """The largest one step of a word's maps can be, from the recording's geometry: blocks x heads x map cells x
    the word's pieces, float32."""
    pieces = max(1, len(word.get("positions") or [1]))
    cells = int(np.prod(summary.get("map_grid") or [0], dtype=np.int64))
    return len(summary.get("blocks") or [1]) * len(summary.get("heads") or [1]) * cells * pieces * 4


def _cell_bytes(summary: dict, word: dict) -> int:
    """What one cell of one step of a word is in an uncompressed file: blocks x heads x its pieces, float32 at most."""
    return _word_bytes(summary, word) // max(1, int(np.prod(summary.get("map_grid") or [1], dtype=np.int64)))


def _bounded_by_metadata(an: AttentionAnalyzer, rec: FolderRecording, token: str, step: int, branch: str) -> dict:
    """The step's metadata; the reader then decompresses nothing larger than the array the recording's geometry
    allows for this word (blocks x heads x map cells x its pieces, float32 at most) nor than its metadata says: a
    planted gzip bomb stops there (413), whatever its metadata claims. The summary is the one ``rec`` read."""
    summary = rec.summary
    words = {t["label"]: t for t in rec.words(branch)}
    if token not in words:
        raise NotRecorded(f"no tracked word {token!r} ({branch}); tracked: {sorted(words)}")
    meta = rec.metadata(ArrayKey("cross", token, step, branch))
    geometry = _word_bytes(summary, words[token])
    shape = meta.get("attention_shape") or []
    claimed = int(np.prod(shape, dtype=np.int64)) * 4 if _is_shape(shape) else geometry
    an.max_bytes = min(MAX_SLICE_BYTES, geometry, claimed) + 4096
    return meta


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(type(v) is int and v > 0 for v in value)


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
    cell = (frame * h + y) * w + x
    steps = sorted({k.step for k in rec.keys_of("cross", branch)})
    labels = rec.labels_of(branch)
    words = {t["label"]: t for t in rec.words(branch)}
    # words may share a token folder (one array a step): each file is read once, whatever names it
    folders: dict = {}
    for label in labels:
        folders.setdefault(rec.folder_of(ArrayKey("cross", label, 0, branch)), []).append(label)
    reads = len(folders) * len(steps)
    if reads > MAX_PROBE_ARRAYS:  # each array is read once; this many is no real recording
        raise ArrayTooLarge(f"a probe of {len(folders)} token folders at {len(steps)} steps would read {reads} "
                            f"arrays, over {MAX_PROBE_ARRAYS}")
    bounds, cost = {}, 0
    for folder, named in folders.items():
        bound = bounds[folder] = min(MAX_SLICE_BYTES, max(_word_bytes(rec.summary, words[label]) for label in named)) \
            + 4096
        for step in steps:
            path = rec.array_file(ArrayKey("cross", named[0], step, branch))
            # an uncompressed file gives one cell's runs; any other is read whole, up to its geometry's size
            cost += _cell_bytes(rec.summary, words[named[0]]) if path.endswith(".npy") else bound
    if cost > MAX_PROBE_BYTES:
        raise ArrayTooLarge(f"a probe of this recording would read up to {cost} bytes ({reads} arrays), "
                            f"over {MAX_PROBE_BYTES}: save it uncompressed to probe it")
    out = {"steps": steps, "blocks": rec.blocks, "cell": [frame, y, x], "words": {}}
    for folder, named in folders.items():
        rows = []
        for step in steps:
            an.max_bytes = bounds[folder]  # a compressed file is read whole: bounded by its geometry (gzip bombs)
            rows.append(rec.cross_cell(named[0], step, cell, branch).mean(axis=(1, 2)))  # [blocks]
        per = np.asarray(rows, dtype=np.float64)  # [steps, blocks]
        for label in named:
            out["words"][label] = {"blocks": per.T.tolist(), "mean": per.mean(axis=1).tolist()}
    return out
