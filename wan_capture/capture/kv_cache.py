"""Which absolute latent frames a causal Wan's KV cache holds, where RoPE put them, and why they are there, observed
from the keys themselves.

Causal Wan projects keep a cache of keys per block (sink frames or an anchor block pinned at the front, a window of
recent frames, the chunk being generated) and move, evict, pin and sometimes re-rope them in ways of their own.
Rather than re-implementing that bookkeeping (and inheriting its bugs), :class:`KVCacheObserver` identifies every
frame the model attends to by a content signature of its keys:

* the keys a call computes itself (its own frames, the last ones it attends to) are registered under their
  signature when they are written, and found again wherever the model later moves them;
* the model's RoPE function is observed too (:meth:`KVCacheObserver.observe_rope`): each frame it rotates is
  remembered as "input signature, rotated at frame position p". Keys stored un-roped and rotated on every call
  (Rolling Forcing's anchor, LongLive's relative RoPE) are identified through their input, and their position in
  that call is the one RoPE gave them, which may differ from their absolute frame;
* the frames in the cache's sink and pinned slots are identified the same way, which gives each attended frame its
  reason: ``sink``, ``pinned``, ``window`` (an ordinary cached frame) or ``current`` (computed by this call).

A frame that matches nothing is reported as ``-1`` (keys the log cannot explain). Three findings are flagged in the
log: a sink slot that now holds another frame (the sink was overwritten), a sink or pinned slot whose frame the call
does not attend to (``unattended_slot_frames``: kept, yet given no attention), and a configured sink in a cache that
has never evicted anything (it behaves like no sink at all).
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}
_PRIME = 2_147_483_647  # 2^31 - 1: token signatures are reduced mod this before frames combine them
UNKNOWN = (-1, "unknown", -1)

SINK, PINNED, WINDOW, CURRENT = "sink", "pinned", "window", "current"  # why a frame is among the keys


class KVCacheObserver:
    """Absolute frames, RoPE positions and reasons of a causal self-attention's keys, per cache slot.

    A slot is one block of one cache (``(block, branch)``: LongLive keeps one cache per CFG branch).
    """

    def __init__(self, seed: int = 0x5EED):
        self._seed = seed
        self._weights: Dict[Tuple[int, str], torch.Tensor] = {}
        self.frames: Dict[Hashable, Dict[int, Tuple[int, str, int]]] = {}  # slot -> signature -> (frame, writer, rope)
        self.signatures_of: Dict[Hashable, Dict[int, List[int]]] = {}  # slot -> frame -> its signatures now
        self.rope: Dict[Hashable, Dict[int, Tuple[int, int]]] = {}  # slot -> rotated signature -> (input, position)
        self.previous: Dict[Hashable, Tuple[int, ...]] = {}  # slot -> key frames at its previous call
        self.sinks: Dict[Hashable, Tuple[int, ...]] = {}  # slot -> frames in its sink slots at the previous call
        self.evicted: Dict[Hashable, bool] = {}  # slot -> whether any frame ever left it

    def _w(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, str(device))
        w = self._weights.get(key)
        if w is None:
            g = torch.Generator().manual_seed(self._seed + n)
            # small weights: int16/int32 values x weights summed over n stay inside int64
            w = torch.randint(1, 1 << 15, (n,), generator=g, dtype=torch.int64).to(device)
            self._weights[key] = w
        return w

    def frame_signatures(self, k_row: torch.Tensor, frame_tokens: int) -> List[int]:
        """One integer per frame of ``k_row [L, ...]`` (L a multiple of ``frame_tokens``): equal bytes, equal value."""
        flat = k_row.detach().reshape(k_row.shape[0], -1).contiguous()
        ints = flat.view(_INT_VIEW[flat.dtype]).to(torch.int64) if flat.dtype in _INT_VIEW else flat.to(torch.int64)
        per_token = (ints * self._w(ints.shape[1], ints.device)).sum(dim=1) % _PRIME
        per_frame = per_token.view(-1, frame_tokens) * self._w(frame_tokens, ints.device)[None, :]
        return per_frame.sum(dim=1).tolist()

    # -- what the model's RoPE function did in this call ------------------------------------------------------
    def begin_call(self, slot: Hashable) -> None:
        """A self-attention call of ``slot`` starts: RoPE observations of earlier calls no longer apply."""
        self.rope[slot] = {}

    def observe_rope(self, slot: Hashable, x_in: torch.Tensor, x_out: torch.Tensor, start_frame: int,
                     frame_tokens: int) -> None:
        """The model rotated ``x_in [B, L, ...]`` into ``x_out`` with frame ``i`` of it at position
        ``start_frame + i``."""
        if x_in.shape[1] % frame_tokens or x_in.shape[1] != x_out.shape[1] or x_in.shape[1] == 0:
            return
        table = self.rope.setdefault(slot, {})
        pairs = zip(self.frame_signatures(x_in[0], frame_tokens), self.frame_signatures(x_out[0], frame_tokens))
        for i, (s_in, s_out) in enumerate(pairs):
            table[s_out] = (s_in, int(start_frame) + i)

    def identify(self, slot: Hashable, signature: int) -> Tuple[int, str, int]:
        """``(absolute frame, writer, RoPE position)`` of a frame of keys, ``(-1, "unknown", -1)`` if none fits."""
        table = self.frames.get(slot, {})
        rotated = self.rope.get(slot, {}).get(signature)
        if signature in table:
            frame, writer, position = table[signature]
            return frame, writer, position if rotated is None else rotated[1]
        if rotated is not None and rotated[0] in table:  # stored un-roped, rotated in this call
            frame, writer, _ = table[rotated[0]]
            return frame, writer, rotated[1]
        return UNKNOWN if rotated is None else (-1, "unknown", rotated[1])

    def slot_frames(self, slot: Hashable, keys: Optional[torch.Tensor], frame_tokens: int) -> Tuple[int, ...]:
        """The absolute frames held by a run of cache slots (``keys [B, L, ...]``, as stored)."""
        if keys is None or keys.shape[1] == 0 or keys.shape[1] % frame_tokens:
            return ()
        return tuple(self.identify(slot, s)[0] for s in self.frame_signatures(keys[0], frame_tokens))

    # -- one attention call -------------------------------------------------------------------------------
    def observe(self, slot: Hashable, k: torch.Tensor, queries: int, query_start: int, frame_tokens: int,
                writers: Sequence[str], sink_keys: Optional[torch.Tensor] = None,
                pinned_keys: Optional[torch.Tensor] = None, sink_configured: bool = False,
                rope_start: Optional[int] = None) -> Tuple[Tuple[int, ...], dict]:
        """Key frames of one call and its log entry.

        ``k [B, Lk, ...]``: the keys attended to, in cache order, the call's own ``queries`` tokens last (they start
        at absolute token ``query_start``); ``writers``: what wrote each of the call's own frames (``"step 2"``,
        ``"context"``); ``sink_keys``/``pinned_keys``: the content of the cache's sink and pinned slots as stored
        (None: the design has none); ``sink_configured``: the model was told to keep sinks; ``rope_start``: the RoPE
        frame position of the call's first own frame where the model passes it (ComfyUI's ``start_frame``), for
        models whose RoPE function is not observed (-1 then).
        """
        lk = k.shape[1]
        if lk % frame_tokens or queries % frame_tokens or query_start % frame_tokens or queries > lk:
            raise ValueError(f"the KV cache must hold whole frames: {lk} keys, {queries} queries starting at token "
                             f"{query_start}, {frame_tokens} tokens per frame")
        sigs = self.frame_signatures(k[0], frame_tokens)
        n_new, first = queries // frame_tokens, query_start // frame_tokens
        if len(writers) != n_new:
            raise ValueError(f"{len(writers)} writers for {n_new} frames of the call's own keys")
        cached = [self.identify(slot, s) for s in sigs[:len(sigs) - n_new]]
        sink_frames = set(self.slot_frames(slot, sink_keys, frame_tokens)) - {-1}
        pinned_frames = set(self.slot_frames(slot, pinned_keys, frame_tokens)) - {-1} - sink_frames
        own = []
        for i, s in enumerate(sigs[len(sigs) - n_new:]):
            frame, rotated = first + i, self.rope.get(slot, {}).get(s)
            position = rotated[1] if rotated is not None else (-1 if rope_start is None else int(rope_start) + i)
            self._register(slot, frame, [s] + ([rotated[0]] if rotated is not None else []), writers[i], position)
            own.append((frame, writers[i], position))
        key_frames = tuple(f for f, _, _ in cached) + tuple(f for f, _, _ in own)
        reasons = [SINK if f in sink_frames else PINNED if f in pinned_frames else WINDOW if f >= 0 else "unknown"
                   for f, _, _ in cached] + [CURRENT] * n_new
        before = self.previous.get(slot, ())
        self.previous[slot] = key_frames
        now = set(key_frames)
        evicted = sorted(f for f in set(before) if f not in now and 0 <= f < first)
        self.evicted[slot] = self.evicted.get(slot, False) or bool(evicted)
        event = {
            "chunk": first, "key_frames": list(key_frames), "rope_frames": [p for _, _, p in cached + own],
            "reasons": reasons, "writers": [w for _, w, _ in cached + own], "evicted": evicted,
            "sink_frames": [f for f, r in zip(key_frames, reasons) if r == SINK],
            "pinned_frames": [f for f, r in zip(key_frames, reasons) if r == PINNED],
            "unknown_key_frames": sum(1 for f, _, _ in cached if f < 0),
        }
        flags = []
        held = tuple(sorted(sink_frames))
        if held and self.sinks.get(slot) and held != self.sinks[slot]:
            flags.append(f"sink overwritten: the sink slots held frames {list(self.sinks[slot])}, now {list(held)}")
        if held:
            self.sinks[slot] = held
        unattended = sorted((sink_frames | pinned_frames) - set(key_frames))
        if unattended:
            # the cache keeps these frames in its sink or pinned slots, but this call's keys do not include them:
            # whatever they are kept for, this call gives them no attention at all
            which = ("pinned" if set(unattended) <= pinned_frames else "sink" if set(unattended) <= sink_frames
                     else "sink and pinned")
            flags.append(f"{which} slot not attended: the cache holds frames {unattended} there, this call's keys "
                         "do not include them")
            event["unattended_slot_frames"] = unattended
        if sink_configured and event["sink_frames"] and not self.evicted[slot]:
            flags.append("sink inert: nothing has been evicted from this cache, so its sink frames are ordinary "
                         "cached frames")
        if flags:
            event["flags"] = flags
        return key_frames, event

    def _register(self, slot: Hashable, frame: int, signatures: Sequence[int], writer: str, position: int) -> None:
        table = self.frames.setdefault(slot, {})
        current = self.signatures_of.setdefault(slot, {})
        for old in current.get(frame, ()):
            if table.get(old, (None,))[0] == frame:
                del table[old]  # the frame's earlier keys are gone from the cache: forget their signature
        for s in signatures:
            table[s] = (frame, writer, position)
        current[frame] = list(signatures)


def cache_anomaly(key_frames: Sequence[int], chunk: int) -> Optional[str]:
    """None when the cache is in the order causal Wan keeps it (ascending, all older than the chunk), else why not."""
    past = [f for f in key_frames if f < chunk]
    if any(f < 0 for f in key_frames):
        return "keys of unknown origin in the cache"
    if past != sorted(past):
        return f"cached frames out of order: {list(past)}"
    return None
