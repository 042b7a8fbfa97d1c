"""Independent float64 naive attention: the full score matrix, for tiny shapes only."""
import math

import torch


def naive_scores(q, k, scale=None, q_offset=0, causal=None, frame_tokens=None):
    """Scores ``[R, H, Lq, Lk]`` float64 with hidden keys at -inf, and the visibility mask."""
    q, k = q.double(), k.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("rhqd,rhkd->rhqk", q, k) * scale
    lq, lk = q.shape[2], k.shape[2]
    vis = torch.ones(lq, lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            a = i + q_offset
            if causal == "token":
                vis[i, j] = j <= a
            elif causal == "frame":
                vis[i, j] = j // frame_tokens <= a // frame_tokens
    return s.masked_fill(~vis, float("-inf")), vis


def naive_probs(s):
    return torch.softmax(s, dim=-1)


def naive_sink(q, k, frame_tokens, **layout):
    s, vis = naive_scores(q, k, frame_tokens=frame_tokens, **layout)
    p = naive_probs(s)
    lq, lk = s.shape[-2:]
    off = layout.get("q_offset", 0)
    qf = [(i + off) // frame_tokens for i in range(lq)]
    f0 = qf[0]
    fq = qf[-1] - f0 + 1
    fk = -(-lk // frame_tokens)
    received = p.mean(dim=2)
    key_max = s.max(dim=2).values
    mass = torch.zeros(*s.shape[:2], fq, fk, dtype=torch.float64)
    ent = torch.zeros(*s.shape[:2], fq, dtype=torch.float64)
    count = torch.zeros(fq, dtype=torch.float64)
    for i in range(lq):
        f = qf[i] - f0
        count[f] += 1
        row = p[:, :, i]
        for j in range(lk):
            mass[:, :, f, j // frame_tokens] += row[..., j]
        logs = torch.where(row > 0, torch.log(row), torch.zeros_like(row))
        ent[:, :, f] += -(row * logs).sum(-1)
    return received, key_max, mass / count[:, None], ent / count, f0
