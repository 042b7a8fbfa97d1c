"""The tap: receives each attention call, returns the original output unchanged, and records statistics.

A :class:`Recorder` holds a :class:`RecordingPlan` and a short history of :class:`Take` objects. A take is one
generation's recording: one sampling pass, or several passes chained when a pass starts where the previous one
stopped (KSamplerAdvanced's start/end steps, Wan 2.2 A14B's two experts). Each take is found again by the
fingerprint of the latent its last pass produced, so a node downstream of a sampler always reads the recording of
exactly that sampler output, whatever ComfyUI cached or re-ran.

Recorded arrays (host memory, ``plan.storage_dtype`` except windows, which stay float32):

* ``take.cross[(step, branch)]``: ``[batch, blocks', heads', spatial', T]`` text cross-attention probabilities of
  the tracked positions ``plan.positions(branch)`` (the negative prompt's for uncond), then one summed column per
  group of ``plan.sums(branch)`` (T in all); ``blocks'`` is ``take.blocks`` or 1 (mean over blocks
  when ``store_per_block`` is off), ``heads'`` is ``take.heads`` or 1 (mean), ``spatial'`` the latent tokens after
  ``spatial_downsample_factor`` pooling (``take.map_grid``).
* ``take.sink[(step, branch)][name]`` with name in ``received``/``key_max`` ``[batch, blocks', heads', keys]``,
  ``frame_mass`` ``[batch, blocks', heads', Fq, Fk]``, ``entropy`` ``[batch, blocks', heads', Fq]``; aggregation over
  blocks/heads is the mean, except ``key_max`` which takes the max.
* ``take.image[(step, branch)][name]`` (i2v with ``record_image_context``): ``share`` ``[batch, blocks', heads',
  tokens]``, the image tokens' share of each query's attention were image and text keys one softmax, and
  ``received`` ``[batch, blocks', heads', image tokens]``.
* ``take.windows[(step, block, branch)]``: dict with ``scores`` and ``probs`` ``[batch, heads, nq, nk]`` float32 and the
  token ranges ``q_range``/``k_range`` (and ``q_frames``/``k_frames``, absolute latent frames of its rows/columns).

Causal Wan (a KV cache, chunks of frames): the take is one generation and ``take.chunks[first_query_frame]`` holds
each chunk's own recording with the arrays above (its ``grid`` is the chunk's frames; its self-attention keys are the
keys the chunk attended to, cached and current, whose absolute latent frames are ``chunk.key_frames[(step, block)]``).
The chunks' cross-attention maps are also assembled along time into ``take.cross`` over the whole video, so token
maps read the same as a bidirectional take's. ``take.kv_events`` is the KV-cache log (one entry per chunk, step and
block: the absolute frames in the cache, the evicted ones, the sink frames); ``take.step_pass[step]`` is
``"denoise"`` or ``"context"`` (the clean-frame pass that refills the cache).
"""
from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..stats import statistics as _stats
from .call import CROSS_IMAGE, CROSS_TEXT, SELF, AttentionCall
from ..grid import Grid, pool_spatial
from ..model_info import ModelInfo
from ..plan import PlanError, RecordingPlan
from .steps import continues, step_of
from .time_layout import TimeLayout

SINK_NAMES = ("received", "key_max", "frame_mass", "entropy")
IMAGE_NAMES = ("share", "received")  # image-context statistics (i2v): per query, per image token
IMAGE_TOKENS = 257  # CLIP-vision tokens of Wan i2v (1 class + 16 x 16 patches): sizes the budget before the call
_take_ids = itertools.count(1)


class BudgetError(MemoryError):
    """Recording would exceed the plan's memory budget; raised before anything is allocated."""


def fingerprint(latent: torch.Tensor) -> str:
    """Content hash of a latent tensor: identifies which sampler output a take belongs to."""
    t = latent.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha1(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _to_host(t: torch.Tensor) -> torch.Tensor:
    # Pinned, non-blocking copies let sampling run on; the take synchronises once when the pass ends.
    if t.device.type == "cuda":
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)
    return t.detach().to("cpu", copy=True)


def _select(x: torch.Tensor, dim: int, index: Sequence[int]) -> torch.Tensor:
    """``x`` indexed along ``dim``: a view when the indices are a contiguous run (cond/uncond chunks, all heads)."""
    index = list(index)
    if index == list(range(index[0], index[0] + len(index))):
        return x.narrow(dim, index[0], len(index))
    return x.index_select(dim, torch.as_tensor(index, device=x.device))


class _Slot:
    """One statistic of one (step, branch) gathered across blocks: kept per block, or reduced on the fly."""

    def __init__(self, per_block: bool, reduce: str, dtype: torch.dtype):
        self.per_block, self.reduce, self.dtype = per_block, reduce, dtype
        self.blocks: Dict[int, torch.Tensor] = {}
        self.acc: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, block: int, value: torch.Tensor) -> None:
        if self.per_block:
            self.blocks[block] = _to_host(value.to(self.dtype))
        elif self.acc is None:
            self.acc, self.count = value.float().clone(), 1
        else:
            self.acc = torch.maximum(self.acc, value) if self.reduce == "max" else self.acc.add_(value)
            self.count += 1

    def nbytes(self) -> int:
        held = list(self.blocks.values()) + ([self.acc] if self.acc is not None else [])
        return sum(t.numel() * t.element_size() for t in held)

    def flush(self) -> None:
        """Move a running reduction to the host (called once its step is over)."""
        if self.acc is not None and self.acc.device.type != "cpu":
            self.acc = _to_host(self.acc)

    def result(self) -> torch.Tensor:
        if self.per_block:
            return torch.stack([self.blocks[b] for b in sorted(self.blocks)], dim=1)
        acc = self.acc.cpu() if self.reduce == "max" else self.acc.cpu() / self.count
        return acc.to(self.dtype).unsqueeze(1)


class Take:
    """One generation's recording. See the module docstring for the arrays it holds."""

    def __init__(self, plan: RecordingPlan, model, parent: Optional["Take"] = None):
        self.id = next(_take_ids) if parent is None else parent.id
        self.plan = plan
        self.info: Optional[ModelInfo] = model if isinstance(model, ModelInfo) else None
        self.model = model.as_dict() if isinstance(model, ModelInfo) else dict(model)
        self.parent = parent
        self._recorder: Optional["Recorder"] = None  # set by the recorder that keeps this take
        self.status = "recording"  # then "complete", or "partial" when a pass failed or was interrupted
        self.error: Optional[str] = None
        self.grid: Optional[Grid] = None
        self.text_len: Optional[int] = None
        self.batch: Optional[int] = None  # rows per branch: one per video
        self.passes: List[Tuple[int, List[float]]] = []  # (first global step, the pass's sigmas)
        self.pass_weights: List[Optional[int]] = []  # identity of each pass's model weights (experts differ)
        self.sampling: dict = {}  # seed, cfg... of the first pass, as the sampler reported them
        self.step_sigmas: Dict[int, float] = {}
        self.step_timesteps: Dict[int, Optional[float]] = {}
        self.cross: Dict[Tuple[int, str], torch.Tensor] = {}
        self.sink: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        self.windows: Dict[Tuple[int, int, str], dict] = {}
        self.image: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        self.time_layout = TimeLayout()  # latent frames that are references or context, not video frames
        # the first of a block's image and text calls: (kind, lse), until the other one
        self._context_lse: Dict[Tuple[int, int, str], Tuple[str, torch.Tensor]] = {}
        self.skipped: Counter = Counter()
        self.input_fingerprint: Optional[str] = None
        self.output_fingerprint: Optional[str] = None
        self.pass_outputs: List[Optional[str]] = []  # the latent each finished pass produced
        self.reserved_bytes = 0
        self._slots: Dict[tuple, _Slot] = {}
        self._seen: set = set()
        self._budget_checked = False
        self._open_step: Optional[int] = None
        self._dynamic = False  # a pass begun without a schedule numbers its steps by first appearance
        self._dynamic_steps: Dict[float, int] = {}
        # causal Wan
        self.chunks: Dict[int, Take] = {}
        self.key_frames: Dict[Tuple[int, int], Tuple[int, ...]] = {}  # (step, block) -> absolute frame per key frame
        self.kv_events: List[dict] = []
        self.step_pass: Dict[int, str] = {}
        self._chunk_steps: set = set()

    @property
    def causal(self) -> bool:
        """True for a recording of causal Wan: its data lives in :attr:`chunks`."""
        return bool(self.chunks)

    def log_kv(self, event: dict) -> None:
        """Append a KV-cache event (see the module docstring)."""
        self.kv_events.append(dict(event))

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(len(s) - 1 for _, s in self.passes) + len(self._dynamic_steps)

    @property
    def blocks(self) -> Tuple[int, ...]:
        """Block indices along the blocks axis (``(-1,)`` means the mean/max over all selected blocks)."""
        if not self.plan.store_per_block:
            return (-1,)
        return self.plan.selected_blocks(self.model["num_blocks"])

    @property
    def heads(self) -> Tuple[int, ...]:
        if not self.plan.store_per_head:
            return (-1,)
        return self.plan.selected_heads(self.model["num_heads"])

    @property
    def map_grid(self) -> Optional[Grid]:
        return None if self.grid is None else self.grid.pooled(self.plan.spatial_downsample_factor)

    @property
    def steps(self) -> List[int]:
        keys = ({s for s, _ in self.cross} | {s for s, _ in self.sink} | {s for s, _, _ in self.windows}
                | {s for s, _ in self.image})
        for chunk in self.chunks.values():
            keys |= set(chunk.steps)
        return sorted(keys)

    def window_ranges(self, grid: Grid, layout: Optional[_stats.KeyLayout] = None, keys: Optional[int] = None,
                      chunk: Optional[int] = None):
        """Query and key token ranges of the plan's window in this call, or None when the call holds none of it.

        Bidirectional: frames of the latent grid. Causal (``chunk`` set): the chunk's queries of the window's query
        frames, and the cached keys whose absolute frames lie in the window's key frames.
        """
        if chunk is None:
            return self._window_ranges(grid)
        w, ft = self.plan.window, grid.frame_tokens
        q_lo, q_hi = max(w.q_start, chunk), min(w.q_stop, chunk + grid.frames)
        if q_lo >= q_hi:
            return None
        frames = layout.absolute_key_frames(keys)
        k_stop = float("inf") if w.k_stop is None else w.k_stop
        picked = [i for i, f in enumerate(frames) if w.k_start <= f < k_stop]
        if not picked:
            return None
        # cache order is absolute order (sinks, window, chunk): the picked frames form one run; take its cover
        k0, k1 = picked[0], picked[-1] + 1
        return ((q_lo - chunk) * ft, (q_hi - chunk) * ft), (k0 * ft, min(k1 * ft, keys))

    def _window_ranges(self, grid: Grid) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        w, ft = self.plan.window, grid.frame_tokens
        if w.q_start >= grid.frames or w.k_start >= grid.frames:
            raise PlanError(f"RecordingPlan.window: frames start at q={w.q_start}, k={w.k_start} but the latent has "
                            f"only {grid.frames} frames (0..{grid.frames - 1})")
        q_stop = min(w.q_stop, grid.frames)
        k_stop = grid.frames if w.k_stop is None else min(w.k_stop, grid.frames)
        return (w.q_start * ft, q_stop * ft), (w.k_start * ft, k_stop * ft)

    # -- budget ---------------------------------------------------------------------------------------
    def bytes_per_step(self, grid: Grid, batch: int, keys: Optional[int] = None) -> int:
        """Host bytes one recorded step takes (``keys``: self-attention keys, the grid's tokens unless cached)."""
        p = self.plan
        keys = grid.tokens if keys is None else keys
        key_frames = -(-keys // grid.frame_tokens)
        size = 2 if p.storage_dtype == "float16" else 4
        rows = batch * len(p.branch_names())
        nb = len(p.selected_blocks(self.model["num_blocks"]))
        nh = len(p.selected_heads(self.model["num_heads"]))
        sb, sh = (nb if p.store_per_block else 1), (nh if p.store_per_head else 1)
        total = 0
        if p.record_cross:
            positions = sum(len(p.positions(b)) + len(p.sums(b)) for b in p.branch_names())
            total += batch * sb * sh * grid.pooled(p.spatial_downsample_factor).tokens * positions * size
        if p.record_image_context:
            total += rows * sb * sh * (grid.tokens + IMAGE_TOKENS) * size
        if p.record_sink_stats:
            total += rows * sb * sh * (2 * keys + grid.frames * key_frames + grid.frames) * size
        if p.window is not None:
            if self.parent is None:
                (q0, q1), (k0, k1) = self._window_ranges(grid)
            else:  # causal: at most the chunk's queries against every cached key
                (q0, q1), (k0, k1) = (0, grid.tokens), (0, keys)
            total += nb * _stats.window_bytes(rows, nh, q1 - q0, k1 - k0)
        return total

    def _check_budget(self, grid: Grid, batch: int) -> None:
        offset, sigmas = self.passes[-1]
        steps = [s for s in range(offset, offset + max(1, len(sigmas) - 1)) if self.plan.wants_step(s)]
        self._reserve(self.bytes_per_step(grid, batch) * len(steps), len(steps), grid, batch)

    def truncated(self, passes: int) -> "Take":
        """A new take holding this one's first ``passes`` passes (arrays shared, not copied): where a later pass is
        sampled again from the same latent (a re-queued graph whose first expert ComfyUI took from its cache)."""
        t = Take(self.plan, self.info or self.model)
        t._recorder = self._recorder
        boundary = self.passes[passes][0] if passes < len(self.passes) else self.total_steps
        t.passes = [(offset, list(sig)) for offset, sig in self.passes[:passes]]
        t.pass_weights = list(self.pass_weights[:passes])
        t.pass_outputs = list(self.pass_outputs[:passes])
        t.cross = {k: v for k, v in self.cross.items() if k[0] < boundary}
        t.sink = {k: v for k, v in self.sink.items() if k[0] < boundary}
        t.windows = {k: v for k, v in self.windows.items() if k[0] < boundary}
        t.image = {k: v for k, v in self.image.items() if k[0] < boundary}
        t.step_sigmas = {k: v for k, v in self.step_sigmas.items() if k < boundary}
        t.step_timesteps = {k: v for k, v in self.step_timesteps.items() if k < boundary}
        t.grid, t.text_len, t.batch, t.sampling = self.grid, self.text_len, self.batch, dict(self.sampling)
        t.time_layout = self.time_layout
        t.input_fingerprint, t.output_fingerprint = self.input_fingerprint, t.pass_outputs[-1]
        t.status = "complete"
        t.reserved_bytes = t.nbytes()
        return t

    def nbytes(self) -> int:
        """Host bytes the take's recorded arrays hold now."""
        total = sum(t.numel() * t.element_size() for t in self.cross.values())
        total += sum(t.numel() * t.element_size() for st in (*self.sink.values(), *self.image.values())
                     for t in st.values())
        total += sum(w["scores"].numel() * 4 * 2 for w in self.windows.values())
        total += sum(slot.nbytes() for slot in self._slots.values())
        return total + sum(c.nbytes() for c in self.chunks.values())

    def _reserve(self, need: int, steps: int, grid: Grid, batch: int) -> None:
        budget = self.plan.memory_budget_bytes
        if self._recorder is not None:  # older recordings count too: release the oldest to make room
            self._recorder.make_room(self, self.reserved_bytes + need)
        if self.reserved_bytes + need > budget:
            mib = 1024 * 1024
            raise BudgetError(
                f"recording {steps} steps on a {grid.as_list()} latent grid (batch {batch}) needs "
                f"{need / mib:.1f} MiB of host memory{' more' if self.reserved_bytes else ''}, over the "
                f"memory_budget_mb of {budget / mib:.1f} MiB (already reserved {self.reserved_bytes / mib:.1f} MiB). "
                "Raise memory_budget_mb, or record less: fewer steps (storage_interval), blocks or heads, "
                "store_per_block/store_per_head off, a larger spatial_downsample_factor, or a smaller window.")
        self.reserved_bytes += need

    # -- recording -----------------------------------------------------------------------------------
    def _slot(self, key: tuple, reduce: str = "mean") -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(self.plan.store_per_block, reduce, self.plan.torch_dtype)
        return slot

    def _advance(self, step: int) -> None:
        if self._open_step is not None and step != self._open_step:
            for key, slot in self._slots.items():
                if key[1] == self._open_step:
                    slot.flush()
        self._open_step = step

    def record(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor,
               lse: Optional[torch.Tensor] = None) -> None:
        """Statistics of one attention call (``lse``: each query's log-sum-exp ``[B, heads, Lq]`` when the model's
        attention kernel returned it)."""
        p = self.plan
        if call.chunk is not None and self.parent is None:
            self._record_chunk(call, q, k, lse)
            return
        if self.grid is None:
            self.grid = call.grid
        elif call.grid != self.grid:
            raise ValueError(f"latent grid changed within one recording: {self.grid.as_list()} -> {call.grid.as_list()}")
        names = p.branch_names()
        branch_rows = {b: [i for i, r in enumerate(call.branches) if r == b] for b in names}
        batch = max(len(r) for r in branch_rows.values())
        if batch == 0:
            return
        if self.batch is None:
            self.batch = batch
        if self.parent is not None:
            # causal: each chunk's step is sized when it starts (the cache length is known only then)
            if (call.chunk, call.step) not in self.parent._chunk_steps:
                need = self.bytes_per_step(call.grid, batch, keys=k.shape[1] if call.kind == SELF else None)
                self.parent._reserve(need, 1, call.grid, batch)
                self.parent._chunk_steps.add((call.chunk, call.step))
        elif not self._budget_checked:
            self._check_budget(call.grid, self.batch)
            self._budget_checked = True
        self._advance(call.step)
        self.step_sigmas[call.step] = call.sigma
        self.step_timesteps[call.step] = call.timestep
        heads = p.selected_heads(call.heads)
        head_dim = q.shape[-1] // call.heads
        scale = call.scale if call.scale is not None else _stats.default_scale(head_dim)
        qh = _select(_stats.split_heads(q, call.heads), 1, heads)
        kh = _select(_stats.split_heads(k, call.heads), 1, heads)
        lh = None if lse is None else _select(lse, 1, heads)
        chunk = p.chunk_budget_bytes
        for branch, rows in branch_rows.items():
            if not rows:
                continue
            qb, kb = _select(qh, 0, rows), _select(kh, 0, rows)
            if call.kind == CROSS_TEXT:
                self.text_len = k.shape[1]
                if p.record_cross:
                    self._record_cross(call, branch, qb, kb, scale, chunk)
                if p.record_image_context:
                    self._record_image_share(call, branch, qb, kb, scale, chunk)
            elif call.kind == CROSS_IMAGE:
                self._record_image(call, branch, qb, kb, scale, chunk)
            elif call.kind == SELF:
                self._record_self(call, branch, qb, kb, scale, chunk, None if lh is None else _select(lh, 0, rows))

    def _record_chunk(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, lse=None) -> None:
        sub = self.chunks.get(call.chunk)
        if sub is None:
            sub = self.chunks[call.chunk] = Take(self.plan, self.info or self.model, parent=self)
            sub.status = self.status
        self.step_sigmas[call.step] = call.sigma
        self.step_timesteps[call.step] = call.timestep
        sub.record(call, q, k, lse)
        if self.batch is None:
            self.batch = sub.batch
        if call.kind == CROSS_TEXT and self.text_len is None:
            self.text_len = sub.text_len

    def _record_cross(self, call, branch, qb, kb, scale, chunk) -> None:
        p = self.plan
        if qb.shape[2] != call.grid.tokens:
            self.skipped["cross_text_tokens_differ_from_grid"] += 1
            return
        maps = _stats.cross_attention_probs(qb, kb, p.positions(branch), scale, chunk, call.layout)
        if p.sums(branch):  # summed groups (padding): one column each, after the positions'
            maps = torch.cat([maps, _stats.cross_attention_mass(qb, kb, p.sums(branch), scale, chunk, call.layout)], -1)
        maps = pool_spatial(self._heads_reduced(maps), call.grid, p.spatial_downsample_factor)
        self._slot(("cross", call.step, branch)).add(call.block, maps)

    def _heads_reduced(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.plan.store_per_head else value.mean(dim=1, keepdim=True)

    def _record_image(self, call, branch, qb, kb, scale, chunk) -> None:
        """Image cross-attention (i2v): each image token's attention received, and the image share once the block's
        text call is seen too (before or after this one)."""
        if qb.shape[2] != call.grid.tokens:
            self.skipped["image_tokens_differ_from_grid"] += 1
            return
        lse, received = _stats.context_statistics(qb, kb, scale, chunk)
        self._pair_context(call, branch, CROSS_IMAGE, lse)
        self._slot(("image", call.step, branch, "received")).add(call.block, self._heads_reduced(received))

    def _record_image_share(self, call, branch, qb, kb, scale, chunk) -> None:
        """The text call's side of the image share (i2v models only: a t2v model has no image call to pair with)."""
        if self.model.get("cross_attention") != "i2v":
            self.skipped["text_calls_without_image_context"] += 1
            return
        lse_txt, _ = _stats.context_statistics(qb, kb, scale, chunk)
        self._pair_context(call, branch, CROSS_TEXT, lse_txt)

    def _pair_context(self, call, branch: str, kind: str, lse: torch.Tensor) -> None:
        """The image tokens' share of each query's attention, were image and text keys one softmax:
        ``sigmoid(lse_image - lse_text)`` (Wan attends to them in two softmaxes and adds the outputs). A host may call
        the image and the text attention of a block in either order: the first one's lse waits for the second."""
        key = (call.step, call.block, branch)
        other = self._context_lse.pop(key, None)
        if other is None or other[0] == kind:
            self._context_lse[key] = (kind, lse)
            return
        lse_img, lse_txt = (lse, other[1]) if kind == CROSS_IMAGE else (other[1], lse)
        share = torch.sigmoid(lse_img - lse_txt)
        self._slot(("image", call.step, branch, "share")).add(call.block, self._heads_reduced(share))

    def _record_self(self, call, branch, qb, kb, scale, chunk, lse=None) -> None:
        p = self.plan
        layout = call.layout.with_frame_tokens(call.grid.frame_tokens)
        if call.chunk is not None:
            self.key_frames[(call.step, call.block)] = layout.absolute_key_frames(kb.shape[2])
        if p.record_sink_stats:
            st = _stats.sink_statistics(qb, kb, scale, layout.frame_tokens, chunk, layout, lse=lse)
            for name in SINK_NAMES:
                value = getattr(st, name)
                reduce = "max" if name == "key_max" else "mean"
                if not p.store_per_head:
                    value = value.amax(dim=1, keepdim=True) if reduce == "max" else value.mean(dim=1, keepdim=True)
                self._slot(("sink", call.step, branch, name), reduce).add(call.block, value)
        if p.window is not None:
            ranges = self.window_ranges(call.grid, layout, kb.shape[2], call.chunk)
            if ranges is None:
                return
            q_range, k_range = ranges
            scores, probs = _stats.score_window(qb, kb, scale, q_range, k_range, chunk, layout)
            ft, q0 = call.grid.frame_tokens, call.chunk or 0
            frames = layout.absolute_key_frames(kb.shape[2])
            self.windows[(call.step, call.block, branch)] = {
                "scores": _to_host(scores), "probs": _to_host(probs), "q_range": q_range, "k_range": k_range,
                "q_frames": list(range(q0 + q_range[0] // ft, q0 + -(-q_range[1] // ft))),
                "k_frames": list(frames[k_range[0] // ft:-(-k_range[1] // ft)])}

    def finish_pass(self, ok: bool, error: Optional[str] = None) -> None:
        """Collect the pass's slots into the public arrays; mark the take complete or partial."""
        for sub in self.chunks.values():
            sub.finish_pass(ok, error)
        if self.chunks:
            self._assemble_chunks()
        for slot in self._slots.values():
            slot.flush()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the pinned host copies must have landed before anyone reads them
        for key, slot in self._slots.items():
            if key[0] == "cross":
                self.cross[(key[1], key[2])] = slot.result()
            elif key[0] == "image":
                self.image.setdefault((key[1], key[2]), {})[key[3]] = slot.result()
            else:
                self.sink.setdefault((key[1], key[2]), {})[key[3]] = slot.result()
        self._slots.clear()
        if self._context_lse:
            self.skipped["context_calls_without_their_pair"] += len(self._context_lse)
            self._context_lse.clear()
        self._open_step = None
        if not ok:
            self.status, self.error = "partial", error or "sampling did not finish"
        elif self.status == "recording":
            self.status = "complete"

    def _assemble_chunks(self) -> None:
        """The chunks' grids and cross maps along time: the whole video's grid and token maps."""
        order = sorted(self.chunks)
        subs = [self.chunks[c] for c in order if self.chunks[c].grid is not None]
        if not subs:
            return
        g0 = subs[0].grid
        if any((s.grid.height, s.grid.width) != (g0.height, g0.width) for s in subs):
            raise ValueError("chunks of one causal recording have different frame sizes")
        first = min(order)
        last = max(c + self.chunks[c].grid.frames for c in order if self.chunks[c].grid is not None)
        self.grid = Grid(last - first, g0.height, g0.width)
        contiguous = all(a + self.chunks[a].grid.frames == b for a, b in zip(order, order[1:]))
        # every step any chunk has: the frames of chunks without it (an initial_latent chunk has only the context
        # pass) are NaN, absent rather than "no attention"
        keys = set().union(*[set(s.cross) for s in subs]) if contiguous else set()
        for key in keys:
            ref = next(s.cross[key] for s in subs if key in s.cross)
            self.cross[key] = torch.cat([s.cross[key] if key in s.cross else ref.new_full(
                (*ref.shape[:3], s.map_grid.tokens, ref.shape[4]), float("nan")) for s in subs], dim=3)

    def experts(self) -> List[dict]:
        """The experts of a take whose passes ran different weights (Wan 2.2 A14B: high noise, then low noise):
        each with its steps; empty for one model."""
        groups: List[dict] = []
        for (first, sigmas), weights in zip(self.passes, self.pass_weights):
            last = first + max(1, len(sigmas) - 1) - 1
            if groups and groups[-1]["weights"] == weights:
                groups[-1]["steps"][1] = last
            else:
                groups.append({"weights": weights, "steps": [first, last]})
        if len({g["weights"] for g in groups}) < 2:
            return []
        names = ["high_noise", "low_noise"] if len(groups) == 2 else [f"expert_{i}" for i in range(len(groups))]
        return [{"expert": name, "steps": g["steps"]} for name, g in zip(names, groups)]

    def summary(self) -> dict:
        """A JSON-able description of the take (what nodes show and metadata starts from)."""
        return {
            "take": self.id, "status": self.status, "error": self.error,
            "grid": None if self.grid is None else self.grid.as_list(),
            "map_grid": None if self.map_grid is None else self.map_grid.as_list(),
            "batch": self.batch, "total_steps": self.total_steps, "recorded_steps": self.steps,
            "blocks": list(self.blocks), "heads": list(self.heads), "text_positions": list(self.plan.text_positions),
            "text_len": self.text_len, "model": self.model, "sampling": self.sampling,
            "skipped": dict(self.skipped) if not self.chunks else dict(sum((c.skipped for c in self.chunks.values()),
                                                                             Counter(self.skipped))),
            "chunks": sorted(self.chunks) if self.chunks else None,
        }


class Recorder:
    """Taps attention calls for a plan; a handle shared by every model the plan is attached to."""

    def __init__(self, plan: RecordingPlan, keep_takes: int = 4):
        if not isinstance(plan, RecordingPlan):
            raise TypeError(f"Recorder needs a RecordingPlan, got {type(plan).__name__}")
        self.plan = plan
        self.keep_takes = max(1, int(keep_takes))
        self.takes: List[Take] = []
        self.active: Optional[Take] = None
        self.released: List[str] = []  # output fingerprints of takes released to stay within the memory budget

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; the recorder is a shared handle, never duplicated.
        return self

    # -- passes ------------------------------------------------------------------------------------
    def begin_pass(self, sigmas: Optional[Sequence[float]], model, input_fingerprint: Optional[str] = None,
                   sampling: Optional[dict] = None, weights: Optional[int] = None) -> Take:
        """Start a sampling pass; it continues the latest take when it starts where that one stopped.

        ``sampling`` (seed, cfg, ...) describes the sampler; the first pass's values are kept. ``sigmas=None``
        (a pipeline whose schedule is not known): each new sigma or timestep seen is the next step. ``weights``:
        an identity of the model's weights (passes of different weights in one take are experts, as in Wan 2.2 A14B).
        """
        dynamic = sigmas is None
        sigmas = [] if dynamic else [float(s) for s in sigmas]
        info = model if isinstance(model, ModelInfo) else None
        if info is not None:
            self.plan.check_model(info.num_blocks, info.num_heads)
        prev = self.takes[-1] if self.takes else None
        continuing = (not dynamic and prev is not None and prev.status == "complete" and prev.passes
                      and prev.model == (model.as_dict() if isinstance(model, ModelInfo) else dict(model))
                      and continues(prev.passes[-1][1], sigmas)
                      and (input_fingerprint is None or input_fingerprint == prev.output_fingerprint))
        fork = None
        if not continuing and not dynamic and input_fingerprint is not None:
            fork = self._fork_point(input_fingerprint, sigmas, model)
        if not dynamic and sigmas and sigmas[-1] == 0.0:  # a schedule that ends at sigma 0 is never continued
            first = prev.total_steps if continuing else (fork[0].passes[fork[1] + 1][0] if fork else 0)
            self.plan.check_schedule(first, len(sigmas) - 1)
        if fork is not None:  # continue the recording of the cached earlier pass, not a new one from step 0
            take = fork[0].truncated(fork[1] + 1)
            self.takes.append(take)
            del self.takes[:-self.keep_takes]
            continuing = True
        elif continuing:
            take = prev
        if continuing:
            take.status = "recording"
            take._budget_checked = False
        else:
            take = Take(self.plan, model)
            take._recorder = self
            take.input_fingerprint = input_fingerprint
            take.sampling = dict(sampling or {})
            take._dynamic = dynamic
            self.takes.append(take)
            del self.takes[:-self.keep_takes]
        # a dynamic pass has no scheduled steps ([0.0]); locate() numbers its steps as they come
        take.passes.append((take.total_steps, [0.0] if dynamic else sigmas))
        take.pass_weights.append(weights)
        take._seen.clear()
        self.active = take
        return take

    def _fork_point(self, input_fingerprint: str, sigmas: Sequence[float], model) -> Optional[Tuple[Take, int]]:
        """(take, pass index) of a kept take whose pass (not its last) produced ``input_fingerprint`` and ended where
        ``sigmas`` begins: this pass samples again what followed it."""
        key = model.as_dict() if isinstance(model, ModelInfo) else dict(model)
        for take in reversed(self.takes):
            if take.model != key or take.status != "complete":
                continue
            for i, out in enumerate(take.pass_outputs[:-1]):
                if out == input_fingerprint and continues(take.passes[i][1], sigmas):
                    return take, i
        return None

    def make_room(self, take: Take, need: int) -> None:
        """Release the oldest other recordings until ``take`` can hold ``need`` bytes within the memory budget: every
        recording the recorder keeps counts against ``memory_budget_mb`` (a released one is an error downstream that
        says so, never a stale map)."""
        budget = self.plan.memory_budget_bytes
        others = [t for t in self.takes if t is not take]
        while others and need + sum(t.reserved_bytes for t in others) > budget:
            old = others.pop(0)
            self.takes.remove(old)
            if old.output_fingerprint:
                self.released.append(old.output_fingerprint)
                del self.released[:-64]

    def end_pass(self, output_fingerprint: Optional[str] = None, error: Optional[BaseException] = None) -> Optional[Take]:
        take, self.active = self.active, None
        if take is None:
            return None
        take.finish_pass(ok=error is None, error=None if error is None else f"{type(error).__name__}: {error}")
        take.pass_outputs.append(output_fingerprint if error is None else None)
        if output_fingerprint is not None and error is None:
            take.output_fingerprint = output_fingerprint
        return take

    def locate(self, sigma: float) -> Tuple[Optional[int], bool]:
        """Global step of a model evaluation at ``sigma`` in the active pass, and whether it is the step's own sigma."""
        if self.active is None or not self.active.passes:
            return None, False
        offset, sigmas = self.active.passes[-1]
        if self.active._dynamic:
            steps = self.active._dynamic_steps
            return steps.setdefault(float(sigma), len(steps)), True
        step, exact = step_of(sigma, sigmas)
        return (None, False) if step is None else (offset + step, exact)

    # -- the tap -------------------------------------------------------------------------------------
    def wants(self, call: AttentionCall, exact_step: bool = True) -> bool:
        take, p = self.active, self.plan
        if take is None or not p.wants_step(call.step) or not p.wants_block(call.block):
            return False
        if not any(b in call.branches for b in p.branch_names()):
            return False
        if call.kind == CROSS_TEXT:
            needed = p.record_cross or p.record_image_context
        elif call.kind == CROSS_IMAGE:
            needed = p.record_image_context
        else:
            needed = call.kind == SELF and (p.record_sink_stats or p.window is not None)
        if not needed:
            return False
        if not exact_step:
            take.skipped["evaluations_between_steps"] += 1
            return False
        key = (call.step, call.block, call.kind, call.branches, call.chunk)
        if key in take._seen:
            take.skipped["repeated_evaluations"] += 1
            return False
        take._seen.add(key)
        return True

    def tap(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, attend: Callable[[], torch.Tensor],
            exact_step: bool = True, attend_lse: Optional[Callable[[], tuple]] = None) -> torch.Tensor:
        """Run ``attend()`` (the model's own attention) and return its output untouched, recording on the side.

        ``attend_lse``: the same attention returning ``(output, lse or None)`` with an output bit-identical to
        ``attend()``'s (see :mod:`wan_capture.lse_attention`); used for self-attention sink statistics, which then
        need a single sweep over the keys.
        """
        wanted = self.wants(call, exact_step)
        lse = None
        if wanted and attend_lse is not None and call.kind == SELF and self.plan.record_sink_stats:
            out, lse = attend_lse()
        else:
            out = attend()
        if wanted:
            # statistics in their own precision whatever the host's autocast (the model's call above ran under it)
            with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
                self.active.record(call, q.detach(), k.detach(), lse)
        return out

    def find(self, output_fingerprint: str) -> Optional[Take]:
        for take in reversed(self.takes):
            if take.output_fingerprint == output_fingerprint:
                return take
        return None

    @property
    def latest(self) -> Optional[Take]:
        return self.takes[-1] if self.takes else None
