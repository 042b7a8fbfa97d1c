"""Finding what a view or Save node reads: the recording of a sampler's LATENT in a live recorder, or saved maps."""
from __future__ import annotations

from ..wan_capture import Recorder, Take, fingerprint
from ..wan_capture.recording import MemoryRecording, Recording
from ..wan_capture.views.maps import SavedRecording


def take_for_latent(recorder: Recorder, latent: dict) -> Take:
    """The take whose last sampling pass produced ``latent``; a clear error when there is none."""
    if not isinstance(recorder, Recorder):
        raise TypeError(f"expected the recorder output of Attach Attention Recorder or Load Attention Maps, got "
                        f"{type(recorder).__name__}")
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
            "recorder's MODEL (KSampler's LATENT; SamplerCustom's 'output' or 'denoised_output'; VACE: the "
            "sampler's LATENT or TrimVideoLatent's; Wan 2.2 A14B: either expert's sampler). "
            f"The recorder holds {len(recorder.takes)} recent recording(s); a recording is only kept for the latest "
            "samplings, and a pass that failed never matches")
    return take


def recordings(recorder, samples) -> list:
    """Every video a node reads: the batch items of a live recorder's take of ``samples``, or the loaded videos of
    saved maps (Load Attention Maps), each a :class:`Recording`."""
    if isinstance(recorder, SavedRecording):
        return [recorder.source(i) for i in range(len(recorder.videos))]
    take = take_for_latent(recorder, samples)
    return [MemoryRecording(take, b) for b in range(take.batch or 1)]


def open_source(recorder, samples, batch_index: int = 0) -> Recording:
    """The video a view node reads: one batch item of a live recording, or one video of saved maps."""
    if isinstance(recorder, SavedRecording):
        return recorder.source(batch_index)
    return MemoryRecording(take_for_latent(recorder, samples), batch_index)
