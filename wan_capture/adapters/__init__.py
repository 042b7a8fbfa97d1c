"""The capture core outside ComfyUI: ``with record(model, plan) as rec: ...`` for the official Wan code,
diffusers' ``WanTransformer3DModel`` and causal Wan with a KV cache (the ``CausalWanModel`` of Self-Forcing,
Causal-Forcing, CausVid, LongLive and Rolling Forcing), and :class:`CausalRecorder` for calling the tap by hand from
another causal model.

The model's own attention computes the output; the model is restored when the block ends, also on error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence, Union

from ..plan import RecordingPlan
from ..capture.recorder import Recorder
from .causal import CausalRecorder


@contextmanager
def record(model, plan: Union[RecordingPlan, Recorder], branch_order: Optional[Sequence[str]] = None,
           context_timestep: float = 0.0):
    """Record ``model``'s attention while the block runs; yields the :class:`Recorder` (``rec.latest`` is the take).

    ``model``: the official Wan code's ``WanModel``, diffusers' ``WanTransformer3DModel``, or a causal Wan
    ``CausalWanModel`` run with its KV cache (see :mod:`.cache_designs` for the projects). ``branch_order``: which
    branch the k-th model evaluation of a step is (default: cond then uncond); for causal Wan, the branch of each KV
    cache in order of first use (LongLive keeps a positive and a negative cache; the others one, ``cond``).
    ``context_timestep``: causal Wan's cache-refill pass runs at this timestep (the projects' ``context_noise``,
    0 by default; Rolling Forcing's refill is recognised by its ``updating_cache`` argument).
    """
    from . import causal_wan, diffusers_wan, official
    rec = plan if isinstance(plan, Recorder) else Recorder(plan)
    if causal_wan.is_causal_wan(model):
        with causal_wan.attach(model, rec, branch_order or ("cond", "uncond"), context_timestep) as r:
            yield r
        return
    if official.is_official(model):
        adapter = official.attach
    elif diffusers_wan.is_diffusers_wan(model):
        adapter = diffusers_wan.attach
    else:
        raise TypeError(f"record() supports the official Wan code's WanModel, diffusers' WanTransformer3DModel and "
                        f"causal Wan's CausalWanModel with a KV cache; got {type(model).__module__}.{type(model).__name__} "
                        "(ComfyUI models: use the Attach Attention Recorder node)")
    with adapter(model, rec, branch_order or ("cond", "uncond")) as r:
        yield r


__all__ = ["CausalRecorder", "record"]
