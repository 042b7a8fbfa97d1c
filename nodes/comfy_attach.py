"""Attach a :class:`wan_capture.Recorder` to a ComfyUI Wan model clone, through ComfyUI's own patch points.

Nothing global is touched: everything lives in the clone's ``model_options``, so other models (and the unpatched
original) run as before, and nothing is left behind after sampling.

* ``OUTER_SAMPLE`` wrapper: one sampling pass; knows the sigma schedule, fingerprints the input and output latents.
* ``DIFFUSION_MODEL`` wrapper: one model evaluation; the latent grid, the step (from the sigma), the cond/uncond rows.
* ``dit``/``double_block`` replace patch per block: the block index (Wan sets none in ``transformer_options``).
* ``optimized_attention_override``: every attention call; its position inside the block gives its kind (Wan calls
  self-attention, then for i2v image cross-attention, then text cross-attention). An override installed before ours
  is called through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import comfy.patcher_extension as patcher_extension

from ..wan_capture import CROSS_IMAGE, CROSS_TEXT, SELF, AttentionCall, Grid, Recorder, branch_rows, fingerprint

KEY = "wan_attention_capture"
HEAD_DIM = 128


@dataclass
class _Forward:
    """What is known about the model evaluation in flight."""

    grid: Grid
    step: Optional[int]
    exact: bool
    sigma: float
    timestep: Optional[float]
    branches: Tuple[str, ...]
    block: Optional[int] = None
    calls: int = 0


class _State:
    def __init__(self, recorder: Recorder, info: dict, kinds: Tuple[str, ...], model_sampling, previous_override):
        self.recorder, self.info, self.kinds = recorder, info, kinds
        self.model_sampling, self.previous = model_sampling, previous_override
        self.fwd: Optional[_Forward] = None


def wan_diffusion_model(model_patcher):
    """The Wan DiT inside a ModelPatcher, or a clear error naming what was given instead."""
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    blocks = getattr(dm, "blocks", None)
    ok = (type(dm).__module__.startswith("comfy.ldm.wan") and blocks is not None and len(blocks) > 0
          and hasattr(blocks[0], "self_attn") and hasattr(blocks[0], "cross_attn"))
    if not ok:
        raise TypeError(
            "Attach Attention Recorder works on Wan video models (Wan 2.1 / 2.2 in ComfyUI), but got "
            f"{type(model_patcher).__name__} holding {type(base).__name__} / {type(dm).__name__}. "
            "Connect the MODEL output of a Wan checkpoint or diffusion-model loader.")
    return dm


def model_info(model_patcher) -> Tuple[dict, Tuple[str, ...]]:
    """Facts about the Wan model the recording depends on, and the kinds of its per-block attention calls."""
    dm = wan_diffusion_model(model_patcher)
    i2v = type(dm.blocks[0].cross_attn).__name__ == "WanI2VCrossAttention"
    latent_channels = int(dm.out_dim)
    vae_spatial = 16 if latent_channels == 48 else 8  # the Wan 2.2 TI2V VAE compresses 16x, Wan 2.1's 8x
    info = {
        "model_type": type(model_patcher.model).__name__,
        "diffusion_model": type(dm).__name__,
        "num_blocks": len(dm.blocks),
        "num_heads": int(dm.num_heads),
        "head_dim": int(dm.dim // dm.num_heads),
        "dim": int(dm.dim),
        "cross_attention": "i2v" if i2v else "t2v",
        "in_channels": int(dm.patch_embedding.weight.shape[1]),
        "patch_size": list(dm.patch_size),
        "latent_channels": latent_channels,
        "vae_stride": [4, vae_spatial, vae_spatial],
    }
    kinds = (SELF, CROSS_IMAGE, CROSS_TEXT) if i2v else (SELF, CROSS_TEXT)
    return info, kinds


def _transformer_options(args, kwargs) -> dict:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict):
            return a
    return {}


def _make_outer_sample(state: _State):
    def outer_sample(executor, *args, **kwargs):
        # args: noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed
        latent_image, sigmas = args[1], args[3]
        seed = args[7] if len(args) > 7 else kwargs.get("seed")
        guider = getattr(executor, "class_obj", None)
        sampling = {"seed": seed, "cfg": getattr(guider, "cfg", None), "guider": type(guider).__name__}
        state.recorder.begin_pass(sigmas.tolist(), state.info, input_fingerprint=fingerprint(latent_image),
                                  sampling=sampling)
        try:
            out = executor(*args, **kwargs)
        except BaseException as e:  # interrupted or failed: keep what was recorded, marked partial
            state.recorder.end_pass(error=e)
            state.fwd = None
            raise
        state.recorder.end_pass(output_fingerprint=fingerprint(out))
        state.fwd = None
        return out
    return outer_sample


def _make_forward(state: _State):
    def forward(executor, *args, **kwargs):
        x = args[0]
        to = _transformer_options(args, kwargs)
        if state.recorder.active is None or x.dim() != 5:
            return executor(*args, **kwargs)
        t, h, w = x.shape[-3:]
        time_dim_concat = args[4] if len(args) > 4 and hasattr(args[4], "shape") else kwargs.get("time_dim_concat")
        if time_dim_concat is not None:
            t += time_dim_concat.shape[-3]
        if "reference_latent" in kwargs and getattr(executor.class_obj, "ref_conv", None) is not None:
            t += 1
        grid = Grid.from_latent((t, h, w), tuple(state.info["patch_size"]))
        sigmas = to.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else float("nan")
        step, exact = state.recorder.locate(sigma)
        timestep = None
        if state.model_sampling is not None and sigmas is not None:
            timestep = float(state.model_sampling.timestep(sigmas.flatten()[:1].float().cpu())[0])
        state.fwd = _Forward(grid, step, exact, sigma, timestep, branch_rows(to.get("cond_or_uncond"), x.shape[0]))
        try:
            return executor(*args, **kwargs)
        finally:
            state.fwd = None
    return forward


def _make_block_patch(state: _State, index: int, existing):
    def block(args, extra):
        fwd = state.fwd
        if fwd is not None:
            fwd.block, fwd.calls = index, 0
        try:
            return existing(args, extra) if existing is not None else extra["original_block"](args)
        finally:
            if fwd is not None:
                fwd.block = None
    return block


def _make_override(state: _State):
    def override(func, *args, **kwargs):
        def attend():
            if state.previous is not None:
                return state.previous(func, *args, **kwargs)
            return func(*args, **kwargs)

        fwd = state.fwd
        if fwd is None or fwd.block is None or fwd.step is None:
            return attend()
        position, fwd.calls = fwd.calls, fwd.calls + 1
        q, k = args[0], args[1]
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        kind = state.kinds[position] if position < len(state.kinds) else None
        if kind == SELF and k.shape[1] != q.shape[1]:
            kind = None
        if kind is None or q.dim() != 3:
            take = state.recorder.active
            if take is not None:
                take.skipped["unrecognised_attention_calls"] += 1
            return attend()
        call = AttentionCall(block=fwd.block, kind=kind, step=fwd.step, sigma=fwd.sigma, branches=fwd.branches,
                             grid=fwd.grid, heads=int(heads), timestep=fwd.timestep)
        return state.recorder.tap(call, q, k, attend, exact_step=fwd.exact)
    return override


def attach_recorder(model_patcher, recorder: Recorder):
    """A clone of ``model_patcher`` whose every Wan attention call goes through ``recorder``."""
    info, kinds = model_info(model_patcher)
    model = model_patcher.clone()
    to = model.model_options.setdefault("transformer_options", {})
    sampling = getattr(model.model, "model_sampling", None)
    state = _State(recorder, info, kinds, sampling, to.get("optimized_attention_override"))
    to["optimized_attention_override"] = _make_override(state)
    model.add_wrapper_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, _make_outer_sample(state))
    model.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, _make_forward(state))
    replace = to.get("patches_replace", {}).get("dit", {})
    for i in range(info["num_blocks"]):
        model.set_model_patch_replace(_make_block_patch(state, i, replace.get(("double_block", i))),
                                      "dit", "double_block", i)
    return model
