"""The capture core outside ComfyUI: ``with record(model, plan) as rec: ...`` for the official Wan code and
diffusers' ``WanTransformer3DModel``, and :class:`CausalRecorder` for causal Wan with a KV cache.

The model's own attention computes the output; the model is restored when the block ends, also on error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence, Union

from ..plan import RecordingPlan
from ..recorder import Recorder
from .causal import CausalRecorder


@contextmanager
def record(model, plan: Union[RecordingPlan, Recorder], branch_order: Sequence[str] = ("cond", "uncond")):
    """Record ``model``'s attention while the block runs; yields the :class:`Recorder` (``rec.latest`` is the take).

    ``branch_order``: which branch the k-th model evaluation of a step is (pipelines call cond, then uncond).
    """
    from . import diffusers_wan, official
    rec = plan if isinstance(plan, Recorder) else Recorder(plan)
    if official.is_official(model):
        adapter = official.attach
    elif diffusers_wan.is_diffusers_wan(model):
        adapter = diffusers_wan.attach
    else:
        raise TypeError(f"record() supports the official Wan code's WanModel and diffusers' WanTransformer3DModel; "
                        f"got {type(model).__module__}.{type(model).__name__} (ComfyUI models: use the Attach "
                        "Attention Recorder node)")
    with adapter(model, rec, branch_order) as r:
        yield r


__all__ = ["CausalRecorder", "record"]
