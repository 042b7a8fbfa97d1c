"""Exact attention statistics from q and k, computed in bounded chunks of scores.

All functions take heads already split, ``q: [R, H, Lq, D]`` and ``k: [R, H, Lk, D]`` (R = batch rows), use the
model's softmax scale, and compute in float32 whatever the input dtype (the model's bf16/fp16 q and k are used as
they are, only upcast). No function ever holds more than ``chunk_bytes`` of scores at once: rows of queries are
processed in chunks, and each chunk sees all keys, so every softmax row is complete and exact.

Masks: :class:`KeyLayout` places the queries inside the key sequence (a KV cache puts cached keys first, so the
first query sits at ``q_offset``) and optionally applies a causal mask at token or latent-frame granularity, as a
causal Wan does. These functions are the narrow interface that faster GPU kernels plug in behind.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch

CAUSAL_MODES = (None, "token", "frame")
_SCORE_COPIES = 3  # scores, probabilities and one temporary live at once per chunk


@dataclass(frozen=True)
class KeyLayout:
    """Where the queries sit among the keys, and which keys each query may see.

    ``q_offset``: absolute token index of the first query (keys start at 0). ``causal``: None (all keys),
    ``"token"`` (key j visible to query i iff j <= i) or ``"frame"`` (visible iff frame(j) <= frame(i), Wan's
    block-causal mask). ``frame_tokens``: tokens per latent frame, needed for frame statistics and frame masks.
    ``key_frames``: with a KV cache, the absolute latent frame of each group of ``frame_tokens`` keys in key order
    (sink frames first, then the local window, then the current chunk); None means key frame i is frame i.
    """

    q_offset: int = 0
    causal: Optional[str] = None
    frame_tokens: Optional[int] = None
    key_frames: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.causal not in CAUSAL_MODES:
            raise ValueError(f"KeyLayout.causal must be one of {CAUSAL_MODES}, got {self.causal!r}")
        if self.q_offset < 0:
            raise ValueError(f"KeyLayout.q_offset must be >= 0, got {self.q_offset}")
        if self.causal == "frame" and not self.frame_tokens:
            raise ValueError("KeyLayout.causal='frame' needs frame_tokens (tokens per latent frame)")
        if self.frame_tokens is not None and self.frame_tokens < 1:
            raise ValueError(f"KeyLayout.frame_tokens must be >= 1, got {self.frame_tokens}")
        if self.key_frames is not None:
            object.__setattr__(self, "key_frames", tuple(int(f) for f in self.key_frames))
            if not self.frame_tokens:
                raise ValueError("KeyLayout.key_frames needs frame_tokens (tokens per latent frame)")

    def with_frame_tokens(self, frame_tokens: int) -> "KeyLayout":
        """This layout with ``frame_tokens`` filled in when it had none."""
        if self.frame_tokens is not None:
            return self
        return KeyLayout(self.q_offset, self.causal, frame_tokens, self.key_frames)

    def absolute_key_frames(self, keys: int) -> Tuple[int, ...]:
        """Absolute latent frame of each key-frame group of a ``keys``-long key sequence."""
        if self.key_frames is not None:
            return self.key_frames
        return tuple(range(-(-keys // self.frame_tokens)))

    def visible(self, q_index: torch.Tensor, k_index: torch.Tensor) -> Optional[torch.Tensor]:
        """Boolean ``[len(q_index), len(k_index)]`` mask of visible keys (None = all visible)."""
        if self.causal is None:
            return None
        qa = (q_index + self.q_offset)[:, None]
        kb = k_index[None, :]
        if self.causal == "frame":
            return torch.div(kb, self.frame_tokens, rounding_mode="floor") <= torch.div(
                qa, self.frame_tokens, rounding_mode="floor")
        return kb <= qa


class SinkStats(NamedTuple):
    """Self-attention sink statistics of one attention call, per row and head.

    received: ``[R, H, Lk]`` mean over queries of each key's probability column (attention received).
    key_max: ``[R, H, Lk]`` maximum pre-softmax score ``q.k*scale`` each key gets from any query that sees it (None
    when not asked for).
    frame_mass: ``[R, H, Fq, Fk]`` for query frame fq, mean over its queries of the probability mass on key frame fk
    (each row sums to 1). entropy: ``[R, H, Fq]`` mean softmax entropy (nats) of the queries of each frame.
    Query frames are absolute: row fq is frame ``q_frame0 + fq``.
    """

    received: torch.Tensor
    key_max: Optional[torch.Tensor]
    frame_mass: torch.Tensor
    entropy: torch.Tensor
    q_frame0: int


def kernels_for(q: torch.Tensor, k: torch.Tensor):
    """The Triton kernels module when it handles these inputs, else None (the torch path runs).

    ``WAN_CAPTURE_BACKEND``: ``auto`` (kernels on CUDA), ``torch`` (never), ``triton`` (also under
    ``TRITON_INTERPRET=1`` on the CPU, for testing the kernels without a GPU).
    """
    mode = os.environ.get("WAN_CAPTURE_BACKEND", "auto")
    if mode == "torch" or (not q.is_cuda and mode != "triton"):
        return None
    try:
        from . import kernels
    except ImportError:  # no Triton: the torch path is exact too, only slower
        return None
    return kernels if kernels.supported(q, k) else None


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, heads*D]`` -> ``[B, heads, L, D]`` (a view where possible)."""
    b, length, inner = x.shape
    if inner % heads:
        raise ValueError(f"last dimension {inner} is not divisible by heads={heads}")
    return x.view(b, length, heads, inner // heads).transpose(1, 2)


def default_scale(head_dim: int) -> float:
    """The scale SDPA and ComfyUI's attention use: 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def plan_chunks(rows: int, queries: int, keys: int, chunk_bytes: int) -> Tuple[int, int]:
    """(row-heads per chunk, queries per chunk) so that one chunk of float32 scores fits ``chunk_bytes``."""
    per_query = max(1, keys) * 4 * _SCORE_COPIES
    fits = max(1, chunk_bytes // per_query)  # query rows (over all row-heads) one chunk may hold
    if fits >= rows * queries:
        return rows, queries
    if fits >= rows:
        return rows, max(1, fits // rows)
    return max(1, fits // queries) if fits >= queries else 1, min(queries, fits)


def _chunks(rows: int, queries: int, keys: int, chunk_bytes: int) -> Iterator[Tuple[slice, slice]]:
    rc, qc = plan_chunks(rows, queries, keys, chunk_bytes)
    for r0 in range(0, rows, rc):
        for q0 in range(0, queries, qc):
            yield slice(r0, min(rows, r0 + rc)), slice(q0, min(queries, q0 + qc))


def _flat(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q [R, H, Lq, D] and k [R, H, Lk, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    r, h = q.shape[:2]
    return q.reshape(r * h, q.shape[2], q.shape[3]), k.reshape(r * h, k.shape[2], k.shape[3])


def _scores(qf: torch.Tensor, kf: torch.Tensor, rs: slice, qs: slice, scale: float,
            layout: KeyLayout) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    s = torch.matmul(qf[rs, qs].float(), kf[rs].float().transpose(1, 2)).mul_(scale)
    vis = layout.visible(torch.arange(qs.start, qs.stop, device=s.device), torch.arange(kf.shape[1], device=s.device))
    if vis is not None:
        s.masked_fill_(~vis, float("-inf"))
    return s, vis


def cross_attention_probs(q: torch.Tensor, k: torch.Tensor, positions: Sequence[int], scale: float,
                          chunk_bytes: int = 256 << 20, layout: KeyLayout = KeyLayout()) -> torch.Tensor:
    """Softmax probabilities over all keys, kept for key ``positions``: ``[R, H, Lq, len(positions)]`` float32."""
    qf, kf = _flat(q, k)
    r, h = q.shape[:2]
    pos = torch.as_tensor(list(positions), dtype=torch.long, device=q.device)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= kf.shape[1]):
        outside = [p for p in positions if not 0 <= int(p) < kf.shape[1]]
        shown = outside[:8] + (["..."] if len(outside) > 8 else [])
        raise IndexError(f"{len(outside)} tracked positions ({shown}) fall outside the {kf.shape[1]} text keys of the "
                         f"context (0..{kf.shape[1] - 1})")
    kern = kernels_for(q, k)
    if kern is not None and layout.causal is None and pos.numel():
        return kern.cross_probs(q, k, pos, scale).view(r, h, qf.shape[1], pos.numel())
    out = torch.empty(r * h, qf.shape[1], pos.numel(), dtype=torch.float32, device=q.device)
    for rs, qs in _chunks(r * h, qf.shape[1], kf.shape[1], chunk_bytes):
        s, _ = _scores(qf, kf, rs, qs, scale, layout)
        out[rs, qs] = torch.softmax(s, dim=-1).index_select(-1, pos)
    return out.view(r, h, qf.shape[1], pos.numel())


def cross_attention_mass(q: torch.Tensor, k: torch.Tensor, groups: Sequence[Sequence[int]], scale: float,
                         chunk_bytes: int = 256 << 20, layout: KeyLayout = KeyLayout()) -> torch.Tensor:
    """Softmax probability summed over each group of key positions: ``[R, H, Lq, len(groups)]`` float32."""
    qf, kf = _flat(q, k)
    r, h = q.shape[:2]
    bad = [p for g in groups for p in g if not 0 <= int(p) < kf.shape[1]]
    if bad:
        raise IndexError(f"summed positions {bad[:8]} fall outside the {kf.shape[1]} text keys of the context")
    member = torch.zeros(kf.shape[1], len(groups), dtype=torch.float32, device=q.device)
    for j, g in enumerate(groups):
        member[list(g), j] = 1.0
    out = torch.empty(r * h, qf.shape[1], len(groups), dtype=torch.float32, device=q.device)
    for rs, qs in _chunks(r * h, qf.shape[1], kf.shape[1], chunk_bytes):
        s, _ = _scores(qf, kf, rs, qs, scale, layout)
        out[rs, qs] = torch.softmax(s, dim=-1) @ member
    return out.view(r, h, qf.shape[1], len(groups))


def context_statistics(q: torch.Tensor, k: torch.Tensor, scale: float,
                       chunk_bytes: int = 256 << 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query log-sum-exp ``[R, H, Lq]`` and per key attention received (mean over queries of its probability
    column) ``[R, H, Lk]`` of a cross-attention over a short context, float32.

    Used for the image context of i2v models (257 CLIP-vision tokens) and the text log-sum-exp beside it.
    """
    qf, kf = _flat(q, k)
    r, h = q.shape[:2]
    lse = torch.empty(r * h, qf.shape[1], dtype=torch.float32, device=q.device)
    received = torch.zeros(r * h, kf.shape[1], dtype=torch.float32, device=q.device)
    for rs, qs in _chunks(r * h, qf.shape[1], kf.shape[1], chunk_bytes):
        s, _ = _scores(qf, kf, rs, qs, scale, KeyLayout())
        m = torch.logsumexp(s, dim=-1)
        lse[rs, qs] = m
        received[rs] += torch.exp(s - m[..., None]).sum(dim=1)
    received /= max(qf.shape[1], 1)
    return lse.view(r, h, qf.shape[1]), received.view(r, h, kf.shape[1])


def _frame_span(length: int, offset: int, frame_tokens: int) -> Tuple[int, int]:
    """The absolute frame of the first of ``length`` positions starting at ``offset``, and how many frames they span."""
    first = offset // frame_tokens
    return first, ((offset + length - 1) // frame_tokens - first + 1) if length else 0


def _frames(length: int, offset: int, frame_tokens: int) -> Tuple[torch.Tensor, int, int]:
    """Absolute frame of each position (relative to the first one's frame), that first frame, the frame count."""
    first, count = _frame_span(length, offset, frame_tokens)
    return torch.arange(offset, offset + length) // frame_tokens - first, first, count


def sink_statistics(q: torch.Tensor, k: torch.Tensor, scale: float, frame_tokens: int,
                    chunk_bytes: int = 256 << 20, layout: KeyLayout = KeyLayout(),
                    lse: Optional[torch.Tensor] = None, key_max: bool = True) -> SinkStats:
    """Received attention and max score per key, frame x frame mass and entropy per query frame.

    ``key_max`` False: no max score per key (None); the GPU's single sweep then skips that reduction.

    ``lse``: each query's log-sum-exp ``[R, H, Lq]`` (natural log of the sum of ``exp(q.k*scale)`` over the visible
    keys), as the model's own attention kernel returned it; with it the GPU kernels need one sweep over the keys
    instead of two. Without it (or on the torch path) it is computed here.
    """
    kern = kernels_for(q, k)
    # the kernels keep per-query sums for every key frame: past MAX_FRAMES the chunked torch path bounds memory
    if kern is not None and -(-k.shape[2] // frame_tokens) <= kern.MAX_FRAMES:
        if lse is not None:
            st = _sink_statistics_sweep(kern, q, k, scale, frame_tokens, chunk_bytes, layout, lse, key_max)
        else:
            st = _sink_statistics_kernels(kern, q, k, scale, frame_tokens, chunk_bytes, layout)
        return st if key_max else st._replace(key_max=None)
    qf, kf = _flat(q, k)
    r, h = q.shape[:2]
    rh, lq, lk = qf.shape[0], qf.shape[1], kf.shape[1]
    dev = q.device
    q_frame, q_frame0, fq = _frames(lq, layout.q_offset, frame_tokens)
    q_frame = q_frame.to(dev)
    fk = -(-lk // frame_tokens)
    pad = fk * frame_tokens - lk
    received = torch.zeros(rh, lk, dtype=torch.float32, device=dev)
    kmax = torch.full((rh, lk), float("-inf"), dtype=torch.float32, device=dev)
    mass = torch.zeros(rh, fq, fk, dtype=torch.float32, device=dev)
    entropy = torch.zeros(rh, fq, dtype=torch.float32, device=dev)
    for rs, qs in _chunks(rh, lq, lk, chunk_bytes):
        s, vis = _scores(qf, kf, rs, qs, scale, layout)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        kmax[rs] = torch.maximum(kmax[rs], s.amax(dim=1))
        p = torch.exp(s - lse)
        received[rs] += p.sum(dim=1)
        # entropy = lse - sum_j p_j s_j; hidden keys have p = 0 and s = -inf, so zero their s first
        s_vis = s if vis is None else s.masked_fill_(~vis, 0.0)
        ent = lse.squeeze(-1) - (p * s_vis).sum(dim=-1)
        del s, s_vis
        per_frame = torch.nn.functional.pad(p, (0, pad)).view(p.shape[0], p.shape[1], fk, frame_tokens).sum(-1)
        rows = q_frame[qs]
        mass[rs] = mass[rs].index_add_(1, rows, per_frame)
        entropy[rs] = entropy[rs].index_add_(1, rows, ent)
    counts = torch.bincount(q_frame, minlength=fq).clamp_min(1).to(torch.float32)
    received /= lq
    mass /= counts[None, :, None]
    entropy /= counts[None, :]
    return SinkStats(received.view(r, h, lk), kmax.view(r, h, lk) if key_max else None,
                     mass.view(r, h, fq, fk), entropy.view(r, h, fq), q_frame0)


def _frame_means(x: torch.Tensor, offset: int, frame_tokens: int, frames: int) -> torch.Tensor:
    """``x [..., Lq]`` averaged over each query frame's queries (the first query is token ``offset``): ``[...,
    frames]``. Frames are contiguous runs of queries, so a reshape sums them: no index kernels, no device sync."""
    lq = x.shape[-1]
    lead = offset % frame_tokens
    tail = frames * frame_tokens - lead - lq
    if lead or tail:
        x = torch.nn.functional.pad(x, (lead, tail))
    sums = x.reshape(*x.shape[:-1], frames, frame_tokens).sum(-1)
    counts = [min((f + 1) * frame_tokens, lead + lq) - max(f * frame_tokens, lead) for f in range(frames)]
    return sums / torch.tensor(counts, dtype=sums.dtype).to(sums.device, non_blocking=True)


def _sink_statistics_by_heads(q, k, frame_tokens, chunk_bytes, layout, per_head: int, run) -> SinkStats:
    """The kernels' statistics, heads in chunks whose buffers (``per_head`` bytes a head) fit ``chunk_bytes``.
    ``run(h0, h1)`` gives ``received`` (mean over queries) and ``key_max`` ``[rh, Lk]``, per-query ``mass
    [rh, Fk, Lq]`` and ``entropy [rh, Lq]``; the per-query values become per-query-frame means here."""
    r, h, lq = q.shape[:3]
    lk = k.shape[2]
    q_frame0, fq = _frame_span(lq, layout.q_offset, frame_tokens)
    fk = -(-lk // frame_tokens)
    step = max(1, min(h, chunk_bytes // max(1, per_head)))
    parts = []
    for h0 in range(0, h, step):
        h1 = min(h, h0 + step)
        received, key_max, mass_rows, ent_rows = run(h0, h1)
        mass = _frame_means(mass_rows, layout.q_offset, frame_tokens, fq).transpose(1, 2)
        ent = _frame_means(ent_rows, layout.q_offset, frame_tokens, fq)
        hs = h1 - h0
        parts.append((received.view(r, hs, lk), None if key_max is None else key_max.view(r, hs, lk),
                      mass.reshape(r, hs, fq, fk), ent.view(r, hs, fq)))
    cat = [None if parts[0][i] is None else torch.cat([p[i] for p in parts], dim=1) for i in range(4)]
    return SinkStats(*cat, q_frame0)


def _sink_statistics_kernels(kern, q, k, scale, frame_tokens, chunk_bytes, layout) -> SinkStats:
    r, lq, lk = q.shape[0], q.shape[2], k.shape[2]

    def run(h0, h1):
        received, key_max, mass, ent, _ = kern.sink_statistics(q[:, h0:h1], k[:, h0:h1], scale, frame_tokens, layout)
        return received, key_max, mass.transpose(1, 2), ent

    per_head = r * lq * (-(-lk // frame_tokens) + 3) * 4  # per-query outputs the kernels write for one head
    return _sink_statistics_by_heads(q, k, frame_tokens, chunk_bytes, layout, per_head, run)


def _sink_statistics_sweep(kern, q, k, scale, frame_tokens, chunk_bytes, layout, lse, key_max=True) -> SinkStats:
    r, h, lq = q.shape[:3]
    lk = k.shape[2]
    if tuple(lse.shape[:3]) != (r, h, lq):
        raise ValueError(f"lse of shape {tuple(lse.shape)} does not match queries [R={r}, H={h}, Lq={lq}]")
    fk = -(-lk // frame_tokens)
    splits = kern.sweep_splits(lq, fk, r * h, frame_tokens, q.shape[3], q.device)

    def run(h0, h1):
        received, kmax, mass, ent = kern.sweep(q[:, h0:h1], k[:, h0:h1], scale, layout, frame_tokens,
                                               lse[:, h0:h1], splits=splits, key_max=key_max)
        return received / lq, kmax, mass, ent

    per_head = r * kern.sweep_bytes(lq, lk, fk, splits)  # what the sweep allocates for one head
    return _sink_statistics_by_heads(q, k, frame_tokens, chunk_bytes, layout, per_head, run)


def window_bytes(rows: int, heads: int, q_len: int, k_len: int) -> int:
    """Host bytes an exact window needs: float32 scores and probabilities."""
    return rows * heads * q_len * k_len * 4 * 2


def score_window(q: torch.Tensor, k: torch.Tensor, scale: float, q_range: Tuple[int, int], k_range: Tuple[int, int],
                 chunk_bytes: int = 256 << 20, layout: KeyLayout = KeyLayout()) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact pre-softmax scores ``QK^T*scale`` and probabilities for queries ``q_range`` x keys ``k_range``.

    Ranges are ``(start, stop)`` indices into this call's queries and keys. Probabilities are normalised over all
    visible keys (the log-sum-exp of each query row is computed over the full key sequence), so they are the model's
    probabilities, not a softmax of the window. Hidden keys score ``-inf`` with probability 0.
    """
    (q0, q1), (k0, k1) = q_range, k_range
    if not (0 <= q0 < q1 <= q.shape[2] and 0 <= k0 < k1 <= k.shape[2]):
        raise IndexError(f"window queries [{q0}, {q1}) x keys [{k0}, {k1}) outside {q.shape[2]} queries x "
                         f"{k.shape[2]} keys")
    qf, kf = _flat(q[:, :, q0:q1], k)
    r, h = q.shape[:2]
    sub = KeyLayout(layout.q_offset + q0, layout.causal, layout.frame_tokens)
    scores = torch.empty(r * h, q1 - q0, k1 - k0, dtype=torch.float32, device=q.device)
    probs = torch.empty_like(scores)
    kern = kernels_for(q, k)
    if kern is not None:  # the row pass gives each query's log-sum-exp over all keys: only the window is scored
        lse_all = kern.row_pass(q[:, :, q0:q1], k, scale, sub, layout.frame_tokens or 1, want_mass=False)[0]
        kw = kf[:, k0:k1]
        for rs, qs in _chunks(r * h, q1 - q0, k1 - k0, chunk_bytes):
            s = torch.matmul(qf[rs, qs].float(), kw[rs].float().transpose(1, 2)).mul_(scale)
            vis = sub.visible(torch.arange(qs.start, qs.stop, device=s.device), torch.arange(k0, k1, device=s.device))
            if vis is not None:
                s.masked_fill_(~vis, float("-inf"))
            scores[rs, qs] = s
            probs[rs, qs] = torch.exp(s - lse_all[rs, qs, None])
        return scores.view(r, h, q1 - q0, k1 - k0), probs.view(r, h, q1 - q0, k1 - k0)
    for rs, qs in _chunks(r * h, q1 - q0, kf.shape[1], chunk_bytes):
        s, _ = _scores(qf, kf, rs, qs, scale, sub)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        scores[rs, qs] = s[..., k0:k1]
        probs[rs, qs] = torch.exp(s[..., k0:k1] - lse)
    return scores.view(r, h, q1 - q0, k1 - k0), probs.view(r, h, q1 - q0, k1 - k0)
