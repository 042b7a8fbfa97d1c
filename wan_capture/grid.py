"""Latent token geometry: frames x height x width after the DiT's 1x2x2 patchify, and pooling on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

PATCH = (1, 2, 2)  # Wan's DiT patchify (time, height, width)


@dataclass(frozen=True)
class Grid:
    """The token grid a Wan self-attention sees: ``tokens = frames * height * width``, frame-major."""

    frames: int
    height: int
    width: int

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    def as_list(self):
        return [self.frames, self.height, self.width]

    @classmethod
    def from_latent(cls, shape: Sequence[int], patch: Tuple[int, int, int] = PATCH) -> "Grid":
        """Grid of a latent ``[B, C, T, H, W]`` (padded up to the patch size, as the model pads)."""
        t, h, w = shape[-3:]
        return cls(-(-t // patch[0]), -(-h // patch[1]), -(-w // patch[2]))

    def pooled(self, factor: int) -> "Grid":
        return Grid(self.frames, -(-self.height // factor), -(-self.width // factor))


def pool_spatial(maps: torch.Tensor, grid: Grid, factor: int) -> torch.Tensor:
    """Average ``[..., tokens, T]`` maps over ``factor x factor`` spatial cells of each frame.

    Edge cells that the grid does not fill are averaged over the tokens they hold, so the mean is exact.
    """
    if factor == 1:
        return maps
    lead, (n, t) = maps.shape[:-2], maps.shape[-2:]
    if n != grid.tokens:
        raise ValueError(f"maps have {n} tokens but the grid {grid.as_list()} has {grid.tokens}")
    x = maps.reshape(-1, grid.frames, grid.height, grid.width, t).permute(0, 1, 4, 2, 3)
    x = x.reshape(-1, 1, grid.height, grid.width)
    ph, pw = (-grid.height) % factor, (-grid.width) % factor
    ones = torch.ones(1, 1, grid.height, grid.width, dtype=x.dtype, device=x.device)
    sums = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (0, pw, 0, ph)), factor, divisor_override=1)
    counts = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(ones, (0, pw, 0, ph)), factor, divisor_override=1)
    pooled = grid.pooled(factor)
    out = (sums / counts).reshape(-1, grid.frames, t, pooled.height, pooled.width).permute(0, 1, 3, 4, 2)
    return out.reshape(*lead, pooled.tokens, t)


def pixel_frame_count(latent_frames: int, time_stride: int = 4) -> int:
    """Decoded frames of a latent with ``latent_frames`` frames: frame 0, then ``time_stride`` per latent frame."""
    return 0 if latent_frames < 1 else time_stride * (latent_frames - 1) + 1


def latent_frame_of(pixel_frame: int, latent_frames: int, time_stride: int = 4) -> int:
    """Latent frame that produced decoded frame ``pixel_frame``: 0 -> 0, t >= 1 covers pixel frames 4t-3..4t."""
    t = 0 if pixel_frame <= 0 else (pixel_frame - 1) // time_stride + 1
    return min(t, latent_frames - 1)
