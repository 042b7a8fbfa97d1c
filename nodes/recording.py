"""Finding the take that belongs to a sampler's LATENT output: how downstream nodes avoid stale recordings."""
from __future__ import annotations

from ..wan_capture import Recorder, Take, fingerprint


def take_for_latent(recorder: Recorder, latent: dict) -> Take:
    """The take whose last sampling pass produced ``latent``; a clear error when there is none."""
    if not isinstance(recorder, Recorder):
        raise TypeError(f"expected the ATTENTION_RECORDER output of Attach Attention Recorder, got {type(recorder).__name__}")
    if not recorder.takes:
        raise ValueError("the attention recorder has recorded nothing yet: sample with the MODEL output of "
                         "'Attach Attention Recorder' and connect that sampler's LATENT output here")
    fp = fingerprint(latent["samples"])
    take = recorder.find(fp)
    if take is None and fp in recorder.released:
        raise ValueError("the attention recording of this LATENT was released to keep the recorder within its "
                         "memory_budget_mb (newer recordings needed the room): re-run its sampler, save recordings "
                         "as they are made, or raise memory_budget_mb")
    if take is None:
        raise ValueError(
            "no attention recording matches this LATENT: connect the LATENT output of the sampler that used the "
            f"recorder's MODEL (the recorder holds {len(recorder.takes)} recent recording(s); a recording is only "
            "kept for the latest samplings, and a pass that failed never matches)")
    return take
