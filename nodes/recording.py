"""Finding what a view node shows: the take that belongs to a sampler's LATENT output, or saved maps."""
from __future__ import annotations

from ..wan_capture import Recorder, Take, fingerprint
from ..wan_capture.views import SavedRecording, TakeSource


def take_for_latent(recorder: Recorder, latent: dict) -> Take:
    """The take whose last sampling pass produced ``latent``; a clear error when there is none."""
    if isinstance(recorder, SavedRecording):
        raise TypeError("this input needs the live recorder of Attach Attention Recorder; saved maps (Load Attention "
                        "Maps) are already saved and can be viewed directly")
    if not isinstance(recorder, Recorder):
        raise TypeError(f"expected the ATTENTION_RECORDER output of Attach Attention Recorder, got {type(recorder).__name__}")
    if latent is None:
        raise ValueError("connect the sampler's LATENT output too: it picks which recording of the recorder to use")
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


def open_source(recorder, samples, batch_index: int = 0):
    """What a view node reads: a live recorder's take of ``samples``, or saved maps from Load Attention Maps."""
    if isinstance(recorder, SavedRecording):
        return recorder.source(batch_index)
    return TakeSource(take_for_latent(recorder, samples), batch_index)
