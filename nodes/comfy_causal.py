"""ComfyUI's own causal Wan (``comfy.ldm.wan.ar_model.CausalWanModel``, sampled chunk by chunk by ``ar_video``),
recorded through the same attention override, call tracker and take as every other Wan model.

Its autoregressive path (``forward_block``, taken when ``transformer_options`` holds ``ar_state``) calls each block
without ``transformer_options``, so neither the attention override nor the per-block patches reach it. For the
duration of one model evaluation (inside the pack's ``DIFFUSION_MODEL`` wrapper, on that model instance only) forward
pre-hooks on its blocks pass the evaluation's ``transformer_options`` down and say which block runs; they are removed
when the evaluation ends. A block that already receives ``transformer_options`` (a later ComfyUI) keeps its own, so
each attention call still reaches the override once and nothing is recorded twice.

Each evaluation is one chunk (``ar_state["start_frame"]``) at one sigma. Steps are numbered as the sigmas first appear,
as for the other causal models: the chunks' denoising sigmas, and sigma 0, the pass that writes the clean chunk into
the cache (``"context"`` in ``take.step_pass``; with an initial image it comes first, so it is step 0). The chunk's
queries attend to every key the cache holds: which absolute frames those keys are is observed from their content
(:class:`~wan_capture.capture.kv_cache.KVCacheObserver`), never taken from the cache's ``end`` index; the keys are
stored roped, so each frame's RoPE position is the ``start_frame`` of the evaluation that wrote it.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Optional

from ..wan_capture.capture.kv_cache import KVCacheObserver, cache_anomaly
from ..wan_capture.stats.statistics import KeyLayout

DESIGN = {"design": "global cache", "projects": "ComfyUI (comfy/ldm/wan/ar_model.py, ar_video sampler)"}
CONTEXT_SIGMA = 0.0  # ar_video writes each clean chunk into the cache with one evaluation at sigma 0


def is_comfy_causal(dm) -> bool:
    """ComfyUI's causal Wan: a ``CausalWanModel`` with ``forward_block`` and per-block KV caches."""
    blocks = getattr(dm, "blocks", None)
    return (type(dm).__name__ == "CausalWanModel" and callable(getattr(dm, "forward_block", None))
            and callable(getattr(dm, "init_kv_caches", None)) and bool(blocks) and hasattr(blocks[0], "self_attn")
            and "kv_cache" in inspect.signature(type(blocks[0].self_attn).forward).parameters)


def check_comfy_causal(dm) -> None:
    """At Attach: the blocks must take ``transformer_options`` (how the override reaches them), else a refusal
    naming the class."""
    block = dm.blocks[0]
    if "transformer_options" not in inspect.signature(type(block).forward).parameters:
        raise TypeError(f"{type(dm).__module__}.{type(dm).__name__}: its blocks ({type(block).__name__}) take no "
                        "transformer_options, so Attach Attention Recorder cannot reach their attention calls. "
                        "This causal Wan is not supported")


class ComfyCausal:
    """The causal side of one recorder installation: block hooks per evaluation, the KV observer per take."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.observer: Optional[KVCacheObserver] = None
        self.take_id: Optional[int] = None
        self.in_self = False
        self.start_frame: Optional[int] = None
        self.calls = 0

    def begin(self, take, ar_state: Optional[dict]) -> None:
        """An evaluation starts: a new take gets a new observer; ``ar_state`` None is a full-sequence evaluation."""
        if take.id != self.take_id:
            self.take_id, self.observer, self.calls = take.id, KVCacheObserver(), 0
        self.start_frame = None if ar_state is None else int(ar_state["start_frame"])
        if ar_state is not None:
            if not take.log.dynamic:
                take.log.restart_dynamic()  # steps numbered as sigmas come, as for every causal model
            take.kv_design = dict(DESIGN)

    @staticmethod
    def step_pass(sigma: float) -> str:
        return "context" if sigma == CONTEXT_SIGMA else "denoise"

    @contextmanager
    def hooks(self, dm, transformer_options: dict):
        """Per-instance hooks on ``dm``'s blocks for one evaluation (see the module docstring)."""
        tracker, handles = self.tracker, []

        def enter(i, module, args, kwargs):
            tracker.enter_block(i)
            if "transformer_options" not in kwargs:
                return args, dict(kwargs, transformer_options=transformer_options)
            return None

        def self_attention(flag):
            def hook(*_):
                self.in_self = flag
            return hook

        try:
            for i, block in enumerate(dm.blocks):
                handles.append(block.register_forward_pre_hook(lambda m, a, kw, i=i: enter(i, m, a, kw),
                                                               with_kwargs=True))
                handles.append(block.register_forward_hook(lambda *a: tracker.leave_block()))
                handles.append(block.self_attn.register_forward_pre_hook(self_attention(True)))
                handles.append(block.self_attn.register_forward_hook(self_attention(False)))
            yield
        finally:
            self.in_self, self.start_frame = False, None
            for h in handles:
                h.remove()

    def self_layout(self, q, k) -> Optional[KeyLayout]:
        """For a self-attention call of a chunk: the absolute frames of its keys (observed), logged in the take's
        KV-cache log; None outside a chunk's self-attention."""
        tracker = self.tracker
        if not (self.in_self and self.start_frame is not None and tracker.active):
            return None
        ev, take = tracker.evaluation, tracker.recorder.active
        ft = ev.grid.frame_tokens
        kind = take.step_pass.get(ev.step, "denoise")
        writer = "context" if kind == "context" else f"step {ev.step}"
        branch = ev.branches[0]
        key_frames, event = self.observer.observe(
            (tracker.block, branch), k, q.shape[1], self.start_frame * ft, ft, [writer] * ev.grid.frames,
            rope_start=self.start_frame)
        entry = dict(event, block=tracker.block, chunk=ev.chunk, step=ev.step, branch=branch, call=self.calls,
                     query_frames=list(range(ev.chunk, ev.chunk + ev.grid.frames)), **{"pass": kind})
        self.calls += 1
        anomaly = cache_anomaly(key_frames, ev.chunk)
        if anomaly:
            entry["anomaly"] = anomaly
        take.log_kv(entry)
        return KeyLayout(q_offset=k.shape[1] - q.shape[1], frame_tokens=ft, key_frames=key_frames)

