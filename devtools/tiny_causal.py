"""A small causal Wan of the project's own, and the chunked KV-cache inference loop that drives causal Wan models.

:class:`CausalWanModel` has the structure of Self-Forcing's (``wan/modules/causal_model.py``) where the recorder
meets it: blocks with ``self_attn`` (a :class:`CausalWanSelfAttention` with ``sink_size``, ``local_attn_size`` and the
same KV-cache bookkeeping: ``global_end_index``/``local_end_index``, sink frames pinned at the front, the oldest
window frames evicted by shifting) calling this module's ``attention``, and ``cross_attn`` calling
``flash_attention`` with a cross-attention cache. It is tiny and random: for tests, the demo and CI without the
fetched Self-Forcing code. :func:`causal_generate` is the chunk-by-chunk loop of Self-Forcing's
``CausalInferencePipeline`` (denoising steps per chunk, then the clean-context pass that refills the cache); it drives
Self-Forcing's own ``CausalWanModel`` as well.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn


def _sdpa(q, k, v, dtype):
    out_dtype = q.dtype
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).contiguous().to(out_dtype)


def attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None, causal=False,
              window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, fa_version=None):
    """Wan's attention without flash-attn: ``[B, L, N, D]`` in, SDPA in half precision (what self-attention calls)."""
    return _sdpa(q, k, v, dtype)


def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    """What the cross-attention calls (Wan's name); here the same SDPA."""
    return _sdpa(q, k, v, dtype)


def _sinusoid(n: int, positions: torch.Tensor) -> torch.Tensor:
    half = n // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    a = positions.double()[:, None] * freq[None, :]
    return torch.cat([a.cos(), a.sin()], dim=1).float()


class CausalWanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, local_attn_size: int = -1, sink_size: int = 0,
                 frame_tokens: int = 1560, buggy_eviction: bool = False):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.max_attention_size = 32760 if local_attn_size == -1 else local_attn_size * frame_tokens
        # bugs the event log exposes: True evicts the newest cached frames; "over_sink" rolls the cache over its sink
        self.buggy_eviction = buggy_eviction
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        frame_tokens = int(grid_sizes[0][1] * grid_sizes[0][2])
        pos = _sinusoid(self.dim, torch.arange(current_start, current_start + s) // frame_tokens).to(x)
        q = (self.q(x) + pos).view(b, s, n, d)
        k = (self.k(x) + pos).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        if kv_cache is None:
            return self.o(attention(q, k, v).flatten(2))
        end = current_start + s
        sink = self.sink_size * frame_tokens
        size = kv_cache["k"].shape[1]
        g_end, l_end = int(kv_cache["global_end_index"].item()), int(kv_cache["local_end_index"].item())
        if self.local_attn_size != -1 and end > g_end and s + l_end > size:
            evict = s + l_end - size
            if self.buggy_eviction is True:  # overwrite the newest frames instead of shifting out the oldest
                local_end = l_end + end - g_end - evict
            else:
                keep = 0 if self.buggy_eviction == "over_sink" else sink
                roll = l_end - evict - keep
                for name in ("k", "v"):
                    kv_cache[name][:, keep:keep + roll] = kv_cache[name][:, keep + evict:keep + evict + roll].clone()
                local_end = l_end + end - g_end - evict
        else:
            local_end = l_end + end - g_end
        kv_cache["k"][:, local_end - s:local_end] = k.to(kv_cache["k"].dtype)
        kv_cache["v"][:, local_end - s:local_end] = v.to(kv_cache["v"].dtype)
        lo = max(0, local_end - self.max_attention_size)
        out = attention(q, kv_cache["k"][:, lo:local_end], kv_cache["v"][:, lo:local_end])
        kv_cache["global_end_index"].fill_(end)
        kv_cache["local_end_index"].fill_(local_end)
        return self.o(out.flatten(2))


class WanT2VCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context, context_lens, crossattn_cache=None):
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, d)
        if crossattn_cache is not None and crossattn_cache.get("is_init"):
            k, v = crossattn_cache["k"], crossattn_cache["v"]
        else:
            k, v = self.k(context).view(b, -1, n, d), self.v(context).view(b, -1, n, d)
            if crossattn_cache is not None:
                crossattn_cache.update(k=k, v=v, is_init=True)
        return self.o(flash_attention(q, k, v, k_lens=context_lens).flatten(2))


class CausalWanAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, ffn_dim, local_attn_size, sink_size, frame_tokens, buggy_eviction=False):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.self_attn = CausalWanSelfAttention(dim, num_heads, local_attn_size, sink_size, frame_tokens,
                                                buggy_eviction)
        self.cross_attn = WanT2VCrossAttention(dim, num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens, block_mask, kv_cache=None,
                crossattn_cache=None, current_start=0, cache_start=None):
        f = e.shape[1]
        e = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # shift, scale per frame
        h = self.norm1(x).unflatten(1, (f, -1)) * (1 + e[1]) + e[0]
        x = x + self.self_attn(h.flatten(1, 2), seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start,
                               cache_start)
        x = x + self.cross_attn(self.norm3(x), context, context_lens, crossattn_cache=crossattn_cache)
        return x + self.ffn(self.norm2(x))


class CausalWanModel(nn.Module):
    """A tiny causal Wan (see the module docstring). ``frame_tokens``: tokens per latent frame after patchify."""

    def __init__(self, dim: int = 256, num_heads: int = 2, num_layers: int = 2, in_dim: int = 16, out_dim: int = 16,
                 text_dim: int = 4096, ffn_dim: int = 512, patch_size=(1, 2, 2), local_attn_size: int = -1,
                 sink_size: int = 0, frame_tokens: int = 1560, text_len: int = 512, buggy_eviction: bool = False):
        super().__init__()
        self.dim, self.num_heads, self.out_dim, self.patch_size = dim, num_heads, out_dim, tuple(patch_size)
        self.text_len, self.local_attn_size = text_len, local_attn_size
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Linear(text_dim, dim)
        self.time_embedding = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([CausalWanAttentionBlock(dim, num_heads, ffn_dim, local_attn_size, sink_size,
                                                             frame_tokens, buggy_eviction) for _ in range(num_layers)])
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))

    def forward(self, x, t, context, seq_len=None, kv_cache=None, crossattn_cache=None, current_start=0,
                cache_start=0):
        b, _, f, hh, ww = x.shape
        pt, ph, pw = self.patch_size
        h = self.patch_embedding(x)
        grid = torch.tensor([[h.shape[2], h.shape[3], h.shape[4]]] * b)
        h = h.flatten(2).transpose(1, 2)
        t = torch.as_tensor(t, dtype=torch.float32).reshape(b, -1)
        t = t.expand(b, f // pt) if t.shape[1] == 1 else t
        e = self.time_embedding(_sinusoid(self.dim, t.flatten()).to(h)).view(b, -1, self.dim)
        ctx = torch.stack([torch.cat([u, u.new_zeros(self.text_len - u.shape[0], u.shape[1])]) for u in context])
        ctx = self.text_embedding(ctx)
        for i, block in enumerate(self.blocks):
            h = block(h, e, None, grid, None, ctx, None, None, None if kv_cache is None else kv_cache[i],
                      None if crossattn_cache is None else crossattn_cache[i], current_start, cache_start)
        out = self.head(h).view(b, f // pt, hh // ph, ww // pw, pt, ph, pw, self.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_dim, f, hh, ww)


def make_caches(model, batch: int, cache_frames: Optional[int], frame_tokens: int, dtype=torch.float32,
                device="cpu"):
    """Fresh KV caches (one per block) of ``cache_frames`` frames (None: 32760 tokens) and cross-attention caches."""
    size = 32760 if cache_frames is None else cache_frames * frame_tokens
    n = model.num_heads
    d = model.dim // n
    kv = [{"k": torch.zeros(batch, size, n, d, dtype=dtype, device=device),
           "v": torch.zeros(batch, size, n, d, dtype=dtype, device=device),
           "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
           "local_end_index": torch.tensor([0], dtype=torch.long, device=device)} for _ in model.blocks]
    cross = [{"is_init": False} for _ in model.blocks]
    return kv, cross


@torch.no_grad()
def causal_generate(model, noise: torch.Tensor, context: torch.Tensor, chunk_frames: int,
                    timesteps: Sequence[float] = (1000.0, 750.0, 500.0, 250.0), context_timestep: float = 0.0,
                    cache_frames: Optional[int] = None, seed: int = 0,
                    initial_latent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Self-Forcing's chunked inference: ``noise [B, C, F, H, W]`` -> the clean latent ``[B, C, F, H, W]``.

    Each chunk of ``chunk_frames`` latent frames is denoised at ``timesteps`` against the KV cache (flow matching:
    ``x0 = x_t - sigma * v``, re-noised to the next timestep), then the model runs once more on the clean chunk at
    ``context_timestep`` to write clean keys into the cache, as Self-Forcing does. ``initial_latent``
    ``[B, C, Fi, H, W]`` (image-to-video, video extension): its chunks only get that context pass, as in
    Self-Forcing's ``CausalInferencePipeline``, and lead the output (``[B, C, Fi + F, H, W]``).
    """
    b, _, f, hh, ww = noise.shape
    pt, ph, pw = model.patch_size
    ft = (hh // ph) * (ww // pw)
    given = 0 if initial_latent is None else initial_latent.shape[2]
    if f % chunk_frames or given % chunk_frames:
        raise ValueError(f"{f} latent frames (and {given} given) do not split into chunks of {chunk_frames}")
    kv, cross = make_caches(model, b, cache_frames, ft, dtype=noise.dtype, device=noise.device)
    seq_len = (given + f) * ft
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.zeros(b, noise.shape[1], given + f, hh, ww, dtype=noise.dtype, device=noise.device)
    ctx = context

    def refresh(x0, start):
        tt = torch.full((b, chunk_frames), float(context_timestep), device=noise.device)
        model(x0, t=tt, context=ctx, seq_len=seq_len, kv_cache=kv, crossattn_cache=cross, current_start=start)

    for c0 in range(0, given, chunk_frames):
        out[:, :, c0:c0 + chunk_frames] = initial_latent[:, :, c0:c0 + chunk_frames]
        refresh(initial_latent[:, :, c0:c0 + chunk_frames], c0 * ft)
    for n0 in range(0, f, chunk_frames):
        c0 = given + n0
        x = noise[:, :, n0:n0 + chunk_frames]
        start = c0 * ft
        x0 = x
        for i, t in enumerate(timesteps):
            tt = torch.full((b, chunk_frames), float(t), device=noise.device)
            v = model(x, t=tt, context=ctx, seq_len=seq_len, kv_cache=kv, crossattn_cache=cross, current_start=start)
            v = v if isinstance(v, torch.Tensor) else torch.stack(list(v))
            sigma = float(t) / 1000.0
            x0 = x - sigma * v
            if i + 1 < len(timesteps):
                s = float(timesteps[i + 1]) / 1000.0
                x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g).to(x0)
        out[:, :, c0:c0 + chunk_frames] = x0
        refresh(x0, start)
    return out


__all__: List[str] = ["CausalWanModel", "causal_generate", "make_caches", "attention", "flash_attention"]
