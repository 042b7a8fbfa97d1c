"""The identity of one attention call: which block, which kind, which step, which rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..grid import Grid
from ..stats.statistics import KeyLayout

SELF, CROSS_TEXT, CROSS_IMAGE = "self", "cross_text", "cross_image"
KINDS = (SELF, CROSS_TEXT, CROSS_IMAGE)
# attention calls a model makes that are known and deliberately not recorded, with what the summary says of them
CROSS_AUDIO = "cross_audio"
NOT_RECORDED = {CROSS_AUDIO: "audio cross-attention (HuMo): its keys are audio tokens, grouped per frame; not recorded"}


@dataclass(frozen=True)
class AttentionCall:
    """Everything the recorder needs to file one attention call.

    ``branches`` labels each batch row ``"cond"`` or ``"uncond"``; ``step`` is the global sampling step;
    ``layout`` places queries among keys (KV cache offset, causal mask, absolute key frames) for causal models;
    ``chunk`` is then the absolute latent frame of the chunk's first query frame (``grid`` is the chunk's grid).
    """

    block: int
    kind: str
    step: int
    sigma: float
    branches: Tuple[str, ...]
    grid: Grid
    heads: int
    timestep: Optional[float] = None
    layout: KeyLayout = field(default_factory=KeyLayout)
    scale: Optional[float] = None  # None: 1/sqrt(head_dim), what SDPA uses
    chunk: Optional[int] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"AttentionCall.kind must be one of {KINDS}, got {self.kind!r}")
        bad = [b for b in self.branches if b not in ("cond", "uncond")]
        if bad:
            raise ValueError(f"AttentionCall.branches must be 'cond'/'uncond' labels, got {bad}")


def branch_rows(cond_or_uncond, batch: int) -> Tuple[str, ...]:
    """Per-row branch labels of a ComfyUI batch: ``cond_or_uncond`` lists chunks (0 = cond, 1 = uncond)."""
    chunks = list(cond_or_uncond or [0])
    if batch % len(chunks):
        raise ValueError(f"batch of {batch} rows does not split into {len(chunks)} cond/uncond chunks")
    per = batch // len(chunks)
    return tuple(("uncond" if c == 1 else "cond") for c in chunks for _ in range(per))
