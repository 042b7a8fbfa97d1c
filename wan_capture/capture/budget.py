"""The host memory a recording may take: sized before anything is allocated, refused with the size it needs."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

from ..grid import Grid
from ..plan import RecordingPlan
from ..stats.statistics import window_bytes

IMAGE_TOKENS = 257  # CLIP-vision tokens of Wan i2v (1 class + 16 x 16 patches): sizes the budget before the call
MIB = 1024 * 1024


class BudgetError(MemoryError):
    """Recording would exceed the plan's memory budget; raised before anything is allocated."""


def bytes_per_step(plan: RecordingPlan, num_blocks: int, num_heads: int, grid: Grid, batch: int,
                   keys: Optional[int] = None, window: Optional[Tuple[int, int]] = None) -> int:
    """Host bytes one recorded step takes: ``keys`` self-attention keys (the grid's tokens unless cached),
    ``window`` the (queries, keys) of the plan's exact window in this call."""
    p = plan
    keys = grid.tokens if keys is None else keys
    key_frames = -(-keys // grid.frame_tokens)
    size = 2 if p.storage_dtype == "float16" else 4
    rows = batch * len(p.branch_names())
    nb, nh = len(p.selected_blocks(num_blocks)), len(p.selected_heads(num_heads))
    sb, sh = (nb if p.store_per_block else 1), (nh if p.store_per_head else 1)
    total = 0
    if p.record_cross:
        positions = sum(len(p.positions(b)) + len(p.sums(b)) for b in p.branch_names())
        total += batch * sb * sh * grid.pooled(p.spatial_downsample_factor).tokens * positions * size
    if p.record_image_context:
        total += rows * sb * sh * (grid.tokens + IMAGE_TOKENS) * size
    if p.record_sink_stats:
        total += rows * sb * sh * (2 * keys + grid.frames * key_frames + grid.frames) * size
    if window is not None:
        total += nb * window_bytes(rows, nh, *window)
    return total


class Budget:
    """What one take has reserved against ``plan.memory_budget_mb``; ``make_room(need)`` (the recorder's) may release
    older recordings first."""

    def __init__(self, plan: RecordingPlan):
        self.plan, self.reserved = plan, 0
        self.make_room: Optional[Callable[[int], None]] = None

    def reserve(self, need: int, steps: int, grid: Grid, batch: int) -> None:
        """Reserve ``need`` more bytes for ``steps`` steps, or raise BudgetError saying what to change."""
        limit = self.plan.memory_budget_bytes
        if self.make_room is not None:  # older recordings count too: release the oldest to make room
            self.make_room(self.reserved + need)
        if self.reserved + need > limit:
            raise BudgetError(
                f"recording {steps} steps on a {grid.as_list()} latent grid (batch {batch}) needs "
                f"{need / MIB:.1f} MiB of host memory{' more' if self.reserved else ''}, over the "
                f"memory_budget_mb of {limit / MIB:.1f} MiB (already reserved {self.reserved / MIB:.1f} MiB). "
                "Raise memory_budget_mb, or record less: fewer steps (storage_interval), blocks or heads, "
                "store_per_block/store_per_head off, a larger spatial_downsample_factor, or a smaller window.")
        self.reserved += need
