"""The keyed store of a take: every recorded array under one :class:`~wan_capture.recording.keys.ArrayKey`.

Arrays are held for the whole batch (``[batch, ...]``), on the host. A take's text cross-attention maps are one
array per step and branch holding every recorded column (``plan.positions(branch)``, then one summed column per group
of ``plan.sums(branch)``), under the name :data:`ALL_COLUMNS`; a :class:`~wan_capture.recording.Recording` names
them by word. Causal chunks are the ``chunk`` field; the whole video's token maps are ``chunk=None``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..grid import Grid
from ..keys import ArrayKey

ALL_COLUMNS = ""  # the name of a take's cross-attention array: every recorded column


class ArrayStore:
    """Arrays by key, with what the keys alone do not say: each window's token ranges and frames, the absolute frame
    of each key frame a causal chunk attended to, and each chunk's grid."""

    def __init__(self):
        self.arrays: Dict[ArrayKey, torch.Tensor] = {}
        self.window_meta: Dict[ArrayKey, dict] = {}  # under the window's "scores" key
        self.key_frames: Dict[Tuple[Optional[int], int, int], Tuple[int, ...]] = {}  # (chunk, step, block)
        self.chunk_grids: Dict[int, Grid] = {}

    def put(self, key: ArrayKey, value: torch.Tensor) -> None:
        self.arrays[key] = value

    def keys(self, stat: Optional[str] = None, chunk=...) -> List[ArrayKey]:
        """Keys of one statistic (None: all), of one chunk (``...``: any)."""
        return [k for k in self.arrays if (stat is None or k.stat == stat) and (chunk is ... or k.chunk == chunk)]

    def steps(self) -> List[int]:
        return sorted({k.step for k in self.arrays})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays.values())

    def before(self, step: int) -> "ArrayStore":
        """The arrays of the steps before ``step`` (shared, not copied)."""
        out = ArrayStore()
        out.arrays = {k: v for k, v in self.arrays.items() if k.step < step}
        out.window_meta = {k: v for k, v in self.window_meta.items() if k.step < step}
        out.key_frames = {k: v for k, v in self.key_frames.items() if k[1] < step}
        out.chunk_grids = dict(self.chunk_grids)
        return out

    # -- the take's public dictionaries (``take.cross`` and friends), read from the keys ---------------------
    def cross(self, chunk: Optional[int] = None) -> Dict[Tuple[int, str], torch.Tensor]:
        return {(k.step, k.branch): v for k, v in self.arrays.items() if k.stat == "cross" and k.chunk == chunk}

    def stats(self, stat: str, chunk: Optional[int] = None) -> Dict[Tuple[int, str], Dict[str, torch.Tensor]]:
        out: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        for k in sorted(self.keys(stat, chunk), key=ArrayKey.order):
            out.setdefault((k.step, k.branch), {})[k.name] = self.arrays[k]
        return out

    def windows(self, chunk: Optional[int] = None) -> Dict[Tuple[int, int, str], dict]:
        return {(k.step, k.block, k.branch): {"scores": self.arrays[k], "probs": self.arrays[
                    ArrayKey("window", "probs", k.step, k.branch, k.block, k.chunk)], **meta}
                for k, meta in self.window_meta.items() if k.chunk == chunk}


class ChunkView:
    """One causal chunk of a take, read as a take of its own (``take.chunks[first_frame]``): its arrays, its grid
    and the absolute frame of each key frame it attended to, ``key_frames[(step, block)]``."""

    def __init__(self, store: ArrayStore, chunk: int, pool: int):
        self._store, self.chunk, self._pool = store, chunk, pool

    @property
    def grid(self) -> Grid:
        return self._store.chunk_grids[self.chunk]

    @property
    def map_grid(self) -> Grid:
        return self.grid.pooled(self._pool)

    @property
    def cross(self):
        return self._store.cross(self.chunk)

    @property
    def sink(self):
        return self._store.stats("sink", self.chunk)

    @property
    def image(self):
        return self._store.stats("image", self.chunk)

    @property
    def windows(self):
        return self._store.windows(self.chunk)

    @property
    def key_frames(self) -> Dict[Tuple[int, int], Tuple[int, ...]]:
        return {(s, b): v for (c, s, b), v in self._store.key_frames.items() if c == self.chunk}

    @property
    def steps(self) -> List[int]:
        return sorted({k.step for k in self._store.keys(chunk=self.chunk)})
