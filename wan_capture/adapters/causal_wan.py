"""Causal Wan with a KV cache (Self-Forcing, Causal-Forcing, CausVid, LongLive, Rolling Forcing), recorded without
editing its code.

Every project's self-attention calls the module-level ``attention(q, k, v)`` of its module with the current chunk's
queries against the keys it keeps, rotates keys with the module-level ``causal_rope_apply`` and calls
``flash_attention`` for the text. While the context is open these names are replaced by taps that call the
originals (an SDPA stand-in where flash-attn is missing, as for the official code); hooks give the block, the chunk
(``current_start``), the timestep and the cache. What differs between projects is one
:class:`~.cache_designs.CacheDesign`. The absolute frame, RoPE position and reason of every key come from
:class:`~wan_capture.capture.kv_cache.KVCacheObserver`, which also writes the KV-cache event log into the take.
Everything is restored on exit, also on exceptions.

Evaluations are filed as chunk (first query frame) and step (the timestep's order of first appearance). A window
design (Rolling Forcing) denoises several blocks at different timesteps in one evaluation: each block is filed as
its own chunk at its own timestep, its queries against all the keys the evaluation attended to. The pass that
refills the cache with clean frames is ``"context"`` in ``take.step_pass``: evaluations at ``context_timestep``
(0, what every project's ``context_noise`` defaults to) or marked by the design's argument (``updating_cache``).
Each cache a pipeline passes is a branch in order of first use: LongLive's positive cache ``cond``, its negative
cache ``uncond``. A cache that empties again starts another generation, which gets a take of its own.
"""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from ..capture.call import SELF
from ..capture.kv_cache import KVCacheObserver, cache_anomaly
from ..capture.tracker import Evaluation
from ..grid import Grid
from ..model_info import describe_model
from ..stats.statistics import KeyLayout
from .cache_designs import CacheDesign, describe_refusal, design_of, missing_functions
from .official import sdpa_attention
from .projects import project_modules
from .session import Patches, PipelineTracker, recording_pass, timestep_of


def is_causal_wan(model) -> bool:
    """A causal Wan DiT with KV-cache inference (``CausalWanModel``), whether or not a cache design fits it."""
    blocks = getattr(model, "blocks", None)
    return (type(model).__name__ == "CausalWanModel" and bool(blocks) and hasattr(blocks[0], "self_attn")
            and "kv_cache" in inspect.signature(type(blocks[0].self_attn).forward).parameters)


def _half(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Wan's attention functions run in half precision: statistics see q and k as the attention does
    return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(dtype)


def _noop():
    return None


@dataclass
class _Part:
    """One chunk of an evaluation: its queries are tokens ``[lo, hi)`` of the call's."""

    evaluation: Evaluation
    lo: int
    hi: int
    kind: str  # "denoise" or "context"
    prompt_blocks: int = 1  # prompts per video this evaluation's cross-attention splits its tokens among

    @property
    def writer(self) -> str:
        return "context" if self.kind == "context" else f"step {self.evaluation.step}"


class _CausalSession:
    """The taps and hooks of one recording of a causal Wan model (see the module docstring)."""

    def __init__(self, model, recorder, design: CacheDesign, branch_order: Sequence[str], context_timestep: float):
        self.recorder, self.design, self.context_timestep = recorder, design, context_timestep
        self.branch_order = tuple(branch_order)
        self.info = describe_model(model, model_type="causal-wan")
        self.tracker = PipelineTracker(recorder, self.info, self.branch_order)
        self.observer = KVCacheObserver()
        self.parts: List[_Part] = []
        self.caches: Dict[int, str] = {}  # id of a pipeline's cache (its block-0 dict) -> branch
        self.branch, self.progressed, self.last = "cond", False, None
        self.calls = 0  # self-attention calls logged in this take: one call, one "call" number in its events
        self.prompt_ids: Dict[int, int] = {}  # content signature of a prompt embedding -> its number in this take
        self.cache, self.start, self.module = None, 0, None
        attn_type, cross_type = type(model.blocks[0].self_attn), type(model.blocks[0].cross_attn)
        self.self_mod, self.cross_mod = sys.modules[attn_type.__module__], sys.modules[cross_type.__module__]
        missing = missing_functions(self.self_mod, ("attention",)) + missing_functions(self.cross_mod,
                                                                                        ("flash_attention",))
        if missing:
            raise TypeError(f"{design.projects}: the model's modules lack {missing}, which record() taps")
        attn_mod = sys.modules.get(getattr(self.cross_mod.flash_attention, "__module__", ""), self.cross_mod)
        # Wan's own attention module says whether flash-attn is there (its flash_attention asserts otherwise); a
        # module without those flags has a flash_attention that runs as it is
        flags = [getattr(attn_mod, n) for n in ("FLASH_ATTN_2_AVAILABLE", "FLASH_ATTN_3_AVAILABLE")
                 if hasattr(attn_mod, n)]
        self.have_flash = any(flags) if flags else True
        self.attention, self.flash = self.self_mod.attention, self.cross_mod.flash_attention
        self.rope = getattr(self.self_mod, "causal_rope_apply", None)  # the tiny test model has no RoPE
        self.rope_signature = inspect.signature(self.rope) if self.rope is not None else None
        self.self_signature = inspect.signature(attn_type.forward)

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
        if self.rope is not None:
            patches.replace(self.self_mod, "causal_rope_apply", self.tapped_rope)

    # -- the taps ---------------------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return (bool(self.parts) and self.tracker.block is not None and self.cache is not None
                and self.recorder.active is not None)

    def tapped_rope(self, *args, **kwargs):
        out = self.rope(*args, **kwargs)
        if self.recording:
            a = self.rope_signature.bind(*args, **kwargs).arguments
            x = next(iter(a.values()))  # the tensor rotated: the function's first parameter
            self.observer.observe_rope(self.slot, x, out, int(a.get("start_frame", 0)),
                                       self.parts[0].evaluation.grid.frame_tokens)
        return out

    @property
    def slot(self):
        return self.tracker.block, self.branch

    def tapped_attention(self, q, k, v, *args, **kwargs):
        if not self.recording:
            return self.attention(q, k, v, *args, **kwargs)
        ft = self.parts[0].evaluation.grid.frame_tokens
        dtype = kwargs.get("dtype", torch.bfloat16)
        design, module, buf = self.design, self.module, self.cache.get("k")
        sink, pinned = design.sink(module, self.cache, ft), design.pinned(module, self.cache, ft)
        writers = [p.writer for p in self.parts for _ in range((p.hi - p.lo) // ft)]
        key_frames, event = self.observer.observe(
            self.slot, k, q.shape[1], self.start, ft, writers,
            sink_keys=None if sink is None or buf is None else buf[:, sink[0]:sink[1]],
            pinned_keys=None if pinned is None or buf is None else buf[:, pinned[0]:pinned[1]],
            sink_configured=design.sink_configured(module))
        block, active, tracker = self.tracker.block, self.recorder.active, self.tracker
        qh, kh = _half(q, dtype), _half(k, dtype)
        call, self.calls = self.calls, self.calls + 1
        for part in self.parts:
            ev = part.evaluation
            entry = dict(event, block=block, chunk=ev.chunk, step=ev.step, branch=self.branch, call=call,
                         query_frames=list(range(ev.chunk, ev.chunk + ev.grid.frames)), **{"pass": part.kind})
            anomaly = cache_anomaly(key_frames, ev.chunk)
            if anomaly:
                entry["anomaly"] = anomaly
            active.log_kv(entry)
            layout = KeyLayout(q_offset=k.shape[1] - q.shape[1] + part.lo, frame_tokens=ft, key_frames=key_frames)
            tracker.begin_evaluation(ev)
            tracker.enter_block(block, (SELF,))
            tracker.tap_bsnd(qh[:, part.lo:part.hi], kh, _noop, layout=layout, kind=SELF)
        return self.attention(q, k, v, *args, **kwargs)

    def tapped_flash(self, q, k, v, *args, **kwargs):
        def attend():
            if self.have_flash:
                return self.flash(q, k, v, *args, **kwargs)
            return sdpa_attention(q, k, v, *args, **kwargs)
        block = self.tracker.block
        if not self.parts or block is None or self.recorder.active is None:
            return attend()
        if self.parts[0].prompt_blocks != 1:
            return attend()  # a pass over several prompt blocks: skipped and said so (forward_pre)
        dtype = kwargs.get("dtype", torch.bfloat16)
        qh, kh = _half(q, dtype), _half(k, dtype)
        for part in self.parts:
            self.tracker.begin_evaluation(part.evaluation)
            self.tracker.enter_block(block, self.info.cross_kinds)
            self.tracker.tap_bsnd(qh[:, part.lo:part.hi], kh, _noop)
        return attend()

    # -- the hooks --------------------------------------------------------------------------------------------
    def self_pre(self, i, module, args, kwargs):
        a = self.self_signature.bind(module, *args, **kwargs).arguments
        self.cache, self.start, self.module = a.get("kv_cache"), int(a.get("current_start") or 0), module
        self.tracker.enter_block(i, (SELF,))
        self.observer.begin_call(self.slot)

    def self_post(self, module, args, output):
        self.tracker.leave_block()
        self.cache = None

    def forward_pre(self, module, args, kwargs):
        self.parts = []
        kv = kwargs.get("kv_cache")
        if kv is None:  # training-style full-sequence forward: not a KV-cache evaluation
            return
        x = kwargs.get("x", args[0] if args else None)
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        if isinstance(kv[0], dict) and kv[0].get("quantized"):
            raise ValueError(f"{self.design.projects}: a quantized KV cache changes the keys on every read, so the "
                             "frames it holds cannot be identified: record with the unquantized cache")
        prompt_blocks = self._prompt_blocks(context, len(x))
        pt, ph, pw = self.info.patch_size
        f, h, w = (x[0] if isinstance(x, (list, tuple)) else x).shape[-3:]
        grid = Grid(f // pt, h // ph, w // pw)
        start = int(kwargs.get("current_start") or 0) // grid.frame_tokens
        context_pass = bool(self.design.context_argument and kwargs.get(self.design.context_argument))
        self._generation(kv, start, context_pass or abs(timestep_of(t) - self.context_timestep) < 1e-6)
        prompts = self._prompt_numbers(context, prompt_blocks)  # once per evaluation, whatever its chunks
        block = self.design.block_frames(module.blocks[0].self_attn) if self.design.window_blocks else grid.frames
        if context_pass or grid.frames % block:
            block = grid.frames
        per_frame = t.reshape(t.shape[0], -1) if isinstance(t, torch.Tensor) and t.dim() > 1 else None
        for lo in range(0, grid.frames, block):
            ts = timestep_of(t if per_frame is None or per_frame.shape[1] != grid.frames else per_frame[:, lo:lo + block])
            kind = "context" if context_pass or abs(ts - self.context_timestep) < 1e-6 else "denoise"
            ev = self.tracker.new_evaluation(ts, len(x), Grid(block, grid.height, grid.width), start + lo, self.branch)
            self.parts.append(_Part(ev, lo * grid.frame_tokens, (lo + block) * grid.frame_tokens, kind,
                                    prompt_blocks))
            if self.recorder.active is not None and ev.step is not None:
                self.recorder.active.step_pass.setdefault(ev.step, kind)
                per_branch = self.recorder.active.chunk_prompts.setdefault(ev.chunk, {})
                seen = per_branch.setdefault(self.branch, [])
                seen.extend(i for i in prompts if i not in seen)
        self.tracker.begin_evaluation(self.parts[0].evaluation)

    def _prompt_blocks(self, context, videos: int) -> int:
        """Prompts per video of an evaluation. LongLive's passes over ``initial_latent`` (image-to-video, video
        extension) give every prompt block at once and its cross-attention splits the call's tokens among them: that
        cross-attention is not recorded (its text keys differ along the queries), and the take says so; the
        self-attention and the KV log are. The generation always goes on as the model runs it."""
        if context is None or len(context) == videos:
            return 1
        blocks = len(context) // videos if videos and len(context) % videos == 0 else 0
        take = self.recorder.active
        if take is not None:
            take.not_recorded.setdefault(
                "cross-attention of passes with several prompts per video",
                f"{self.design.projects}: a pass gave {len(context)} prompt embeddings for {videos} video(s) "
                "(LongLive's initial_latent passes give every prompt block at once and split the chunk's tokens "
                "among them); its cross-attention is not recorded, its self-attention and KV-cache log are")
        return blocks

    def _prompt_numbers(self, context, prompt_blocks: int) -> List[int]:
        """The numbers of an evaluation's prompt embeddings, for the take's ``chunk_prompts`` (per chunk and branch):
        numbered by content in order of first use, so chunks under one prompt share a number."""
        if self.recorder.active is None or not isinstance(context, (torch.Tensor, list, tuple)):
            return []
        ids = []
        for row in list(context)[:max(prompt_blocks, 1)]:  # the first video's prompts (videos share the schedule)
            sig = self.observer.frame_signatures(row.detach().reshape(1, -1), 1)[0]  # equal bytes, equal number
            ids.append(self.prompt_ids.setdefault(sig, len(self.prompt_ids)))
        return ids

    def _generation(self, kv, chunk: int, context_pass: bool) -> None:
        """Which branch this evaluation is (its cache), and whether it starts another video: a cache that empties
        again (``global_end_index`` back to 0) or, for caches without that index (CausVid), a chunk earlier than the
        last one."""
        first = kv[0] if isinstance(kv[0], dict) else {}
        end = first.get("global_end_index")
        kind = "context" if context_pass else "denoise"
        empty = end is not None and int(end.reshape(-1)[0]) == 0
        if end is not None:
            new = empty and self.progressed
            self.progressed = self.progressed or not empty
        else:
            new = _new_generation(self.last, (chunk, kind))
        if new and self.recorder.active is not None:
            # a second video inside one record() block: it gets a take of its own (recorder.takes), never merged
            self.recorder.end_pass()
            self.recorder.begin_pass(None, self.info)
            self.tracker = PipelineTracker(self.recorder, self.info, self.branch_order)
            self.observer = KVCacheObserver()
            self.caches, self.progressed = {}, False  # its cache is empty (or, CausVid's, starts over)
            self.calls, self.prompt_ids = 0, {}
        self.last = (chunk, kind)
        self.branch = self.caches.setdefault(id(first), self.branch_order[len(self.caches) % len(self.branch_order)])
        if self.recorder.active is not None:
            self.recorder.active.kv_design = {"design": self.design.name, "projects": self.design.projects}


@contextmanager
def attach(model, recorder, branch_order: Sequence[str] = ("cond", "uncond"), context_timestep: float = 0.0):
    """Record ``model`` while the block runs (see the module docstring); yields the recorder.

    ``branch_order``: the branch of each KV cache the pipeline passes, in order of first use (Self-Forcing, CausVid
    and Rolling Forcing keep one: ``cond``; LongLive's CFG keeps a positive and a negative one).
    ``context_timestep``: the timestep of the pass that refills the cache with the clean chunk (the projects'
    ``context_noise``, 0 by default); evaluations at it are labelled ``"context"`` in ``take.step_pass``.
    """
    design = design_of(model)
    if design is None:
        raise TypeError(describe_refusal(model))
    session = _CausalSession(model, recorder, design, branch_order, context_timestep)
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
    at ``path`` (see :func:`.projects.project_modules`)."""
    with project_modules(path, "self-forcing") as mods:
        yield mods
