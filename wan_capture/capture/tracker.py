"""The one call tracker: which evaluation, block and kind an attention call belongs to, for every host.

A host adapter (ComfyUI's patch, the official Wan code, diffusers, causal Wan) tells the tracker three things as the
model runs: a model evaluation begins (its step, sigma, cond/uncond rows and latent grid, and for causal Wan the
chunk), a block begins (its index and the kinds of its attention calls in order), and an attention call happens
(q, k and the model's own attention as a callable). The tracker builds the :class:`AttentionCall` and hands it to
:meth:`Recorder.tap`, the only entry to the statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from .call import CROSS_IMAGE, CROSS_TEXT, NOT_RECORDED, SELF, AttentionCall
from ..grid import Grid
from ..model_info import ModelInfo
from .budget import IMAGE_TOKENS
from .recorder import Recorder
from ..stats.statistics import KeyLayout


def cross_kind(keys: int) -> str:
    """Which context a cross-attention call of an i2v block attends to, from its key count: the CLIP-vision tokens
    come in whole images of 257 (one for i2v, two for FLF2V); the umt5 text context is 512 long, no such multiple."""
    return CROSS_IMAGE if keys % IMAGE_TOKENS == 0 else CROSS_TEXT


@dataclass
class Evaluation:
    """The model evaluation in flight."""

    step: Optional[int]
    exact: bool
    sigma: float
    timestep: Optional[float]
    branches: Tuple[str, ...]
    grid: Grid
    chunk: Optional[int] = None  # causal Wan: absolute latent frame of the chunk's first query frame
    inputs: Tuple[str, ...] = ()  # extra conditioning inputs the host saw (named when tokens do not fit the grid)


class UnknownTokensError(ValueError):
    """A model's attention calls carry tokens the latent grid does not explain (a token stream the recorder does
    not know): refused, since recording them would label those tokens as video frames."""


class CallTracker:
    """Tracks evaluations, blocks and call positions; every attention call goes through :meth:`tap`.

    ``kinds``: the kinds of a block's attention calls in call order (Wan: self, [image cross], text cross).
    """

    def __init__(self, recorder: Recorder, info: ModelInfo, kinds: Sequence[str] = (SELF, CROSS_TEXT)):
        self.recorder, self.info, self.kinds = recorder, info, tuple(kinds)
        self.evaluation: Optional[Evaluation] = None
        self.block: Optional[int] = None
        self.block_kinds: Tuple[str, ...] = self.kinds
        self.calls = 0

    # -- evaluations and blocks ------------------------------------------------------------------------
    def locate(self, sigma: float) -> Tuple[Optional[int], bool]:
        """Step of an evaluation at ``sigma`` in the recorder's active pass (and whether it is exact)."""
        return self.recorder.locate(sigma)

    def begin_evaluation(self, evaluation: Evaluation) -> None:
        self.evaluation, self.block = evaluation, None

    def end_evaluation(self) -> None:
        self.evaluation, self.block = None, None

    def enter_block(self, block: int, kinds: Optional[Sequence[str]] = None) -> None:
        """A block (or one attention module of it, with its own ``kinds``) starts: call positions restart."""
        self.block, self.calls = block, 0
        self.block_kinds = self.kinds if kinds is None else tuple(kinds)

    def leave_block(self) -> None:
        self.block = None

    @property
    def active(self) -> bool:
        ev = self.evaluation
        return ev is not None and self.block is not None and ev.step is not None and self.recorder.active is not None

    # -- the tap ---------------------------------------------------------------------------------------
    def tap(self, q: torch.Tensor, k: torch.Tensor, heads: int, attend: Callable[[], torch.Tensor],
            layout: Optional[KeyLayout] = None, kind: Optional[str] = None,
            scale: Optional[float] = None, attend_lse: Optional[Callable[[], tuple]] = None) -> torch.Tensor:
        """One attention call, ``q``/``k`` as ``[B, L, heads*head_dim]``: returns ``attend()`` untouched.

        ``kind`` defaults to the call's position in the block; ``layout`` places queries among keys (KV cache);
        ``attend_lse``: the same attention also returning each query's log-sum-exp (see :meth:`Recorder.tap`).
        """
        if not self.active:
            return attend()
        position, self.calls = self.calls, self.calls + 1
        if kind is None:
            kind = self.block_kinds[position] if position < len(self.block_kinds) else None
        if kind in (CROSS_IMAGE, CROSS_TEXT) and CROSS_IMAGE in self.block_kinds:
            kind = cross_kind(k.shape[1])  # hosts may call a block's image and text attention in either order
        if kind == SELF and layout is None and k.shape[1] != q.shape[1]:
            kind = None  # not the self-attention this position should hold: never guess from lengths
        if kind in NOT_RECORDED:  # a known call the plan never records (HuMo's audio): said in the summary
            self.recorder.active.not_recorded.setdefault(kind, NOT_RECORDED[kind])
            return attend()
        if kind is None or q.dim() != 3:
            self.recorder.active.skipped["unrecognised_attention_calls"] += 1
            return attend()
        ev = self.evaluation
        if layout is None and ev.chunk is None and q.shape[1] != ev.grid.tokens:
            raise UnknownTokensError(self._unknown_tokens(q.shape[1], kind))
        call = AttentionCall(block=self.block, kind=kind, step=ev.step, sigma=ev.sigma, branches=ev.branches,
                             grid=ev.grid, heads=int(heads), timestep=ev.timestep,
                             layout=layout if layout is not None else KeyLayout(), chunk=ev.chunk, scale=scale)
        return self.recorder.tap(call, q, k, attend, exact_step=ev.exact, attend_lse=attend_lse)

    def _unknown_tokens(self, tokens: int, kind: str) -> str:
        ev, info = self.evaluation, self.info
        grid = ev.grid
        extra = f"{tokens - grid.tokens:+d} tokens"
        source = (f"from its input(s) {', '.join(ev.inputs)}" if ev.inputs else "from an input the recorder does not "
                  "know")
        return (f"{info.model_type} / {info.diffusion_model}: its {kind} attention carries {tokens} query tokens, but "
                f"the latent grid it was given ({grid.frames}x{grid.height}x{grid.width}) has {grid.tokens}: "
                f"{extra} of a token stream {source}. Recording them would label those tokens as video frames, so "
                "this model (or this input) is not supported by Attach Attention Recorder yet; sample without the "
                "recorder, or without that input")
