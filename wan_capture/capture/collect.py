"""From attention calls to a take's arrays: each call's statistics, gathered across blocks, into the keyed store.

Per (statistic, step, branch, chunk) a slot gathers the blocks of a step, kept per block or reduced on the fly
(``store_per_block``); a step's slots leave the GPU when the next step starts (pinned, non-blocking copies) and become
arrays of the take's store when the pass ends.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..grid import Grid, pool_spatial
from ..plan import PlanError
from ..keys import SINK_NAMES, ArrayKey
from ..stats import statistics as _stats
from .budget import bytes_per_step
from .call import CROSS_IMAGE, CROSS_TEXT, SELF, AttentionCall
from .store import ALL_COLUMNS


def _to_host(t: torch.Tensor) -> torch.Tensor:
    # Pinned, non-blocking copies let sampling run on; the take synchronises once when the pass ends.
    if t.device.type == "cuda":
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)
    return t.detach().to("cpu", copy=True)


def _select(x: torch.Tensor, dim: int, index) -> torch.Tensor:
    """``x`` indexed along ``dim``: a view when the indices are a contiguous run (cond/uncond chunks, all heads)."""
    index = list(index)
    if index == list(range(index[0], index[0] + len(index))):
        return x.narrow(dim, index[0], len(index))
    return x.index_select(dim, torch.as_tensor(index, device=x.device))


class _Slot:
    """One statistic of one (step, branch, chunk) gathered across blocks: kept per block, or reduced on the fly."""

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


class Collector:
    """Records the statistics of a take's attention calls (see the module docstring)."""

    def __init__(self, take):
        self.take, self.plan = take, take.plan
        self.slots: Dict[ArrayKey, _Slot] = {}
        self.seen: set = set()  # (step, block, kind, branches, chunk) recorded in this pass: repeats are skipped
        self.budget_checked = False
        self.chunk_steps: set = set()  # causal: (chunk, step) whose memory is reserved
        self.open_step: Optional[int] = None
        # the first of a block's image and text calls: (kind, lse), until the other one
        self.context_lse: Dict[Tuple[int, int, str, Optional[int]], Tuple[str, torch.Tensor]] = {}

    def nbytes(self) -> int:
        return sum(slot.nbytes() for slot in self.slots.values())

    # -- one call ----------------------------------------------------------------------------------------
    def record(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, lse: Optional[torch.Tensor] = None):
        """Statistics of one attention call (``lse``: each query's log-sum-exp ``[B, heads, Lq]`` when the model's
        attention kernel returned it)."""
        take, p = self.take, self.plan
        self._place(call)
        rows = {b: [i for i, r in enumerate(call.branches) if r == b] for b in p.branch_names()}
        batch = max(len(r) for r in rows.values())
        if batch == 0:
            return
        take.batch = take.batch or batch
        self._reserve(call, k, batch)
        self._advance(call.step)
        take.log.step_sigmas[call.step] = call.sigma
        take.log.step_timesteps[call.step] = call.timestep
        heads = p.selected_heads(call.heads)
        scale = call.scale if call.scale is not None else _stats.default_scale(q.shape[-1] // call.heads)
        qh = _select(_stats.split_heads(q, call.heads), 1, heads)
        kh = _select(_stats.split_heads(k, call.heads), 1, heads)
        lh = None if lse is None else _select(lse, 1, heads)
        for branch, picked in rows.items():
            if not picked:
                continue
            qb, kb = _select(qh, 0, picked), _select(kh, 0, picked)
            if call.kind == CROSS_TEXT:
                take.text_len = k.shape[1]
                if p.record_cross:
                    self._cross(call, branch, qb, kb, scale)
                if p.record_image_context:
                    self._text_side_of_image_share(call, branch, qb, kb, scale)
            elif call.kind == CROSS_IMAGE:
                self._image(call, branch, qb, kb, scale)
            elif call.kind == SELF:
                self._self(call, branch, qb, kb, scale, None if lh is None else _select(lh, 0, picked))

    def _place(self, call: AttentionCall) -> None:
        """The call's grid: the take's (bidirectional), or its chunk's (causal, each chunk its own frames)."""
        take = self.take
        if call.chunk is not None:
            known = take.store.chunk_grids.setdefault(call.chunk, call.grid)
            if known != call.grid:
                raise ValueError(f"chunk {call.chunk} changed its grid: {known.as_list()} -> {call.grid.as_list()}")
            return
        if take.grid is None:
            take.grid = call.grid
        elif call.grid != take.grid:
            raise ValueError(f"latent grid changed within one recording: {take.grid.as_list()} -> "
                             f"{call.grid.as_list()}")

    def _reserve(self, call: AttentionCall, k: torch.Tensor, batch: int) -> None:
        take, p = self.take, self.plan
        nb, nh = take.model["num_blocks"], take.model["num_heads"]
        if call.chunk is not None:  # causal: each chunk's step is sized when it starts (its cache length is known)
            if (call.chunk, call.step) not in self.chunk_steps:
                keys = k.shape[1] if call.kind == SELF else None
                window = None if p.window is None else (call.grid.tokens, keys or call.grid.tokens)
                take.budget.reserve(bytes_per_step(p, nb, nh, call.grid, batch, keys, window), 1, call.grid, batch)
                self.chunk_steps.add((call.chunk, call.step))
        elif not self.budget_checked:
            offset, sigmas = take.log.passes[-1]
            steps = [s for s in range(offset, offset + max(1, len(sigmas) - 1)) if p.wants_step(s)]
            window = None
            if p.window is not None:
                (q0, q1), (k0, k1) = self.window_ranges(call.grid)
                window = (q1 - q0, k1 - k0)
            need = bytes_per_step(p, nb, nh, call.grid, take.batch, window=window) * len(steps)
            take.budget.reserve(need, len(steps), call.grid, take.batch)
            self.budget_checked = True

    def _advance(self, step: int) -> None:
        if self.open_step is not None and step != self.open_step:
            for key, slot in self.slots.items():
                if key.step == self.open_step:
                    slot.flush()
        self.open_step = step

    def _slot(self, key: ArrayKey, reduce: str = "mean") -> _Slot:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = _Slot(self.plan.store_per_block, reduce, self.plan.torch_dtype)
        return slot

    def _heads_reduced(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.plan.store_per_head else value.mean(dim=1, keepdim=True)

    # -- the statistics ----------------------------------------------------------------------------------
    def _cross(self, call, branch, qb, kb, scale) -> None:
        p, chunk = self.plan, self.plan.chunk_budget_bytes
        if qb.shape[2] != call.grid.tokens:
            self.take.skipped["cross_text_tokens_differ_from_grid"] += 1
            return
        maps = _stats.cross_attention_probs(qb, kb, p.positions(branch), scale, chunk, call.layout)
        if p.sums(branch):  # summed groups (padding): one column each, after the positions'
            maps = torch.cat([maps, _stats.cross_attention_mass(qb, kb, p.sums(branch), scale, chunk, call.layout)], -1)
        maps = pool_spatial(self._heads_reduced(maps), call.grid, p.spatial_downsample_factor)
        self._slot(ArrayKey("cross", ALL_COLUMNS, call.step, branch, chunk=call.chunk)).add(call.block, maps)

    def _image(self, call, branch, qb, kb, scale) -> None:
        """Image cross-attention (i2v): each image token's attention received, and the image share once the block's
        text call is seen too (before or after this one)."""
        if qb.shape[2] != call.grid.tokens:
            self.take.skipped["image_tokens_differ_from_grid"] += 1
            return
        lse, received = _stats.context_statistics(qb, kb, scale, self.plan.chunk_budget_bytes)
        self._pair_context(call, branch, CROSS_IMAGE, lse)
        key = ArrayKey("image", "received", call.step, branch, chunk=call.chunk)
        self._slot(key).add(call.block, self._heads_reduced(received))

    def _text_side_of_image_share(self, call, branch, qb, kb, scale) -> None:
        """The text call's side of the image share (i2v models only: a t2v model has no image call to pair with)."""
        if self.take.model.get("cross_attention") != "i2v":
            self.take.skipped["text_calls_without_image_context"] += 1
            return
        lse_txt, _ = _stats.context_statistics(qb, kb, scale, self.plan.chunk_budget_bytes)
        self._pair_context(call, branch, CROSS_TEXT, lse_txt)

    def _pair_context(self, call, branch: str, kind: str, lse: torch.Tensor) -> None:
        """The image tokens' share of each query's attention, were image and text keys one softmax:
        ``sigmoid(lse_image - lse_text)`` (Wan attends to them in two softmaxes and adds the outputs). A host may call
        the image and the text attention of a block in either order: the first one's lse waits for the second."""
        pending = (call.step, call.block, branch, call.chunk)
        other = self.context_lse.pop(pending, None)
        if other is None or other[0] == kind:
            self.context_lse[pending] = (kind, lse)
            return
        lse_img, lse_txt = (lse, other[1]) if kind == CROSS_IMAGE else (other[1], lse)
        share = torch.sigmoid(lse_img - lse_txt)
        key = ArrayKey("image", "share", call.step, branch, chunk=call.chunk)
        self._slot(key).add(call.block, self._heads_reduced(share))

    def _self(self, call, branch, qb, kb, scale, lse=None) -> None:
        p, store = self.plan, self.take.store
        layout = call.layout.with_frame_tokens(call.grid.frame_tokens)
        frames = layout.absolute_key_frames(kb.shape[2])
        if call.chunk is not None:
            store.key_frames[(call.chunk, call.step, call.block)] = frames
        if p.record_sink_stats:
            st = _stats.sink_statistics(qb, kb, scale, layout.frame_tokens, p.chunk_budget_bytes, layout, lse=lse,
                                        key_max=p.record_key_max)
            for name in SINK_NAMES:
                value = getattr(st, name)
                if value is None:  # the key max, not asked for
                    continue
                reduce = "max" if name == "key_max" else "mean"
                if not p.store_per_head:
                    value = value.amax(dim=1, keepdim=True) if reduce == "max" else value.mean(dim=1, keepdim=True)
                self._slot(ArrayKey("sink", name, call.step, branch, chunk=call.chunk), reduce).add(call.block, value)
        if p.window is not None:
            ranges = self.window_ranges(call.grid, layout, kb.shape[2], call.chunk)
            if ranges is None:
                return
            q_range, k_range = ranges
            scores, probs = _stats.score_window(qb, kb, scale, q_range, k_range, p.chunk_budget_bytes, layout)
            ft, q0 = call.grid.frame_tokens, call.chunk or 0
            key = ArrayKey("window", "scores", call.step, branch, call.block, call.chunk)
            store.put(key, _to_host(scores))
            store.put(ArrayKey("window", "probs", call.step, branch, call.block, call.chunk), _to_host(probs))
            store.window_meta[key] = {
                "q_range": q_range, "k_range": k_range,
                "q_frames": list(range(q0 + q_range[0] // ft, q0 + -(-q_range[1] // ft))),
                "k_frames": list(frames[k_range[0] // ft:-(-k_range[1] // ft)])}

    def window_ranges(self, grid: Grid, layout=None, keys: Optional[int] = None, chunk: Optional[int] = None):
        """Query and key token ranges of the plan's window in this call, or None when the call holds none of it.

        Bidirectional: frames of the latent grid. Causal (``chunk`` set): the chunk's queries of the window's query
        frames, and the cached keys whose absolute frames lie in the window's key frames.
        """
        w, ft = self.plan.window, grid.frame_tokens
        if chunk is None:
            if w.q_start >= grid.frames or w.k_start >= grid.frames:
                raise PlanError(f"RecordingPlan.window: frames start at q={w.q_start}, k={w.k_start} but the latent "
                                f"has only {grid.frames} frames (0..{grid.frames - 1})")
            k_stop = grid.frames if w.k_stop is None else min(w.k_stop, grid.frames)
            return (w.q_start * ft, min(w.q_stop, grid.frames) * ft), (w.k_start * ft, k_stop * ft)
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

    # -- the end of a pass ---------------------------------------------------------------------------------
    def finish(self) -> None:
        """The pass's slots become arrays of the store; causal chunks' token maps are laid along time."""
        take = self.take
        for slot in self.slots.values():
            slot.flush()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the pinned host copies must have landed before anyone reads them
        for key, slot in self.slots.items():
            take.store.put(key, slot.result())
        self.slots.clear()
        if self.context_lse:
            take.skipped["context_calls_without_their_pair"] += len(self.context_lse)
            self.context_lse.clear()
        self.open_step = None
        if take.store.chunk_grids:
            assemble_chunks_along_time(take)


def assemble_chunks_along_time(take) -> None:
    """Causal Wan: the chunks' grids and token maps along time give the whole video's grid and token maps. A step
    that some chunks lack (an ``initial_latent`` chunk has only its context pass) has NaN there: absent, not 0."""
    store = take.store
    grids = store.chunk_grids
    order = sorted(grids)
    g0 = grids[order[0]]
    if any((g.height, g.width) != (g0.height, g0.width) for g in grids.values()):
        raise ValueError("chunks of one causal recording have different frame sizes")
    take.grid = Grid(max(c + grids[c].frames for c in order) - order[0], g0.height, g0.width)
    if not all(a + grids[a].frames == b for a, b in zip(order, order[1:])):
        return  # chunks that leave gaps have no whole-video token maps
    pool = take.plan.spatial_downsample_factor
    for key in {ArrayKey("cross", k.name, k.step, k.branch) for k in store.keys("cross") if k.chunk is not None}:
        parts = {c: store.arrays.get(ArrayKey("cross", key.name, key.step, key.branch, chunk=c)) for c in order}
        ref = next(v for v in parts.values() if v is not None)
        store.put(key, torch.cat([v if v is not None else ref.new_full(
            (*ref.shape[:3], grids[c].pooled(pool).tokens, ref.shape[4]), float("nan")) for c, v in parts.items()],
            dim=3))
