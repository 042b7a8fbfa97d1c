"""Causal Wan with a KV cache (Self-Forcing, CausVid style): the current chunk's queries against cached + current
keys, recorded chunk by chunk with key positions in absolute latent frames.

The cache is whole frames in absolute order (sink frames kept at the front, then a local window, then the current
chunk), so causality in cache order is causality in time: with ``mask="frame"`` a query sees the keys of its own and
earlier frames; with ``mask=None`` (cached inference) every cached key. Call :meth:`CausalRecorder.tap` from the
model's self-attention, e.g. in ``CausalWanSelfAttention.forward``::

    out = rec.tap(block_index, q, k, lambda: attention(q, k, v), query_start=current_start,
                  key_frames=cached_frame_ids + current_frame_ids, step=step)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..plan import RecordingPlan
from ..stats import KeyLayout, default_scale, sink_statistics

STATS = ("received", "key_max", "frame_mass", "entropy")


class CausalRecorder:
    """``chunks[(step, block, first_query_frame, branch)]``: per batch row and head ``received``/``key_max``
    ``[B, H, keys]``, ``frame_mass`` ``[B, H, Fq, Fk]``, ``entropy`` ``[B, H, Fq]``, and ``query_frames`` /
    ``key_frames`` (absolute latent frame of each query/key frame) and ``key_positions`` (absolute token of each key).
    """

    def __init__(self, plan: RecordingPlan, frame_tokens: int):
        if frame_tokens < 1:
            raise ValueError(f"frame_tokens must be >= 1, got {frame_tokens}")
        self.plan, self.frame_tokens = plan, frame_tokens
        self.chunks: Dict[Tuple[int, int, int, str], dict] = {}

    def tap(self, block: int, q: torch.Tensor, k: torch.Tensor, attend: Callable[[], torch.Tensor], *,
            query_start: int, key_frames: Sequence[int], step: int = 0, branch: str = "cond",
            mask: Optional[str] = None, scale: Optional[float] = None) -> torch.Tensor:
        """``q [B, Lq, H, D]`` (first query at absolute token ``query_start``), ``k [B, Lk, H, D]`` in cache order,
        ``key_frames`` the absolute frame of each cached frame; returns ``attend()`` unchanged."""
        out = attend()
        p, ft = self.plan, self.frame_tokens
        if not (p.wants_step(step) and p.wants_block(block) and branch in p.branch_names()):
            return out
        lq, lk = q.shape[1], k.shape[1]
        if lk != len(key_frames) * ft or lq % ft or query_start % ft:
            raise ValueError(f"the cache must hold whole frames: {lk} keys for {len(key_frames)} frames of {ft} "
                             f"tokens, {lq} queries starting at token {query_start}")
        if mask not in (None, "frame"):
            raise ValueError(f"mask must be None or 'frame', got {mask!r}")
        heads = p.selected_heads(q.shape[2])
        with torch.no_grad():
            qh = q.detach().transpose(1, 2)[:, list(heads)]
            kh = k.detach().transpose(1, 2)[:, list(heads)]
            layout = KeyLayout(lk - lq, mask, ft)  # the current chunk is the end of the cache
            st = sink_statistics(qh, kh, scale or default_scale(q.shape[-1]), ft, p.chunk_budget_bytes, layout)
            rec = {name: getattr(st, name) for name in STATS}
            if not p.store_per_head:
                rec = {n: (v.amax(1, keepdim=True) if n == "key_max" else v.mean(1, keepdim=True)) for n, v in rec.items()}
            rec = {n: v.to("cpu", p.torch_dtype) for n, v in rec.items()}
        q0 = query_start // ft
        rec.update(query_frames=list(range(q0, q0 + math.ceil(lq / ft))), key_frames=[int(f) for f in key_frames],
                   key_positions=[f * ft + i for f in key_frames for i in range(ft)], heads=list(heads))
        self.chunks[(step, block, q0, branch)] = rec
        return out
