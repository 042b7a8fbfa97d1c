"""What the pipeline adapters share: the call tracker with a pipeline's branch order, and one recording pass."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..capture.call import SELF, CROSS_TEXT
from ..grid import Grid
from ..model_info import ModelInfo
from ..capture.recorder import Recorder
from ..capture.tracker import CallTracker, Evaluation


class PipelineTracker(CallTracker):
    """The call tracker for models driven by a pipeline rather than ComfyUI's sampler.

    Pipelines call the model once per branch and step (the official Wan code and diffusers call cond first, then
    uncond): the k-th evaluation at one timestep is ``branch_order[k]``. The step is the timestep's order of first
    appearance; the recorded sigma is the timestep / 1000 (what Wan's flow-matching pipelines pass as timestep).
    """

    def __init__(self, recorder: Recorder, info: ModelInfo, branch_order: Sequence[str] = ("cond", "uncond"),
                 kinds: Sequence[str] = (SELF, CROSS_TEXT)):
        super().__init__(recorder, info, kinds)
        self.order = tuple(branch_order)
        self._evaluations: Dict[Optional[int], int] = {}

    def new_evaluation(self, timestep: float, batch: int, grid: Grid, chunk: Optional[int] = None,
                       branch: Optional[str] = None) -> Evaluation:
        """The evaluation of ``batch`` rows at ``timestep`` (of ``chunk``); ``branch`` None: the branch order's."""
        step, exact = self.locate(timestep / 1000.0)
        if branch is None:
            key = step if chunk is None else (chunk, step)
            k = self._evaluations.get(key, 0)
            self._evaluations[key] = k + 1
            branch = self.order[k % len(self.order)]
        return Evaluation(step, exact, timestep / 1000.0, timestep, (branch,) * batch, grid, chunk)

    def begin_forward(self, timestep: float, batch: int, grid: Grid, chunk: Optional[int] = None) -> Evaluation:
        ev = self.new_evaluation(timestep, batch, grid, chunk)
        self.begin_evaluation(ev)
        return ev

    def tap_bsnd(self, q: torch.Tensor, k: torch.Tensor, attend: Callable[[], torch.Tensor], **kwargs) -> torch.Tensor:
        """``q``/``k`` as ``[B, L, heads, head_dim]`` (the pipelines' layout); padding past the grid is left out."""
        if not self.active:
            return attend()
        b, lq, h, d = q.shape
        q2, k2 = q.reshape(b, lq, h * d), k.reshape(b, k.shape[1], h * d)
        n = self.evaluation.grid.tokens
        kind = self.block_kinds[self.calls] if self.calls < len(self.block_kinds) else None
        if kind == SELF and kwargs.get("layout") is None:  # padded sequences (the official code pads to seq_len)
            q2, k2 = q2[:, :n], k2[:, :n]
        elif q2.shape[1] > n:
            q2 = q2[:, :n]
        return self.tap(q2, k2, h, attend, **kwargs)


def timestep_of(t) -> float:
    """The step's timestep from a model's ``t``/``timestep`` argument ([B] or per-token [B, L]: its maximum)."""
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max())
    return float(t)


class Patches:
    """What an adapter changes for the duration of a recording (module attributes, hooks, processors), undone in
    reverse order by :meth:`undo`, also after an exception."""

    def __init__(self):
        self._undo: List[Callable[[], None]] = []

    def replace(self, owner, name: str, value) -> None:
        """Set ``owner.name`` to ``value``; undo puts the original back."""
        original = getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, original))

    def hook(self, handle) -> None:
        """A torch hook handle, removed on undo."""
        self._undo.append(handle.remove)

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextmanager
def recording_pass(recorder: Recorder, info: ModelInfo, undo: Callable[[], None]):
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
