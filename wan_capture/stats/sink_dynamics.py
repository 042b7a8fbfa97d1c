"""Sink dynamics: the metrics of attention-sink studies in autoregressive video, from exact frame x frame mass.

Each function takes a chunk's query-frame x key-frame probability mass ``m`` (``[..., Fq, Fk]``: ``m[a, b]`` is the
sum over query frame ``a``'s tokens, averaged, of the probability on key frame ``b``'s tokens; rows sum to 1 over the
key frames the chunk attended to, in cache order), the absolute frame of each key frame and its token count ``T_b``.
Nothing is approximated. Each metric is defined once here; ``docs/FORMAT.md`` gives the same formulas.

* **mass** ``m[a, b]`` and **per-token mean** ``m[a, b] / T_b`` (the mean probability of one of frame ``b``'s keys,
  the quantity plotted by per-token studies such as Deep Forcing's Fig. 4).
* **key classes**: ``sink`` (frames the model keeps as sinks), ``pinned`` (frames pinned beside them, e.g. LongLive's
  multi-shot sink), ``chunk`` (the chunk's own frames), ``window`` (every other cached frame). A frame not in the
  cache has no class and no mass: absent, never 0.
* **class share** ``S_c = mean_a sum_{b in c} m[a, b]`` and the **uniform share** ``U_c = sum_{b in c} T_b / sum_b
  T_b`` it would have if every key were attended alike; **ratio to uniform** ``S_c / U_c`` (1: no preference; a
  growing cache lowers ``S_c`` and ``U_c`` together, so the ratio, not the share, tells a decaying sink). None when
  the class has no frame in the cache.
* **concentration** of a head: ``1 - H(m[a, :]) / log2(Fk)``, mean over query frames (H in bits over the key frames;
  0 for a head attending uniformly, 1 for all mass on one frame; None with one key frame).
* **head consensus**: the mean over query frames and pairs of heads ``(h, g)`` of ``1 - JS(m_h[a, :], m_g[a, :])``
  (Jensen-Shannon divergence in bits, so in [0, 1]), and the fraction of pairs whose query-mean similarity reaches a
  threshold. A proxy for head collapse only together with concentration: uniform heads agree perfectly (consensus 1)
  with concentration 0; collapsed heads agree with high concentration.
* **behavioural sinks**: key frames whose query-mean mass exceeds ``multiple`` times their uniform share.
* **RoPE distance** of a key frame: mean over query frames of ``position(a) - position(b)``, the positions RoPE gave
  them in the logged call (absolute frames unless the model re-ropes them).
* **step change**: between two steps of one chunk, the mean over query frames of the total variation
  ``1/2 sum_b |m_s[a, b] - m_s'[a, b]|`` (key frames aligned by absolute frame; one missing from a step counts 0).
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


def per_token_mean(mass: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """``mass [..., Fk]`` divided by each key frame's token count ``T_b``."""
    return np.asarray(mass, dtype=np.float64) / np.asarray(tokens, dtype=np.float64)


def class_share(mass: np.ndarray, classes: Sequence[str]) -> Dict[str, Optional[float]]:
    """``mass [Fq, Fk]`` -> per class ``S_c``, the query-mean mass on its frames (None: no frame of the class)."""
    m = np.asarray(mass, dtype=np.float64)
    out: Dict[str, Optional[float]] = {}
    for c in CLASSES:
        picked = [i for i, k in enumerate(classes) if k == c]
        out[c] = float(m[:, picked].sum(axis=-1).mean()) if picked else None
    return out


def uniform_share(classes: Sequence[str], tokens: Sequence[int]) -> Dict[str, Optional[float]]:
    """Per class ``U_c``, its share of the cached keys (None: no frame of the class)."""
    total = float(sum(tokens))
    return {c: (sum(t for k, t in zip(classes, tokens) if k == c) / total) if c in classes else None
            for c in CLASSES}


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)


def _distributions(mass: np.ndarray) -> np.ndarray:
    p = np.asarray(mass, dtype=np.float64)
    return p / np.clip(p.sum(axis=-1, keepdims=True), 1e-300, None)


def concentration(mass: np.ndarray) -> Optional[float]:
    """``mass [Fq, Fk]`` of one head -> ``1 - H / log2(Fk)``, mean over query frames (None when ``Fk`` is 1)."""
    p = _distributions(mass)
    if p.shape[-1] < 2:
        return None
    return float((1.0 - _entropy_bits(p) / np.log2(p.shape[-1])).mean())


def pair_similarity(mass: np.ndarray) -> np.ndarray:
    """``mass [heads, Fq, Fk]`` -> ``[pairs, Fq]``: ``1 - JS`` in bits of each pair of heads (a < b order)."""
    p = _distributions(mass)
    h = p.shape[0]
    sims = []
    for a in range(h):
        for b in range(a + 1, h):
            mid = (p[a] + p[b]) / 2
            js = _entropy_bits(mid) - (_entropy_bits(p[a]) + _entropy_bits(p[b])) / 2
            sims.append(1.0 - np.clip(js, 0.0, 1.0))
    return np.asarray(sims).reshape(len(sims), p.shape[1])


def head_consensus(mass: np.ndarray, threshold: float = 0.9) -> Dict[str, Optional[float]]:
    """``mass [heads, Fq, Fk]`` -> ``{"consensus", "pairs_above"}``: the mean pairwise similarity and the fraction
    of head pairs whose query-mean similarity is at least ``threshold`` (None with fewer than two heads)."""
    if np.asarray(mass).shape[0] < 2:
        return {"consensus": None, "pairs_above": None}
    sims = pair_similarity(mass)
    return {"consensus": float(sims.mean()), "pairs_above": float((sims.mean(axis=1) >= threshold).mean())}


def key_share(mass: np.ndarray) -> np.ndarray:
    """``mass [..., Fq, Fk]`` -> ``[..., Fk]``: each key frame's mean mass over the query frames."""
    return np.asarray(mass, dtype=np.float64).mean(axis=-2)


def behavioural_sinks(mass: np.ndarray, key_frames: Sequence[int], tokens: Sequence[int],
                      multiple: float = 2.0) -> List[int]:
    """The key frames (absolute) whose query-mean mass exceeds ``multiple`` times their uniform share."""
    share, total = key_share(mass), float(sum(tokens))
    return [int(f) for f, s, t in zip(key_frames, share, tokens) if s > multiple * t / total]


def rope_distance(query_frames: Sequence[int], key_frames: Sequence[int],
                  positions: Optional[Dict[int, int]] = None) -> List[float]:
    """Per key frame, the mean over the query frames of ``position(query) - position(key)`` (``positions``: the
    frame position RoPE gave a frame, where it is not the frame itself)."""
    pos = positions or {}
    q = float(np.mean([pos.get(f, f) for f in query_frames]))
    return [q - pos.get(f, f) for f in key_frames]


def step_change(previous: np.ndarray, previous_frames: Sequence[int], current: np.ndarray,
                current_frames: Sequence[int]) -> float:
    """Mean over query frames of the total variation between two steps' ``mass [Fq, Fk]`` of one chunk, key frames
    aligned by absolute frame (one missing from a step counts 0 there)."""
    frames = sorted(set(previous_frames) | set(current_frames))
    col = {f: i for i, f in enumerate(frames)}
    a = np.zeros((np.asarray(previous).shape[0], len(frames)))
    b = np.zeros_like(a)
    a[:, [col[f] for f in previous_frames]] = previous
    b[:, [col[f] for f in current_frames]] = current
    return float(0.5 * np.abs(b - a).sum(axis=-1).mean())
