"""Which latent frames the model saw are frames of the decoded video: reference and context frames set aside.

Wan models may see more frames along time than the video they produce:

* VACE reference images (``WanVaceToVideo`` with ``reference_image``) are encoded and put *in front of* the latent;
  the sampler's output keeps them and ``TrimVideoLatent`` drops them before decoding. In the model's
  ``vace_context`` a reference frame is all zeros past its first 16 channels (its "reactive" half is the latent of
  zeros and its mask is 0), which no video frame is (its reactive half encodes the control video plus 0.5).
* Context frames that never reach the output latent: the reference latent of models with ``ref_conv`` (Wan 2.2 Fun
  control) goes in front, Phantom's ``time_dim_concat`` subject images and HuMo's reference frames go at the end
  (``context_streams`` in the summary names them).

Attention is recorded over every frame the model saw; alignment with decoded frames leaves these out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..grid import pixel_frame_count


@dataclass(frozen=True)
class TimeLayout:
    """Latent frames of the recording that are not video frames: ``reference`` (VACE, in front, in the sampler's
    output until TrimVideoLatent), ``lead``/``trail`` (context the model saw, never in its output)."""

    reference: int = 0
    lead: int = 0
    trail: int = 0
    lead_stream: str = ""  # what the lead / trail frames are (their token stream), for the summary
    trail_stream: str = ""

    def as_meta(self) -> dict:
        meta = {"reference_latent_frames": self.reference, "context_latent_frames": [self.lead, self.trail]}
        if self.lead_stream or self.trail_stream:
            meta["context_streams"] = [self.lead_stream, self.trail_stream]
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> "TimeLayout":
        lead, trail = meta.get("context_latent_frames") or (0, 0)
        lead_stream, trail_stream = meta.get("context_streams") or ("", "")
        return cls(int(meta.get("reference_latent_frames") or 0), int(lead), int(trail), str(lead_stream),
                   str(trail_stream))


def vace_reference_frames(vace_context) -> int:
    """Leading reference frames in a VaceWanModel's ``vace_context`` ``[B, n, 96, T, H, W]`` (or ``[B, 96, T, H, W]``)."""
    if vace_context is None or not hasattr(vace_context, "shape") or vace_context.dim() < 5:
        return 0
    v = vace_context if vace_context.dim() == 6 else vace_context[:, None]
    rest = v[:, :, 16:]  # reactive latent + mask: exactly 0 for a reference frame
    zero = (rest == 0).transpose(2, 3).flatten(3).all(dim=3).all(dim=0).all(dim=0)  # [T]
    n = 0
    for z in zero.tolist():
        if not z:
            break
        n += 1
    return n if n < zero.numel() else 0  # all zero: no control video at all, not references


def video_maps(maps: np.ndarray, meta: dict, frames: Optional[int], time_stride: int = 4) -> np.ndarray:
    """``[N, F, ...]`` maps over the latent frames the model saw -> the latent frames of the video being shown.

    ``frames``: the decoded frame count (or a latent frame count, one map each), None for the video as trimmed.
    Context frames are always left out; VACE reference frames are left out unless ``frames`` says they were
    decoded too. A count that no layout explains is an error, never a silent shift.
    """
    layout = TimeLayout.from_meta(meta)
    f = maps.shape[1]
    maps = maps[:, layout.lead:f - layout.trail]
    f = maps.shape[1]
    r = layout.reference
    if frames is None:
        return maps[:, r:]
    if frames in (f, pixel_frame_count(f, time_stride)):
        return maps
    if r and frames in (f - r, pixel_frame_count(f - r, time_stride)):
        return maps[:, r:]
    trimmed = f" or {pixel_frame_count(f - r, time_stride)} after TrimVideoLatent drops its {r} reference frame(s)" \
        if r else ""
    raise ValueError(f"time mismatch: {frames} frames were given, but this recording's {f} video latent frames decode "
                     f"to {pixel_frame_count(f, time_stride)}{trimmed}. Connect the frames decoded from the same "
                     "sampler output (before any frame interpolation or trimming of your own)")
