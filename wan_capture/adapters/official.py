"""The official Wan code (``wan.modules.model.WanModel``, e.g. from the ``wan22`` package).

The tap replaces ``wan.modules.model.flash_attention`` while the context is open; block and kind come from hooks on
each block's ``self_attn``/``cross_attn``. Without flash-attn installed the tap computes the attention with SDPA over
the same valid keys (``k_lens``) and the same half-precision cast, so the model runs on any machine.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..capture.call import SELF
from ..grid import Grid
from ..model_info import describe_model
from .session import Patches, PipelineTracker, recording_pass, timestep_of


def is_official(model) -> bool:
    return type(model).__module__.startswith("wan.modules") and type(model).__name__ == "WanModel"


def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                   causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    """A drop-in for ``flash_attention`` without flash-attn: ``[B, Lq, N, D]``, keys past ``k_lens`` masked out."""
    if tuple(window_size) != (-1, -1) or dropout_p:
        raise NotImplementedError("the SDPA stand-in covers global attention without dropout, as Wan inference uses")
    out_dtype = q.dtype
    cast = lambda x: x if x.dtype in (torch.float16, torch.bfloat16) else x.to(dtype)  # noqa: E731
    q, k, v = cast(q), cast(k).to(cast(v).dtype), cast(v)
    q = q.to(v.dtype)
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal and mask is None,
        scale=softmax_scale)
    return out.transpose(1, 2).to(out_dtype)


@contextmanager
def attach(model, recorder, branch_order=("cond", "uncond")):
    import wan.modules.attention as wa
    import wan.modules.model as wm
    info = describe_model(model, model_type="wan-official")
    session = PipelineTracker(recorder, info, branch_order)
    original = wm.flash_attention
    have_flash = getattr(wa, "FLASH_ATTN_2_AVAILABLE", False) or getattr(wa, "FLASH_ATTN_3_AVAILABLE", False)

    def tapped(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None, causal=False,
               window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
        def attend():
            if have_flash:
                return original(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, q_scale, causal, window_size,
                                deterministic, dtype, version)
            return sdpa_attention(q, k, v, q_lens, k_lens, dropout_p, softmax_scale, q_scale, causal, window_size,
                                  deterministic, dtype, version)
        # the statistics see q and k as the attention does: cast to the half precision it runs in
        half = lambda x: x if x.dtype in (torch.float16, torch.bfloat16) else x.to(dtype)  # noqa: E731
        return session.tap_bsnd(half(q), half(k), attend)

    def pre_forward(module, args, kwargs):
        x = kwargs.get("x", args[0] if args else None)
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        pt, ph, pw = module.patch_size
        f, h, w = x[0].shape[-3:]
        session.begin_forward(timestep_of(t), len(x), Grid(f // pt, h // ph, w // pw))

    patches = Patches()
    patches.hook(model.register_forward_pre_hook(pre_forward, with_kwargs=True))
    patches.hook(model.register_forward_hook(lambda *a: session.end_evaluation()))
    for i, block in enumerate(model.blocks):
        for module, kinds in ((block.self_attn, (SELF,)), (block.cross_attn, info.cross_kinds)):
            patches.hook(module.register_forward_pre_hook(lambda m, a, i=i, kinds=kinds: session.enter_block(i, kinds)))
            patches.hook(module.register_forward_hook(lambda *a: session.leave_block()))
    patches.replace(wm, "flash_attention", tapped)
    with recording_pass(recorder, info, patches.undo) as rec:
        yield rec
