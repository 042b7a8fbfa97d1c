"""The tap: receives each attention call, returns the original output unchanged, and records statistics.

A :class:`Recorder` holds a :class:`RecordingPlan` and a short history of :class:`~.take.Take` objects, one per
generation. Each take is found again by the fingerprint of the latent its last pass produced, so a node downstream of
a sampler always reads the recording of exactly that sampler output, whatever ComfyUI cached or re-ran.
"""
from __future__ import annotations

import hashlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..model_info import ModelInfo
from ..plan import RecordingPlan
from .budget import IMAGE_TOKENS, BudgetError  # noqa: F401  (names users import from here)
from .call import CROSS_IMAGE, CROSS_TEXT, SELF, AttentionCall
from .steps import continues
from .passes import Attachments
from .take import Take



def fingerprint(latent: torch.Tensor) -> str:
    """Content hash of a latent tensor: identifies which sampler output a take belongs to."""
    t = latent.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha1(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class Recorder:
    """Taps attention calls for a plan; a handle shared by every model the plan is attached to."""

    def __init__(self, plan: RecordingPlan, keep_takes: int = 4):
        if not isinstance(plan, RecordingPlan):
            raise TypeError(f"Recorder needs a RecordingPlan, got {type(plan).__name__}")
        self.plan = plan
        self.keep_takes = max(1, int(keep_takes))
        self.takes: List[Take] = []
        self.active: Optional[Take] = None
        self.released: List[str] = []  # output fingerprints of takes released to stay within the memory budget
        self.attached = Attachments()  # the models it is attached to (two: Wan 2.2 A14B experts)

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model_options on every clone; the recorder is a shared handle, never duplicated.
        return self

    # -- passes ------------------------------------------------------------------------------------
    def begin_pass(self, sigmas: Optional[Sequence[float]], model, input_fingerprint: Optional[str] = None,
                   sampling: Optional[dict] = None, weights: Optional[int] = None) -> Take:
        """Start a sampling pass; it continues the latest take when it starts where that one stopped.

        ``sampling`` (seed, cfg, ...) describes the sampler; the first pass's values are kept. ``sigmas=None``
        (a pipeline whose schedule is not known): each new sigma or timestep seen is the next step. ``weights``:
        an identity of the model's weights (passes of different weights in one take are experts, as in Wan 2.2 A14B).
        """
        dynamic = sigmas is None
        sigmas = [] if dynamic else [float(s) for s in sigmas]
        info = model if isinstance(model, ModelInfo) else None
        if info is not None:
            self.plan.check_model(info.num_blocks, info.num_heads)
        prev = self.takes[-1] if self.takes else None
        continuing = (not dynamic and prev is not None and prev.status == "complete" and prev.log.passes
                      and prev.model == (model.as_dict() if isinstance(model, ModelInfo) else dict(model))
                      and continues(prev.log.passes[-1][1], sigmas)
                      and (input_fingerprint is None or input_fingerprint == prev.log.output_fingerprint))
        fork = None
        if not continuing and not dynamic and input_fingerprint is not None:
            fork = self._fork_point(input_fingerprint, sigmas, model)
        if not dynamic and sigmas and sigmas[-1] == 0.0:  # a schedule that ends at sigma 0 is never continued
            first = prev.log.total_steps if continuing else (fork[0].log.passes[fork[1] + 1][0] if fork else 0)
            self.plan.check_schedule(first, len(sigmas) - 1)
        if fork is not None:  # continue the recording of the cached earlier pass, not a new one from step 0
            take = fork[0].truncated(fork[1] + 1)
            self.takes.append(take)
            del self.takes[:-self.keep_takes]
            continuing = True
        elif continuing:
            take = prev
        if continuing:
            take.status = "recording"
            take.collector.budget_checked = False
        else:
            take = Take(self.plan, model)
            take.log.input_fingerprint = input_fingerprint
            take.log.sampling = dict(sampling or {})
            take.log.dynamic = dynamic
            self.takes.append(take)
            del self.takes[:-self.keep_takes]
        take.budget.make_room = lambda need, t=take: self.make_room(t, need)
        # a dynamic pass has no scheduled steps; locate() numbers its steps as they come
        take.log.attached = self.attached
        take.log.begin(None if dynamic else sigmas, weights)
        take.collector.seen.clear()
        self.active = take
        return take

    def attach(self, weights: Optional[int], expected: Optional[int] = None) -> None:
        """A model of these weights records into this recorder (Attach Attention Recorder, ``share_recorder``);
        ``expected``: how many models the graph attaches to it in all."""
        self.attached.add(weights)
        if expected is not None:
            self.attached.expected = expected

    def _fork_point(self, input_fingerprint: str, sigmas: Sequence[float], model) -> Optional[Tuple[Take, int]]:
        """(take, pass index) of a kept take whose pass (not its last) produced ``input_fingerprint`` and ended where
        ``sigmas`` begins: this pass samples again what followed it."""
        key = model.as_dict() if isinstance(model, ModelInfo) else dict(model)
        for take in reversed(self.takes):
            if take.model != key or take.status != "complete":
                continue
            for i, out in enumerate(take.log.outputs[:-1]):
                if out == input_fingerprint and continues(take.log.passes[i][1], sigmas):
                    return take, i
        return None

    def make_room(self, take: Take, need: int) -> None:
        """Release the oldest other recordings until ``take`` can hold ``need`` bytes within the memory budget: every
        recording the recorder keeps counts against ``memory_budget_mb`` (a released one is an error downstream that
        says so, never a stale map)."""
        budget = self.plan.memory_budget_bytes
        others = [t for t in self.takes if t is not take]
        while others and need + sum(t.budget.reserved for t in others) > budget:
            old = others.pop(0)
            self.takes.remove(old)
            if old.log.output_fingerprint:
                self.released.append(old.log.output_fingerprint)
                del self.released[:-64]

    def end_pass(self, output_fingerprint: Optional[str] = None, error: Optional[BaseException] = None) -> Optional[Take]:
        take, self.active = self.active, None
        if take is None:
            return None
        take.finish_pass(ok=error is None, error=None if error is None else f"{type(error).__name__}: {error}")
        take.log.outputs.append(output_fingerprint if error is None else None)
        if output_fingerprint is not None and error is None:
            take.log.output_fingerprint = output_fingerprint
        return take

    def locate(self, sigma: float) -> Tuple[Optional[int], bool]:
        """Global step of a model evaluation at ``sigma`` in the active pass, and whether it is the step's own sigma."""
        if self.active is None or not self.active.log.passes:
            return None, False
        return self.active.log.locate(sigma)

    # -- the tap -------------------------------------------------------------------------------------
    def wants(self, call: AttentionCall, exact_step: bool = True) -> bool:
        take, p = self.active, self.plan
        if take is None or not p.wants_step(call.step) or not p.wants_block(call.block):
            return False
        if not any(b in call.branches for b in p.branch_names()):
            return False
        if call.kind == CROSS_TEXT:
            needed = p.record_cross or p.record_image_context
        elif call.kind == CROSS_IMAGE:
            needed = p.record_image_context
        else:
            needed = call.kind == SELF and (p.record_sink_stats or p.window is not None)
        if not needed:
            return False
        if not exact_step:
            take.skipped["evaluations_between_steps"] += 1
            return False
        key = (call.step, call.block, call.kind, call.branches, call.chunk)
        if key in take.collector.seen:
            take.skipped["repeated_evaluations"] += 1
            return False
        take.collector.seen.add(key)
        return True

    def tap(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, attend: Callable[[], torch.Tensor],
            exact_step: bool = True, attend_lse: Optional[Callable[[], tuple]] = None) -> torch.Tensor:
        """Run ``attend()`` (the model's own attention) and return its output untouched, recording on the side.

        ``attend_lse``: the same attention returning ``(output, lse or None)`` with an output bit-identical to
        ``attend()``'s (see :mod:`wan_capture.lse_attention`); used for self-attention sink statistics, which then
        need a single sweep over the keys.
        """
        wanted = self.wants(call, exact_step)
        lse = None
        if wanted and attend_lse is not None and call.kind == SELF and self.plan.record_sink_stats:
            out, lse = attend_lse()
        else:
            out = attend()
        if wanted:
            # statistics in their own precision whatever the host's autocast (the model's call above ran under it)
            with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
                self.active.record(call, q.detach(), k.detach(), lse)
        return out

    def find(self, output_fingerprint: str) -> Optional[Take]:
        """The take of a LATENT: a take's last output or one of its aliases (after TrimVideoLatent), or an earlier
        pass's output (Wan 2.2 A14B's first expert), which gives the recording up to that pass."""
        for take in reversed(self.takes):
            if take.log.output_fingerprint == output_fingerprint or output_fingerprint in take.log.aliases:
                return take
            earlier = [i for i, out in enumerate(take.log.outputs[:-1]) if out == output_fingerprint]
            if earlier and take.status == "complete":
                return take.truncated(earlier[-1] + 1)
        return None

    @property
    def latest(self) -> Optional[Take]:
        return self.takes[-1] if self.takes else None
