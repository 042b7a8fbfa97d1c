"""Causal Wan by hand: for a KV-cache model that :func:`wan_capture.record` does not know, call
:meth:`CausalRecorder.tap` from its self-attention. It goes through the same call tracker, :meth:`Recorder.tap` and
take as every other host (every plan field applies; the take saves, reads and draws like any other)::

    rec = CausalRecorder(plan, frame_tokens)
    with rec.recording():
        ...  # in the model's self-attention:
        out = rec.tap(block_index, q, k, lambda: attention(q, k, v), query_start=current_start,
                      key_frames=cached_frame_ids + current_frame_ids, step=step)
    take = rec.take
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch

from ..capture.call import SELF
from ..grid import Grid
from ..model_info import CAUSAL, ModelInfo
from ..plan import RecordingPlan
from ..capture.recorder import Recorder, Take
from ..stats.statistics import KeyLayout
from ..capture.tracker import CallTracker, Evaluation


class CausalRecorder:
    """Manual taps for causal Wan: statistics of the current chunk against cached + current keys."""

    def __init__(self, plan: RecordingPlan, frame_tokens: int, frame_width: Optional[int] = None):
        if frame_tokens < 1:
            raise ValueError(f"frame_tokens must be >= 1, got {frame_tokens}")
        self.plan, self.frame_tokens = plan, frame_tokens
        self.frame_width = frame_width or frame_tokens  # a frame's token grid is 1 x frame_tokens unless given
        self.recorder = Recorder(plan)
        self._tracker: Optional[CallTracker] = None
        self._previous: dict = {}  # (block, branch) -> key frames of its previous call (what was evicted since)

    @contextmanager
    def recording(self, num_blocks: int = 1, num_heads: int = 1, head_dim: int = 128):
        """One generation: the take is complete when the block ends, partial on an exception."""
        info = ModelInfo("causal-wan", "manual", num_blocks, num_heads, head_dim, num_heads * head_dim, (1, 2, 2),
                         (4, 8, 8), variant=CAUSAL)
        self._tracker = CallTracker(self.recorder, info, (SELF,))
        self.recorder.begin_pass(None, info)
        try:
            yield self
        except BaseException as e:
            self.recorder.end_pass(error=e)
            raise
        else:
            self.recorder.end_pass()
        finally:
            self._tracker = None

    @property
    def take(self) -> Optional[Take]:
        return self.recorder.latest

    def tap(self, block: int, q: torch.Tensor, k: torch.Tensor, attend: Callable[[], torch.Tensor], *,
            query_start: int, key_frames: Sequence[int], step: int = 0, branch: str = "cond",
            mask: Optional[str] = None, scale: Optional[float] = None, sink_frames: Sequence[int] = (),
            pinned_frames: Sequence[int] = (), step_pass: str = "denoise") -> torch.Tensor:
        """``q [B, Lq, H, D]`` (first query at absolute token ``query_start``), ``k [B, Lk, H, D]`` in cache order,
        ``key_frames`` the absolute frame of each cached frame; returns ``attend()`` unchanged.

        Each call is logged in the take's KV-cache log as the caller describes it (``key_frames``, ``sink_frames``:
        the cached frames the model keeps as sinks, ``pinned_frames``: those it pins beside them, ``step_pass``:
        ``denoise`` or ``context``); what was evicted is worked out from the block's previous call in that branch.
        Unlike ``record()`` on a known model, nothing checks that the keys are the frames said."""
        if self._tracker is None:
            raise RuntimeError("CausalRecorder.tap outside `with rec.recording():`")
        ft = self.frame_tokens
        lq, lk = q.shape[1], k.shape[1]
        if lk != len(key_frames) * ft or lq % ft or query_start % ft:
            raise ValueError(f"the cache must hold whole frames: {lk} keys for {len(key_frames)} frames of {ft} "
                             f"tokens, {lq} queries starting at token {query_start}")
        if mask not in (None, "frame"):
            raise ValueError(f"mask must be None or 'frame', got {mask!r}")
        b, _, h, d = q.shape
        t = self._tracker
        if (h, d) != (t.info.num_heads, t.info.head_dim) or block >= t.info.num_blocks:
            raise ValueError(f"block {block} with {h} heads of {d}: recording() was told {t.info.num_blocks} blocks "
                             f"of {t.info.num_heads} heads of {t.info.head_dim}")
        grid = Grid(lq // ft, ft // self.frame_width, self.frame_width)
        take = self.recorder.active
        take.log.dynamic_steps.setdefault(float(step), int(step))
        take.step_pass.setdefault(int(step), step_pass)
        before = self._previous.get((block, branch), ())
        self._previous[(block, branch)] = tuple(key_frames)
        chunk = query_start // ft
        take.log_kv({"block": block, "chunk": chunk, "step": int(step), "pass": step_pass, "branch": branch,
                     "key_frames": [int(f) for f in key_frames], "writers": ["caller"] * len(key_frames),
                     "evicted": sorted(f for f in set(before) if f not in set(key_frames) and 0 <= f < chunk),
                     "sink_frames": [int(f) for f in sink_frames], "pinned_frames": [int(f) for f in pinned_frames],
                     "unknown_key_frames": 0})
        t.begin_evaluation(Evaluation(int(step), True, float("nan"), None, (branch,) * b, grid, query_start // ft))
        t.enter_block(block, (SELF,))
        layout = KeyLayout(lk - lq, mask, ft, tuple(key_frames))
        try:
            return t.tap(q.reshape(b, lq, h * d), k.reshape(b, lk, h * d), h, attend, layout=layout, scale=scale)
        finally:
            t.end_evaluation()
