"""Which absolute latent frames a causal Wan's KV cache holds, observed from the cache's content.

Causal Wan (Self-Forcing, CausVid) keeps a rolling cache of keys per block: sink frames pinned at the front, a local
window, then the chunk being generated; older frames are evicted by shifting the cache. Rather than re-implementing
that bookkeeping (and inheriting its bugs), :class:`KVCacheObserver` identifies every cached frame by a content
signature of its keys: the chunk's own keys are the last ones the model attends to, so each frame is registered when
it is written, and later found again wherever the model moved it. A frame that matches nothing is reported as
``-1`` (unknown keys: a cache the model filled in a way the log cannot explain).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}
_PRIME = 2_147_483_647  # 2^31 - 1: token signatures are reduced mod this before frames combine them


class KVCacheObserver:
    """Absolute frames of a causal self-attention's keys, per block, and the KV-cache event log."""

    def __init__(self, seed: int = 0x5EED):
        self._seed = seed
        self._weights: Dict[Tuple[int, str], torch.Tensor] = {}
        self.frames: Dict[int, Dict[int, Tuple[int, str]]] = {}  # block -> signature -> (frame, who wrote it)
        self.signature_of: Dict[int, Dict[int, int]] = {}  # block -> frame -> its current signature
        self.previous: Dict[int, Tuple[int, ...]] = {}  # block -> key frames at its previous call

    def _w(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (n, str(device))
        w = self._weights.get(key)
        if w is None:
            g = torch.Generator().manual_seed(self._seed + n)
            # small weights: int16/int32 values x weights summed over n stay inside int64
            w = torch.randint(1, 1 << 15, (n,), generator=g, dtype=torch.int64).to(device)
            self._weights[key] = w
        return w

    def frame_signatures(self, k_row: torch.Tensor, frame_tokens: int) -> List[int]:
        """One integer per frame of ``k_row [L, ...]`` (L a multiple of ``frame_tokens``): equal bytes, equal value."""
        flat = k_row.reshape(k_row.shape[0], -1).contiguous()
        ints = flat.view(_INT_VIEW[flat.dtype]).to(torch.int64) if flat.dtype in _INT_VIEW else flat.to(torch.int64)
        per_token = (ints * self._w(ints.shape[1], ints.device, ints.dtype)).sum(dim=1) % _PRIME
        per_frame = per_token.view(-1, frame_tokens) * self._w(frame_tokens, ints.device, ints.dtype)[None, :]
        return per_frame.sum(dim=1).tolist()

    def observe(self, block: int, k: torch.Tensor, queries: int, query_start: int, frame_tokens: int,
                writer: str, sink_size: int = 0) -> Tuple[Tuple[int, ...], dict]:
        """Key frames of one call and its log entry.

        ``k [B, Lk, ...]``: the keys attended to, in cache order, the current chunk's ``queries`` tokens last (they
        start at absolute token ``query_start``); ``writer`` labels what wrote the chunk's keys (``"step 2"``,
        ``"context"``); ``sink_size``: frames the model pins at the front of its cache.
        """
        lk = k.shape[1]
        if lk % frame_tokens or queries % frame_tokens or query_start % frame_tokens or queries > lk:
            raise ValueError(f"the KV cache must hold whole frames: {lk} keys, {queries} queries starting at token "
                             f"{query_start}, {frame_tokens} tokens per frame")
        sigs = self.frame_signatures(k[0].detach(), frame_tokens)
        n_new = queries // frame_tokens
        first = query_start // frame_tokens
        table = self.frames.setdefault(block, {})
        current = self.signature_of.setdefault(block, {})
        cached = [table.get(s, (-1, "unknown")) for s in sigs[:len(sigs) - n_new]]
        for i, s in enumerate(sigs[len(sigs) - n_new:]):
            frame = first + i
            old = current.get(frame)
            if old is not None and table.get(old, (None,))[0] == frame:
                del table[old]  # the frame's earlier keys are gone from the cache: forget their signature
            table[s] = (frame, writer)
            current[frame] = s
        key_frames = tuple(f for f, _ in cached) + tuple(range(first, first + n_new))
        writers = [w for _, w in cached] + [writer] * n_new
        before = self.previous.get(block, ())
        self.previous[block] = key_frames
        now = set(key_frames)
        event = {
            "block": block, "chunk": first, "key_frames": list(key_frames), "writers": writers,
            "evicted": sorted(f for f in set(before) if f not in now and 0 <= f < first),
            "sink_frames": [f for f in key_frames[:min(sink_size, len(cached))]],
            "unknown_key_frames": sum(1 for f, _ in cached if f < 0),
        }
        return key_frames, event


def cache_anomaly(key_frames: Tuple[int, ...], chunk: int) -> Optional[str]:
    """None when the cache is in the order causal Wan keeps it (ascending, all older than the chunk), else why not."""
    past = [f for f in key_frames if f < chunk]
    if any(f < 0 for f in key_frames):
        return "keys of unknown origin in the cache"
    if past != sorted(past):
        return f"cached frames out of order: {list(past)}"
    return None
