"""Sink dynamics: what recent work on attention sinks in autoregressive video measures, from exact frame x frame mass.

Each function takes a chunk's query-frame x key-frame probability mass (``[..., Fq, Fk]``, rows sum to 1 over the
key frames the chunk attended to, in cache order) and the absolute frame of each key frame; nothing is approximated.

* **class mass**: the mass a query frame gives to each class of key frame: ``sink`` (the frames the model keeps as
  sinks), ``pinned`` (frames pinned by the model beside the sinks, e.g. LongLive's), ``chunk`` (the chunk's own frames)
  and ``window`` (every other cached frame). Frames not in the cache are absent: no class, no mass.
* **head agreement**: for each query frame, the mean over pairs of heads of ``1 - JS(p_h, p_g)``, the Jensen-Shannon
  divergence in bits (so in [0, 1]) between the heads' distributions over key frames; 1 when every head attends
  alike (the collapse signal of arXiv 2605.21028), lower when heads differ.
* **behavioural sinks**: key frames whose share (the mean over the chunk's query frames of their mass) exceeds
  ``multiple`` times the uniform share ``1 / Fk``, whatever the model configured.
* **sink distance**: per sink key frame, the mean over the chunk's query frames of the RoPE frame distance
  ``position(query frame) - position(key frame)`` (positions are the absolute frames unless the model re-ropes them).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

CLASSES = ("sink", "pinned", "window", "chunk")


def key_classes(key_frames: Sequence[int], chunk: int, sink_frames: Sequence[int] = (),
                pinned_frames: Sequence[int] = ()) -> List[str]:
    """The class of each key frame of a chunk's cache (see the module docstring)."""
    sinks, pinned = set(sink_frames), set(pinned_frames)
    return ["chunk" if f >= chunk else "sink" if f in sinks else "pinned" if f in pinned else "window"
            for f in key_frames]


def class_mass(mass: np.ndarray, classes: Sequence[str]) -> Dict[str, np.ndarray]:
    """``mass [..., Fq, Fk]`` -> per class the mass each query frame gives it, ``[..., Fq]`` (0 for a class with no
    frame in the cache)."""
    mass = np.asarray(mass, dtype=np.float64)
    out = {}
    for c in CLASSES:
        picked = [i for i, k in enumerate(classes) if k == c]
        out[c] = mass[..., picked].sum(axis=-1) if picked else np.zeros(mass.shape[:-1])
    return out


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)


def head_agreement(mass: np.ndarray) -> np.ndarray:
    """``mass [heads, Fq, Fk]`` -> ``[Fq]``: mean pairwise ``1 - JS`` (bits) of the heads' key-frame distributions;
    NaN with fewer than two heads."""
    p = np.asarray(mass, dtype=np.float64)
    p = p / np.clip(p.sum(axis=-1, keepdims=True), 1e-300, None)
    h = p.shape[0]
    if h < 2:
        return np.full(p.shape[1], np.nan)
    sims = []
    for a in range(h):
        for b in range(a + 1, h):
            m = (p[a] + p[b]) / 2
            js = _entropy_bits(m) - (_entropy_bits(p[a]) + _entropy_bits(p[b])) / 2
            sims.append(1.0 - np.clip(js, 0.0, 1.0))
    return np.mean(sims, axis=0)


def key_share(mass: np.ndarray) -> np.ndarray:
    """``mass [..., Fq, Fk]`` -> ``[..., Fk]``: each key frame's mean mass over the query frames."""
    return np.asarray(mass, dtype=np.float64).mean(axis=-2)


def behavioural_sinks(mass: np.ndarray, key_frames: Sequence[int], multiple: float = 2.0) -> List[int]:
    """The key frames (absolute) whose share of ``mass [Fq, Fk]`` exceeds ``multiple`` times the uniform ``1/Fk``."""
    share = key_share(mass)
    return [int(f) for f, s in zip(key_frames, share) if s > multiple / len(key_frames)]


def sink_distance(query_frames: Sequence[int], sink_frames: Sequence[int],
                  positions: Optional[Dict[int, int]] = None) -> Dict[int, float]:
    """Per sink frame, the mean RoPE frame distance from the chunk's query frames (``positions``: the frame position
    RoPE gave each frame, when it is not the frame itself)."""
    pos = positions or {}
    q = np.array([pos.get(f, f) for f in query_frames], dtype=np.float64)
    return {int(s): float((q - pos.get(s, s)).mean()) for s in sink_frames}
