"""What every adapter shares: the model evaluation in flight, the attention module running, and the tap."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..call import SELF, AttentionCall
from ..grid import Grid
from ..recorder import Recorder


class Session:
    """Identity of attention calls in a model that is not ComfyUI's.

    Pipelines call the model once per branch and step (the official Wan code and diffusers call cond first, then
    uncond): the k-th evaluation at one timestep is ``branch_order[k]``. The step is the timestep's order of first
    appearance; the recorded sigma is the timestep / 1000 (what Wan's flow-matching pipelines pass as timestep).
    """

    def __init__(self, recorder: Recorder, branch_order: Sequence[str] = ("cond", "uncond")):
        self.recorder, self.order = recorder, tuple(branch_order)
        self.grid: Optional[Grid] = None
        self.step: Optional[int] = None
        self.timestep = 0.0
        self.branches: Tuple[str, ...] = ()
        self.block: Optional[int] = None
        self.kinds: Tuple[str, ...] = ()
        self.calls = 0
        self._evaluations: Dict[int, int] = {}

    def begin_forward(self, timestep: float, batch: int, grid: Grid) -> None:
        step, _ = self.recorder.locate(timestep / 1000.0)
        k = self._evaluations.get(step, 0)
        self._evaluations[step] = k + 1
        self.step, self.grid, self.timestep = step, grid, timestep
        self.branches = (self.order[k % len(self.order)],) * batch

    def end_forward(self) -> None:
        self.step = None

    def enter(self, block: int, kinds: Tuple[str, ...]) -> None:
        self.block, self.kinds, self.calls = block, kinds, 0

    def leave(self) -> None:
        self.block = None

    def tap(self, q: torch.Tensor, k: torch.Tensor, attend: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``q``/``k`` as ``[B, L, heads, head_dim]``; returns ``attend()`` untouched."""
        if self.block is None or self.step is None or self.recorder.active is None:
            return attend()
        position, self.calls = self.calls, self.calls + 1
        kind = self.kinds[position] if position < len(self.kinds) else None
        if kind is None:
            return attend()
        b, lq, h, d = q.shape
        q2, k2 = q.reshape(b, lq, h * d), k.reshape(b, k.shape[1], h * d)
        if kind == SELF:  # padded sequences (the official code pads to seq_len): statistics of the real tokens
            n = self.grid.tokens
            q2, k2 = q2[:, :n], k2[:, :n]
        elif q2.shape[1] > self.grid.tokens:
            q2 = q2[:, :self.grid.tokens]
        call = AttentionCall(self.block, kind, self.step, self.timestep / 1000.0, self.branches, self.grid, h,
                             timestep=self.timestep)
        return self.recorder.tap(call, q2, k2, attend)


def timestep_of(t) -> float:
    """The step's timestep from a model's ``t``/``timestep`` argument ([B] or per-token [B, L]: its maximum)."""
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max())
    return float(t)


@contextmanager
def recording_pass(recorder: Recorder, info: dict, undo: Callable[[], None]):
    """One pass of a pipeline: steps numbered as they come, partial on error, and ``undo()`` always run."""
    recorder.begin_pass(None, info)
    try:
        yield recorder
    except BaseException as e:
        recorder.end_pass(error=e)
        raise
    else:
        recorder.end_pass()
    finally:
        undo()
