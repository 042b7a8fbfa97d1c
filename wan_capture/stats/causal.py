"""Causal Wan's per-chunk self-attention statistics assembled over the whole video, in absolute latent frames.

Each chunk's queries attend to the keys in its KV cache (sink frames, a local window, the chunk itself). Assembled:

* ``frame_mass [..., F, F]``: row ``fq`` is query frame ``fq``'s mass on every absolute key frame; frames that were not
  in its cache (evicted, or in the future) hold 0, which is exactly the probability the model gives them.
* ``entropy [..., F]``: each query frame belongs to one chunk.
* ``received [..., F * frame_tokens]``: for each absolute key token, the mean over the chunks whose cache held it of
  that chunk's received attention (the mean over its queries); ``key_max``: the max over those chunks. A key no chunk
  attended to is NaN.

Live takes and saved recordings both go through :func:`assemble_chunks`, so they answer the same way.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import numpy as np


def assemble_chunks(chunks: Iterable[dict], frames: int, frame_tokens: int) -> Dict[str, np.ndarray]:
    """``chunks``: dicts with ``query_frames``, ``key_frames`` (absolute, cache order) and the arrays ``received``/
    ``key_max`` ``[..., keys]``, ``frame_mass`` ``[..., Fq, Fk]``, ``entropy`` ``[..., Fq]`` (leading axes equal)."""
    chunks = list(chunks)
    if not chunks:
        raise ValueError("no chunks to assemble")
    lead = chunks[0]["received"].shape[:-1]
    mass = np.zeros(lead + (frames, frames), dtype=np.float32)
    entropy = np.full(lead + (frames,), np.nan, dtype=np.float32)
    recv_sum = np.zeros(lead + (frames, frame_tokens), dtype=np.float64)
    recv_n = np.zeros((frames,), dtype=np.int64)
    kmax = np.full(lead + (frames, frame_tokens), -np.inf, dtype=np.float32)
    with_max = all("key_max" in c for c in chunks)  # recorded with record_key_max off: no key max
    for c in chunks:
        qf, kf = list(c["query_frames"]), list(c["key_frames"])
        fm = np.asarray(c["frame_mass"], dtype=np.float32)
        for i, f in enumerate(qf):
            if 0 <= f < frames:
                entropy[..., f] = c["entropy"][..., i]
                for j, g in enumerate(kf):
                    if 0 <= g < frames:
                        mass[..., f, g] += fm[..., i, j]
        rc = np.asarray(c["received"], dtype=np.float64).reshape(lead + (len(kf), frame_tokens))
        kc = np.asarray(c["key_max"], dtype=np.float32).reshape(lead + (len(kf), frame_tokens)) if with_max else None
        for j, g in enumerate(kf):
            if 0 <= g < frames:
                recv_sum[..., g, :] += rc[..., j, :]
                recv_n[g] += 1
                if with_max:
                    kmax[..., g, :] = np.maximum(kmax[..., g, :], kc[..., j, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        received = (recv_sum / recv_n[:, None]).astype(np.float32)
    kmax[..., recv_n == 0, :] = np.nan
    out = {"frame_mass": mass, "entropy": entropy, "received": received.reshape(lead + (frames * frame_tokens,))}
    if with_max:
        out["key_max"] = kmax.reshape(lead + (frames * frame_tokens,))
    return out


def sink_frames_of(events: Sequence[dict]) -> List[int]:
    """The frames a causal model kept as attention sinks, from the KV-cache event log."""
    return sorted({f for e in events for f in e.get("sink_frames", []) if f >= 0})
