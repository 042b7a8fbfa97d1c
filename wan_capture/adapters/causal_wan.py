"""Causal Wan with a KV cache (Self-Forcing's ``CausalWanModel``), recorded without editing its code. CausVid's, whose
self-attention has no sink or window settings, is not recognised yet.

The model's self-attention calls the module-level ``attention(q, k, v)`` of its module with the current chunk's
queries against the cache (``kv_cache["k"][:, start:local_end]``); its cross-attention calls ``flash_attention``.
While the context is open both names are replaced by taps that call the originals (an SDPA stand-in where
flash-attn is missing, as for the official code); hooks give the block, the chunk (``current_start``) and the
timestep. The absolute frame of every cached key comes from :class:`~wan_capture.kv_cache.KVCacheObserver`, which
also writes the KV-cache event log into the take. Everything is restored on exit, also on exceptions.
"""
from __future__ import annotations

import inspect
import os
import sys
import types
from contextlib import contextmanager
from typing import Sequence

import torch

from ..capture.call import SELF
from ..grid import Grid
from ..capture.kv_cache import KVCacheObserver, cache_anomaly
from ..model_info import describe_model
from ..stats.statistics import KeyLayout
from .official import sdpa_attention
from .session import Patches, PipelineTracker, recording_pass, timestep_of


def is_causal_wan(model) -> bool:
    """A causal Wan DiT with KV-cache inference: ``CausalWanModel`` whose self-attention has sink/window settings."""
    blocks = getattr(model, "blocks", None)
    return (type(model).__name__ == "CausalWanModel" and blocks is not None and len(blocks) > 0
            and hasattr(blocks[0].self_attn, "sink_size") and hasattr(blocks[0].self_attn, "local_attn_size"))


def _half(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Wan's attention functions run in half precision: statistics see q and k as the attention does
    return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(dtype)


class _CausalSession:
    """The taps and hooks of one recording of a causal Wan model (see the module docstring)."""

    def __init__(self, model, recorder, branch_order: Sequence[str], context_timestep: float):
        self.recorder, self.branch_order, self.context_timestep = recorder, tuple(branch_order), context_timestep
        self.info = describe_model(model, model_type="causal-wan")
        self.tracker = PipelineTracker(recorder, self.info, self.branch_order)
        self.observer = KVCacheObserver()
        self.cache, self.start, self.sink, self.kind, self.last = None, 0, 0, "denoise", None
        self.self_mod = sys.modules[type(model.blocks[0].self_attn).__module__]
        self.cross_mod = sys.modules[type(model.blocks[0].cross_attn).__module__]
        attn_mod = sys.modules.get(getattr(self.cross_mod.flash_attention, "__module__", ""), self.cross_mod)
        # Wan's own attention module says whether flash-attn is there (its flash_attention asserts otherwise); a
        # module without those flags has a flash_attention that runs as it is
        flags = [getattr(attn_mod, n) for n in ("FLASH_ATTN_2_AVAILABLE", "FLASH_ATTN_3_AVAILABLE")
                 if hasattr(attn_mod, n)]
        self.have_flash = any(flags) if flags else True
        self.attention, self.flash = self.self_mod.attention, self.cross_mod.flash_attention
        self.self_signature = inspect.signature(type(model.blocks[0].self_attn).forward)

    def install(self, model, patches: Patches) -> None:
        patches.hook(model.register_forward_pre_hook(self.forward_pre, with_kwargs=True))
        patches.hook(model.register_forward_hook(lambda *a: self.tracker.end_evaluation()))
        for i, block in enumerate(model.blocks):
            patches.hook(block.self_attn.register_forward_pre_hook(
                lambda m, a, kw, i=i: self.self_pre(i, m, a, kw), with_kwargs=True))
            patches.hook(block.self_attn.register_forward_hook(self.self_post))
            patches.hook(block.cross_attn.register_forward_pre_hook(
                lambda m, a, i=i: self.tracker.enter_block(i, self.info.cross_kinds)))
            patches.hook(block.cross_attn.register_forward_hook(lambda *a: self.tracker.leave_block()))
        patches.replace(self.self_mod, "attention", self.tapped_attention)
        patches.replace(self.cross_mod, "flash_attention", self.tapped_flash)

    def tapped_attention(self, q, k, v, *args, **kwargs):
        attend = lambda: self.attention(q, k, v, *args, **kwargs)  # noqa: E731
        ev, tracker, active = self.tracker.evaluation, self.tracker, self.recorder.active
        if ev is None or tracker.block is None or self.cache is None or active is None:
            return attend()
        ft = ev.grid.frame_tokens
        dtype = kwargs.get("dtype", torch.bfloat16)
        writer = "context" if self.kind == "context" else f"step {ev.step}"
        key_frames, event = self.observer.observe(tracker.block, k, q.shape[1], self.start, ft, writer, self.sink)
        event.update(step=ev.step, **{"pass": self.kind})
        anomaly = cache_anomaly(key_frames, event["chunk"])
        if anomaly:
            event["anomaly"] = anomaly
        active.log_kv(event)
        layout = KeyLayout(q_offset=k.shape[1] - q.shape[1], frame_tokens=ft, key_frames=key_frames)
        return tracker.tap_bsnd(_half(q, dtype), _half(k, dtype), attend, layout=layout, kind=SELF)

    def tapped_flash(self, q, k, v, *args, **kwargs):
        def attend():
            if self.have_flash:
                return self.flash(q, k, v, *args, **kwargs)
            return sdpa_attention(q, k, v, *args, **kwargs)
        dtype = kwargs.get("dtype", torch.bfloat16)
        return self.tracker.tap_bsnd(_half(q, dtype), _half(k, dtype), attend)

    def self_pre(self, i, module, args, kwargs):
        bound = self.self_signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        self.cache, self.start = a.get("kv_cache"), int(a.get("current_start") or 0)
        self.sink = int(getattr(module, "sink_size", 0) or 0)
        self.tracker.enter_block(i, (SELF,))

    def self_post(self, module, args, output):
        self.tracker.leave_block()
        self.cache = None

    def forward_pre(self, module, args, kwargs):
        if kwargs.get("kv_cache") is None:  # training-style full-sequence forward: not a KV-cache evaluation
            return
        x = kwargs.get("x", args[0] if args else None)
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        pt, ph, pw = self.info.patch_size
        f, h, w = (x[0] if isinstance(x, (list, tuple)) else x).shape[-3:]
        grid = Grid(f // pt, h // ph, w // pw)
        timestep = timestep_of(t)
        chunk = int(kwargs.get("current_start") or 0) // grid.frame_tokens
        kind = "context" if abs(timestep - self.context_timestep) < 1e-6 else "denoise"
        if _new_generation(self.last, (chunk, kind)) and self.recorder.active is not None:
            # a second video inside one record() block: it gets a take of its own (recorder.takes), never merged
            self.recorder.end_pass()
            self.recorder.begin_pass(None, self.info)
            self.tracker = PipelineTracker(self.recorder, self.info, self.branch_order)
            self.observer = KVCacheObserver()
        self.last, self.kind = (chunk, kind), kind
        ev = self.tracker.begin_forward(timestep, len(x), grid, chunk=chunk)
        if self.recorder.active is not None and ev.step is not None:
            self.recorder.active.step_pass.setdefault(ev.step, kind)


@contextmanager
def attach(model, recorder, branch_order: Sequence[str] = ("cond",), context_timestep: float = 0.0):
    """Record ``model`` while the block runs (see the module docstring); yields the recorder.

    ``branch_order``: Self-Forcing and CausVid sample without CFG (one evaluation per step: ``("cond",)``).
    ``context_timestep``: the timestep of the pass that refills the cache with the clean chunk (Self-Forcing's
    ``context_noise``, 0 by default); evaluations at it are labelled ``"context"`` in ``take.step_pass``.
    """
    session = _CausalSession(model, recorder, branch_order, context_timestep)
    patches = Patches()
    session.install(model, patches)
    with recording_pass(recorder, session.info, patches.undo) as rec:
        yield rec


def _new_generation(last, now) -> bool:
    """Whether an evaluation ``now = (chunk, pass)`` after ``last`` starts another video: within one generation
    chunks only move forward, and a chunk's context pass is its last evaluation."""
    if last is None:
        return False
    return now[0] < last[0] or (now[0] == last[0] and last[1] == "context" and now[1] == "denoise")


@contextmanager
def self_forcing_modules(path: str):
    """``(causal_model, model)``: Self-Forcing's ``wan.modules.causal_model`` and ``wan.modules.model`` from a checkout
    at ``path``, without running its package ``__init__`` (which calls CUDA and needs ftfy): empty ``wan`` and
    ``wan.modules`` packages point into the checkout. Any ``wan`` modules loaded before (the official code's) are put
    back on exit."""
    saved = {n: m for n, m in sys.modules.items() if n == "wan" or n.startswith("wan.")}
    for n in saved:
        del sys.modules[n]
    try:
        for name, sub in (("wan", "wan"), ("wan.modules", os.path.join("wan", "modules"))):
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(path, sub)]
            sys.modules[name] = pkg
        import wan.modules.causal_model as causal_model
        import wan.modules.model as model
        yield causal_model, model
    finally:
        for n in [n for n in sys.modules if n == "wan" or n.startswith("wan.")]:
            del sys.modules[n]
        sys.modules.update(saved)
