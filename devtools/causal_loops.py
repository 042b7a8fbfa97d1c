"""The KV-cache loops of the causal Wan projects, for tiny models on a CPU.

The projects' pipelines load real weights, text encoders and VAEs (CausVid's also hard-codes CUDA), so these loops
make the same model calls in the same order with the same arguments and the same caches as each project's inference
pipeline, at tiny shapes. The cache bookkeeping itself (writing, rolling, evicting, pinning, re-roping) is the
projects' own model code. Denoising is flow matching with ``sigma = t / 1000`` (``x0 = x_t - sigma * v``, re-noised
to the next timestep); the projects use their schedulers' sigmas, which changes numbers, not calls.

* :func:`causvid_generate`: CausVid's ``causvid/models/wan/causal_inference.py``.
* :func:`rolling_generate`: Rolling Forcing's ``pipeline/rolling_forcing_inference.py`` (also Causal-Forcing's
  ``long_video/pipeline``).
* :func:`longlive_generate`: LongLive's ``pipeline/causal_diffusion_inference.py`` (CFG with a positive and a
  negative cache, the clean re-run at timestep 0, a multi-shot pin of the chunk at a scene cut).
* Self-Forcing and Causal-Forcing's ``wan/``: :func:`devtools.tiny_causal.causal_generate`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

TIMESTEPS = (1000.0, 750.0, 500.0, 250.0)


def _heads(model):
    attn = model.blocks[0].self_attn
    return attn.num_heads, attn.head_dim


def _frame_tokens(model, noise: torch.Tensor) -> int:
    _, ph, pw = model.patch_size
    return (noise.shape[-2] // ph) * (noise.shape[-1] // pw)


def _renoise(x0: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g).to(x0)


def _as_tensor(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.stack(list(v))


def _cross_caches(model, batch: int, dtype, device) -> List[dict]:
    n, d = _heads(model)
    return [{"k": torch.zeros(batch, model.text_len, n, d, dtype=dtype, device=device),
             "v": torch.zeros(batch, model.text_len, n, d, dtype=dtype, device=device), "is_init": False}
            for _ in model.blocks]


def kv_caches(model, batch: int, tokens: int, dtype, device, indices: bool = True, pinned: bool = False) -> List[dict]:
    """One KV cache dict per block, as the projects' ``_initialize_kv_cache`` make them."""
    n, d = _heads(model)
    out = []
    for _ in model.blocks:
        c = {"k": torch.zeros(batch, tokens, n, d, dtype=dtype, device=device),
             "v": torch.zeros(batch, tokens, n, d, dtype=dtype, device=device)}
        if indices:
            c.update(global_end_index=torch.tensor([0], dtype=torch.long, device=device),
                     local_end_index=torch.tensor([0], dtype=torch.long, device=device))
        if pinned:
            c.update(quantized=False, pinned_start=torch.tensor([-1], dtype=torch.long, device=device),
                     pinned_len=torch.tensor([0], dtype=torch.long, device=device))
        out.append(c)
    return out


@torch.no_grad()
def causvid_generate(model, noise: torch.Tensor, context: torch.Tensor, chunk_frames: int,
                     timesteps: Sequence[float] = TIMESTEPS, seed: int = 0) -> torch.Tensor:
    """CausVid: ``noise [B, C, F, H, W]`` -> clean latent. One cache holds every frame (nothing is evicted); each
    chunk is denoised at ``timesteps`` with ``current_start``/``current_end``, then run clean at timestep 0."""
    b, _, f, _, _ = noise.shape
    ft = _frame_tokens(model, noise)
    kv = kv_caches(model, b, f * ft, noise.dtype, noise.device, indices=False)
    cross = _cross_caches(model, b, noise.dtype, noise.device)
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(noise)
    for c0 in range(0, f, chunk_frames):
        span = dict(current_start=c0 * ft, current_end=(c0 + chunk_frames) * ft)
        x = noise[:, :, c0:c0 + chunk_frames]
        for i, t in enumerate(timesteps):
            tt = torch.full((b, chunk_frames), float(t), device=noise.device)
            v = _as_tensor(model(x, t=tt, context=context, seq_len=f * ft, kv_cache=kv, crossattn_cache=cross,
                                 **span))
            x0 = x - float(t) / 1000.0 * v
            if i + 1 < len(timesteps):
                x = _renoise(x0, float(timesteps[i + 1]) / 1000.0, g)
        out[:, :, c0:c0 + chunk_frames] = x0
        model(x0, t=torch.zeros(b, chunk_frames, device=noise.device), context=context, seq_len=f * ft, kv_cache=kv,
              crossattn_cache=cross, **span)
    return out


@torch.no_grad()
def rolling_generate(model, noise: torch.Tensor, context: torch.Tensor, block_frames: int,
                     timesteps: Sequence[float] = TIMESTEPS, cache_frames: int = 24, seed: int = 0) -> torch.Tensor:
    """Rolling Forcing: ``noise [B, C, F, H, W]`` -> clean latent. A window of ``len(timesteps)`` blocks rolls over
    the video; one evaluation denoises every block in it, each at its own timestep (the newest at the highest), and
    the window's oldest block, then clean, is written to the cache by an ``updating_cache`` pass at timestep 0."""
    b, ch, f, hh, ww = noise.shape
    ft = _frame_tokens(model, noise)
    if f % block_frames:
        raise ValueError(f"{f} frames do not split into blocks of {block_frames}")
    kv = kv_caches(model, b, cache_frames * ft, noise.dtype, noise.device)
    cross = _cross_caches(model, b, noise.dtype, noise.device)
    g = torch.Generator().manual_seed(seed)
    steps = [float(t) for t in timesteps]
    blocks, window = f // block_frames, len(steps)
    shared = torch.tensor([t for t in reversed(steps) for _ in range(block_frames)], device=noise.device)
    noisy = torch.zeros_like(noise)
    out = torch.zeros_like(noise)
    for w in range(blocks + window - 1):
        first, last = max(0, w - window + 1), min(blocks - 1, w)
        s0, s1 = first * block_frames, (last + 1) * block_frames
        n = s1 - s0
        if n == window * block_frames or s0 == 0:
            x = torch.cat([noisy[:, :, s0:s1 - block_frames], noise[:, :, s1 - block_frames:s1]], dim=2)
        else:
            x = noisy[:, :, s0:s1]
        tt = shared if n == window * block_frames else shared[-n:] if s0 == 0 else shared[:n]
        tt = tt[None].expand(b, n)
        # the pipeline's wrapper passes cache_start=None (the block then caches from current_start)
        v = _as_tensor(model(x, t=tt, context=context, seq_len=f * ft, kv_cache=kv, crossattn_cache=cross,
                             current_start=s0 * ft, cache_start=None))
        sigma = (tt / 1000.0)[:, None, :, None, None].to(x)
        x0 = x - sigma * v
        out[:, :, s0:s1] = x0
        for j in range(first, last + 1):
            t = float(tt[0, (j - first) * block_frames])
            k = steps.index(t)
            if k + 1 < len(steps):
                lo = (j - first) * block_frames
                noisy[:, :, j * block_frames:(j + 1) * block_frames] = _renoise(
                    x0[:, :, lo:lo + block_frames], steps[k + 1] / 1000.0, g)
        model(x0[:, :, :block_frames], t=torch.zeros(b, block_frames, device=noise.device), context=context,
              seq_len=f * ft, kv_cache=kv, crossattn_cache=cross, current_start=s0 * ft, cache_start=None,
              updating_cache=True)
    return out


@torch.no_grad()
def longlive_generate(model, noise: torch.Tensor, context, negative: torch.Tensor, chunk_frames: int,
                      timesteps: Sequence[float] = TIMESTEPS, guidance: float = 3.0, multi_shot_sink: bool = False,
                      scene_cuts: Sequence[int] = (), initial_latent: Optional[torch.Tensor] = None,
                      seed: int = 0) -> torch.Tensor:
    """LongLive's ``CausalDiffusionInferencePipeline.inference``: ``noise [B, C, F, H, W]`` -> the clean latent
    (``initial_latent``'s frames first when given), with classifier-free guidance on a positive and a negative cache.

    The geometry is the pipeline's: the cache holds ``local_attn_size`` frames of the model and every module's
    ``max_attention_size`` is set to the same (``_set_all_modules_max_attention_size``); ``sink_size`` frames are
    the sink, and with ``multi_shot_sink`` they are a global sink (``global_sink_size = sink_size``) and a chunk
    starting a scene (its index in ``scene_cuts``) is pinned in both caches after its clean pass
    (``_pin_current_chunk``). ``context``: one prompt ``[B, L, D]``, or a list of prompt blocks, one per generated
    chunk (``conditional_dict_list``). ``initial_latent [B, C, Fi, H, W]`` (image-to-video, video extension; Fi a
    multiple of ``chunk_frames``): its chunks are written into both caches at timestep 0 first, each pass given
    every prompt block at once as the pipeline's ``conditional_dict`` (``[B * blocks, L, D]``). The modules'
    settings are restored afterwards, as the pipeline restores them."""
    b, _, f, _, _ = noise.shape
    ft = _frame_tokens(model, noise)
    attns = [blk.self_attn for blk in model.blocks]
    saved = [(a.max_attention_size, a.sink_size, a.global_sink_size) for a in attns]
    cache_frames = int(model.local_attn_size)
    sink = int(attns[0].sink_size or 0)
    for a in attns:
        a.max_attention_size = cache_frames * ft
        a.global_sink_size = sink if multi_shot_sink else 0
    blocks = list(context) if isinstance(context, (list, tuple)) else [context] * (f // chunk_frames)
    fi = 0 if initial_latent is None else initial_latent.shape[2]
    caches = [kv_caches(model, b, cache_frames * ft, noise.dtype, noise.device, pinned=True) for _ in range(2)]
    cross = [_cross_caches(model, b, noise.dtype, noise.device) for _ in range(2)]
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(b, noise.shape[1], fi + f, *noise.shape[3:], dtype=noise.dtype, device=noise.device)
    try:
        every_block = torch.stack(blocks, dim=1).flatten(0, 1)  # [B * blocks, L, D], batch-major as the pipeline's
        for c0 in range(0, fi, chunk_frames):
            x = initial_latent[:, :, c0:c0 + chunk_frames]
            out[:, :, c0:c0 + chunk_frames] = x
            for p, kv, cr in zip((every_block, negative), caches, cross):
                model(x, t=torch.zeros(b, chunk_frames, device=noise.device), context=p, seq_len=(fi + f) * ft,
                      kv_cache=kv, crossattn_cache=cr, current_start=c0 * ft, cache_start=c0 * ft)
        for index, n0 in enumerate(range(0, f, chunk_frames)):
            c0 = fi + n0
            prompts = (blocks[index], negative)
            start = dict(current_start=c0 * ft, cache_start=c0 * ft)
            x = noise[:, :, n0:n0 + chunk_frames]
            for i, t in enumerate(timesteps):
                tt = torch.full((b, chunk_frames), float(t), device=noise.device)
                cond, uncond = (_as_tensor(model(x, t=tt, context=p, seq_len=(fi + f) * ft, kv_cache=kv,
                                                 crossattn_cache=cr, **start))
                                for p, kv, cr in zip(prompts, caches, cross))
                v = uncond + guidance * (cond - uncond)
                x0 = x - float(t) / 1000.0 * v
                if i + 1 < len(timesteps):
                    x = _renoise(x0, float(timesteps[i + 1]) / 1000.0, g)
            out[:, :, c0:c0 + chunk_frames] = x0
            for p, kv, cr in zip(prompts, caches, cross):
                model(x0, t=torch.zeros(b, chunk_frames, device=noise.device), context=p, seq_len=(fi + f) * ft,
                      kv_cache=kv, crossattn_cache=cr, **start)
            if multi_shot_sink and sink and index in scene_cuts:
                for kv in caches:
                    _pin_current_chunk(model, kv, chunk_frames, ft)
    finally:
        for a, (m, s_, gs) in zip(attns, saved):
            a.max_attention_size, a.sink_size, a.global_sink_size = m, s_, gs
    return out


def _pin_current_chunk(model, kv_cache: List[dict], chunk_frames: int, frame_tokens: int) -> None:
    """LongLive's ``CausalDiffusionInferencePipeline._pin_current_chunk``: the chunk just written is pinned for
    ``sink_size`` frames at its buffer position."""
    chunk_tokens = chunk_frames * frame_tokens
    pin_len = min(model.blocks[0].self_attn.sink_size * frame_tokens, chunk_tokens)
    local_end = int(kv_cache[0]["local_end_index"].item())
    for block_cache in kv_cache:
        block_cache["pinned_start"].fill_(local_end - chunk_tokens)
        block_cache["pinned_len"].fill_(pin_len)


__all__: Optional[List[str]] = ["causvid_generate", "rolling_generate", "longlive_generate", "kv_caches"]
