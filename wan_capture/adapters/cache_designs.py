"""The KV-cache designs of the causal Wan projects, one declarative description each.

All of them run Wan blocks whose self-attention calls a module-level ``attention(q, k, v)`` on the current chunk's
queries against the keys it keeps, rotates keys with a module-level ``causal_rope_apply(x, grid_sizes, freqs,
start_frame)`` and calls a module-level ``flash_attention`` for the text. What differs is which keys are kept and
why, and how one model evaluation maps to chunks and steps. A :class:`CacheDesign` says just that, so the adapter
(:mod:`.causal_wan`) observes every project the same way. Which frames a cache really holds is never computed from
the description: it is observed from the keys (:mod:`wan_capture.capture.kv_cache`); the description only says where
to look (the sink and pinned slots) and what the model's arguments mean.

A ``CausalWanModel`` that no description fits is refused before anything runs, with what did not fit.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

Slots = Optional[Tuple[int, int]]  # a token range of the cache buffer, or None


def _none(module, cache, frame_tokens: int) -> Slots:
    return None


def _leading_sink(module, cache, frame_tokens: int) -> Slots:
    n = int(getattr(module, "sink_size", 0) or 0) * frame_tokens
    return (0, n) if n else None


def _anchor_block(module, cache, frame_tokens: int) -> Slots:
    return 0, int(module.block_length)


def _longlive_pinned_state(cache) -> Tuple[int, int]:
    """The pinned region a LongLive cache dict records (``pinned_start`` -1: none)."""
    start, length = cache.get("pinned_start"), cache.get("pinned_len")
    return (int(start.item()) if start is not None else -1), (int(length.item()) if length is not None else 0)


def _longlive_regions(module, cache, frame_tokens: int):
    """``(sink, pinned)`` token ranges as LongLive's self-attention derives them: a global sink of
    ``global_sink_size`` frames, a pinned chunk (multi-shot) at ``pinned_start`` for ``pinned_len`` tokens, and without
    either, the legacy ``sink_size`` frames."""
    # LongLive publishes the pinned region in a module global while it samples, else it is in the cache
    meta = getattr(inspect.getmodule(type(module)), "_CURRENT_GRID_META", None) or {}
    if "pinned_start" in meta:
        start, length = int(meta["pinned_start"]), int(meta["pinned_len"])
    else:
        start, length = _longlive_pinned_state(cache)
    global_sink = int(getattr(module, "global_sink_size", 0) or 0) * frame_tokens
    if start >= 0 and length > 0:
        return ((0, global_sink) if global_sink else None), (start, start + length)
    n = max(global_sink, int(getattr(module, "sink_size", 0) or 0) * frame_tokens)
    return ((0, n) if n else None), None


@dataclass(frozen=True)
class CacheDesign:
    """How one family of causal Wan code keeps its KV cache.

    Fields:
        name: the design's name in the log (``take.kv_design``) and in messages.
        projects: the projects (and their code paths) that use it, for messages and the README.
        parameters: parameters of the self-attention's ``forward`` that identify the design (all required).
        attributes: attributes of the self-attention module that identify it (all required).
        absent: attributes it must not have (tells CausVid's bare self-attention from the others).
        sink: the token range of the cache buffer that holds its sink (or anchor) frames, from the module and the
            block's cache dict; None when there is none now.
        pinned: the token range of a pinned chunk (LongLive's multi-shot sink), None when none is pinned.
        sink_configured: whether the model was told to keep sinks (then a sink that never matters is flagged).
        window_blocks: one evaluation denoises a window of blocks at different timesteps (Rolling Forcing): each
            block of ``block_frames`` frames is recorded as its own chunk at its own timestep.
        context_argument: a ``forward`` argument of the self-attention that marks the cache-refill pass.
    """

    name: str
    projects: str
    parameters: Tuple[str, ...]
    attributes: Tuple[str, ...] = ()
    absent: Tuple[str, ...] = ()
    sink: Callable = _none
    pinned: Callable = _none
    sink_configured: Callable = lambda module: False
    window_blocks: bool = False
    context_argument: Optional[str] = None

    def fits(self, self_attention) -> bool:
        return not self.failed_rules(self_attention)

    def failed_rules(self, self_attention) -> Tuple[str, ...]:
        """The rules of this design that ``self_attention`` breaks, each in words (empty: it fits)."""
        params = inspect.signature(type(self_attention).forward).parameters
        missing = [p for p in self.parameters if p not in params]
        lacking = [a for a in self.attributes if not hasattr(self_attention, a)]
        extra = [a for a in self.absent if hasattr(self_attention, a)]
        return tuple(([f"forward lacks {missing}"] if missing else [])
                     + ([f"the module lacks the attributes {lacking}"] if lacking else [])
                     + ([f"the module has {extra}, which this design's code never sets"] if extra else []))

    def block_frames(self, self_attention) -> int:
        """Frames per block of a window design (Rolling Forcing: ``block_length // frame_length``)."""
        return int(self_attention.block_length) // int(self_attention.frame_length)


DESIGNS: Tuple[CacheDesign, ...] = (
    CacheDesign(
        "rolling anchor", "Rolling Forcing (wan/), Causal-Forcing (long_video/wan/)",
        parameters=("kv_cache", "current_start", "cache_start", "updating_cache"),
        attributes=("block_length", "frame_length", "max_attention_size"),
        sink=_anchor_block, sink_configured=lambda m: True, window_blocks=True, context_argument="updating_cache"),
    CacheDesign(
        "global, pinned and rolling sinks", "LongLive (wan_5b/modules/causal_model.py)",
        parameters=("kv_cache", "current_start", "cache_start", "use_relative_rope"),
        attributes=("sink_size", "global_sink_size", "max_attention_size"),
        sink=lambda m, c, ft: _longlive_regions(m, c, ft)[0], pinned=lambda m, c, ft: _longlive_regions(m, c, ft)[1],
        sink_configured=lambda m: bool(getattr(m, "sink_size", 0) or getattr(m, "global_sink_size", 0))),
    CacheDesign(
        "sink and rolling window", "Self-Forcing (wan/), Causal-Forcing (wan/)",
        parameters=("kv_cache", "current_start", "cache_start"), attributes=("sink_size", "local_attn_size"),
        sink=_leading_sink, sink_configured=lambda m: bool(getattr(m, "sink_size", 0))),
    CacheDesign(
        "global cache", "CausVid (causvid/models/wan/causal_model.py)",
        parameters=("kv_cache", "current_start", "current_end"), absent=("sink_size", "local_attn_size")),
)


def describe_refusal(model) -> str:
    """Why ``model`` is not a causal Wan that a design fits (empty when one does)."""
    blocks = getattr(model, "blocks", None)
    if type(model).__name__ != "CausalWanModel" or not blocks:
        return f"{type(model).__name__} is not a causal Wan model (CausalWanModel with blocks)"
    attn = blocks[0].self_attn
    if design_of(model) is not None:
        return ""
    if type(model).__module__.startswith("comfy.ldm.wan") and callable(getattr(model, "forward_block", None)):
        return (f"{type(model).__module__}.{type(model).__name__} is ComfyUI's own causal Wan: it is recorded inside "
                "ComfyUI, by the Attach Attention Recorder node on the MODEL that the ar_video sampler "
                "(SamplerARVideo) samples, not by wan_capture.record()")
    params = list(inspect.signature(type(attn).forward).parameters)[1:]
    # per design, the rules that failed: the closest design (fewest failures) first
    failed = sorted(((d, d.failed_rules(attn)) for d in DESIGNS), key=lambda df: len(df[1]))
    why = "; ".join(f"not {d.projects} ({d.name}): {', '.join(rules)}" for d, rules in failed)
    return (f"{type(attn).__module__}.{type(attn).__name__} (forward{tuple(params)}) matches no known KV-cache "
            f"design: {why}. For another cache, call wan_capture.CausalRecorder.tap from its self-attention")


def design_of(model) -> Optional[CacheDesign]:
    """The design a ``CausalWanModel`` uses, or None."""
    blocks = getattr(model, "blocks", None)
    if type(model).__name__ != "CausalWanModel" or not blocks or not hasattr(blocks[0], "self_attn"):
        return None
    attn = blocks[0].self_attn
    for design in DESIGNS:
        if design.fits(attn):
            return design
    return None


def missing_functions(module, names: Sequence[str]) -> Sequence[str]:
    """The module-level functions of ``names`` that ``module`` lacks."""
    return [n for n in names if not callable(getattr(module, n, None))]
