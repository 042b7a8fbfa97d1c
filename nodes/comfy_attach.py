"""Attach a :class:`wan_capture.Recorder` to a ComfyUI Wan model clone, through ComfyUI's own patch points.

Nothing global is touched: everything lives in the clone's ``model_options``, so other models (and the unpatched
original) run as before, and nothing is left behind after sampling.

* ``OUTER_SAMPLE`` wrapper: one sampling pass; knows the sigma schedule, fingerprints the input and output latents.
* ``DIFFUSION_MODEL`` wrapper: one model evaluation; the latent grid, the step (from the sigma), the cond/uncond rows.
* ``dit``/``double_block`` replace patch per block: the block index (Wan sets none in ``transformer_options``).
* ``optimized_attention_override``: every attention call; its position inside the block gives its kind (Wan calls
  self-attention, then for i2v image cross-attention, then text cross-attention). An override installed before ours
  is called through.
* ComfyUI's own causal Wan (``ar_model.CausalWanModel``): per-evaluation block hooks (:mod:`.comfy_causal`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import comfy.patcher_extension as patcher_extension
import torch

from ..wan_capture import Grid, Recorder, branch_rows, fingerprint
from ..wan_capture.capture.lse_attention import LseAttention
from ..wan_capture.model_info import ModelInfo, describe_model
from ..wan_capture.capture.time_layout import TimeLayout, vace_reference_frames
from ..wan_capture.capture.tracker import CallTracker, Evaluation
from .comfy_causal import ComfyCausal, check_comfy_causal, is_comfy_causal

KEY = "wan_attention_capture"


class _Comfy(CallTracker):
    """The call tracker plus what the ComfyUI patch points need: the sampling's sigmas and an earlier override."""

    def __init__(self, recorder: Recorder, info: ModelInfo, kinds, model_sampling, previous_override):
        super().__init__(recorder, info, kinds)
        self.model_sampling, self.previous = model_sampling, previous_override
        self.lse_attention = LseAttention()
        self.causal: Optional[ComfyCausal] = None  # ComfyUI's own causal Wan (comfy_causal)


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


def model_info(model_patcher) -> Tuple[ModelInfo, Tuple[str, ...]]:
    """Facts about the Wan model the recording depends on, and the kinds of its per-block attention calls."""
    dm = wan_diffusion_model(model_patcher)
    info = describe_model(dm, model_type=type(model_patcher.model).__name__)
    return info, info.call_kinds


def _transformer_options(args, kwargs) -> dict:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict):
            return a
    return {}


CALLBACK = 5  # outer_sample's positional arguments: noise, latent_image, sampler, sigmas, denoise_mask, callback, ...


def _watch_x0(args: tuple, kwargs: dict, last: dict):
    """``(args, kwargs)`` whose step callback also keeps the step's denoised latent in ``last["x0"]`` (SamplerCustom's
    ``denoised_output`` is the last one, processed), calling the sampler's own callback as before."""
    given = args[CALLBACK] if len(args) > CALLBACK else kwargs.get("callback")

    def callback(step, x0, *rest, **kw):
        last["x0"] = x0
        return given(step, x0, *rest, **kw) if given is not None else None
    if len(args) > CALLBACK:
        return args[:CALLBACK] + (callback,) + args[CALLBACK + 1:], kwargs
    return args, dict(kwargs, callback=callback)


def _alias_denoised(take, guider, x0) -> None:
    """SamplerCustom's ``denoised_output`` (the last step's x0 as it computes it: ``process_latent_out(x0.cpu())``)
    names the same recording as its ``output``."""
    process = getattr(getattr(getattr(guider, "model_patcher", None), "model", None), "process_latent_out", None)
    if take is None or x0 is None or process is None:
        return
    take.log.aliases[fingerprint(process(x0.cpu()))] = "denoised_output"


def _make_outer_sample(state: _Comfy):
    def outer_sample(executor, *args, **kwargs):
        # args: noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed
        latent_image, sigmas = args[1], args[3]
        seed = args[7] if len(args) > 7 else kwargs.get("seed")
        guider = getattr(executor, "class_obj", None)
        last: dict = {}
        args, kwargs = _watch_x0(args, kwargs, last)
        sampling = {"seed": seed, "cfg": getattr(guider, "cfg", None), "guider": type(guider).__name__}
        state.recorder.begin_pass(sigmas.tolist(), state.info, input_fingerprint=fingerprint(latent_image),
                                  sampling=sampling, weights=state.weights)
        try:
            out = executor(*args, **kwargs)
        except BaseException as e:  # interrupted or failed: keep what was recorded, marked partial
            state.recorder.end_pass(error=e)
            state.end_evaluation()
            raise
        take = state.recorder.end_pass(output_fingerprint=fingerprint(out))
        reference = take.time_layout.reference if take is not None else 0
        if reference and out.dim() == 5:  # VACE: users pass on the latent TrimVideoLatent makes of it
            take.log.aliases[fingerprint(out[:, :, reference:])] = "after TrimVideoLatent"
        _alias_denoised(take, guider, last.get("x0"))
        state.end_evaluation()
        return out
    return outer_sample


def _make_forward(state: _Comfy, apply_model: bool = False):
    """The per-evaluation wrapper: of the DiT (``DIFFUSION_MODEL``), or of ``BaseModel.apply_model``
    (``APPLY_MODEL``, for ComfyUI's causal Wan, whose chunked path never reaches its ``DIFFUSION_MODEL`` wrappers)."""
    def forward(executor, *args, **kwargs):
        x = args[0]
        to = _transformer_options(args, kwargs)
        if state.recorder.active is None or x.dim() != 5:
            return executor(*args, **kwargs)
        if apply_model:
            dm, context = executor.class_obj.diffusion_model, args[3] if len(args) > 3 else kwargs.get("c_crossattn")
        else:
            dm, context = executor.class_obj, args[2] if len(args) > 2 else kwargs.get("context")
        t, h, w = x.shape[-3:]
        time_dim_concat = args[4] if len(args) > 4 and hasattr(args[4], "shape") else kwargs.get("time_dim_concat")
        lead = trail = 0
        if time_dim_concat is not None:  # Phantom: subject frames appended after the video's
            trail = time_dim_concat.shape[-3]
        if "reference_latent" in kwargs and getattr(dm, "ref_conv", None) is not None:
            lead = 1  # Wan 2.2 Fun: the reference latent goes in front
        grid = Grid.from_latent((t + lead + trail, h, w), state.info.patch_size)
        take = state.recorder.active
        if take.grid is None:
            take.time_layout = TimeLayout(vace_reference_frames(kwargs.get("vace_context")), lead, trail)
        sigmas = to.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else float("nan")
        causal, chunk = state.causal, None
        if causal is not None:  # ComfyUI's causal Wan: a chunk of the video against its KV cache
            causal.begin(take, to.get("ar_state"))
            chunk = causal.start_frame
        step, exact = state.locate(sigma)
        if chunk is not None and step is not None:
            take.step_pass.setdefault(step, causal.step_pass(sigma))
        timestep = None
        if state.model_sampling is not None and sigmas is not None:
            timestep = float(state.model_sampling.timestep(sigmas.flatten()[:1].float().cpu())[0])
        branches = branch_rows(to.get("cond_or_uncond"), x.shape[0])
        check_contexts(state, context, branches)
        state.begin_evaluation(Evaluation(step, exact, sigma, timestep, branches, grid, chunk))
        try:
            if causal is None:
                return executor(*args, **kwargs)
            with causal.hooks(dm, to):
                return executor(*args, **kwargs)
        finally:
            state.end_evaluation()
    return forward


def check_contexts(state: _Comfy, context, branches) -> None:
    """Once per pass: each branch's rows must attend to the text its tracker encoded, else their maps would be
    saved under the wrong words. Refused before anything is recorded, saying which output to connect."""
    encoded = state.recorder.plan.extra.get("encoded") or {}
    take = state.recorder.active
    mark = (take.id, len(take.log.passes))
    if not encoded or context is None or getattr(state, "checked", None) == mark:
        return
    state.checked = mark
    for branch, ref in encoded.items():
        want = ref[0] if ref.dim() == 3 else ref
        for r in [i for i, b in enumerate(branches) if b == branch]:
            row = context[r]
            expect, times = want, (row.shape[0] // want.shape[0] if row.dim() == want.dim() else 0)
            if times > 1 and row.shape[0] == times * want.shape[0]:
                # contexts of other lengths in one batch are repeated to a common length (ComfyUI's CONDCrossAttn)
                expect = want.repeat(times, *([1] * (want.dim() - 1)))
            if row.shape != expect.shape or not torch.equal(row, expect.to(row.device, row.dtype)):
                words = state.recorder.plan.extra.get("tokens" if branch == "cond" else "negative_tokens") or {}
                output = "positive" if branch == "cond" else "negative"
                raise ValueError(
                    f"the {branch} rows attend to another text than the {'' if branch == 'cond' else 'negative '}"
                    f"prompt the Weighted Token Tracker encoded ({str(words.get('prompt', ''))[:80]!r}): their maps "
                    f"would be saved under the wrong words. Connect the tracker's '{output}' output to the sampler, "
                    f"or give the tracker the text that is encoded")


def _make_block_patch(state: _Comfy, index: int, existing):
    def block(args, extra):
        tracking = state.evaluation is not None
        if tracking:
            state.enter_block(index)
        try:
            return existing(args, extra) if existing is not None else extra["original_block"](args)
        finally:
            if tracking:
                state.leave_block()
    return block


def _make_override(state: _Comfy):
    def override(func, *args, **kwargs):
        def attend():
            if state.previous is not None:
                return state.previous(func, *args, **kwargs)
            return func(*args, **kwargs)

        heads = int(kwargs["heads"] if "heads" in kwargs else args[3])
        attend_lse = None
        # ComfyUI's plain call (no mask, default reshapes) and no earlier override: the log-sum-exp can come from the
        # same attention kernel, verified bit-identical once per shape (wan_capture.capture.lse_attention)
        if (state.previous is None and len(args) <= 4 and kwargs.get("mask") is None
                and not kwargs.get("skip_reshape") and not kwargs.get("skip_output_reshape") and args[0].is_cuda):
            attend_lse = lambda: state.lse_attention(args[0], args[1], args[2], heads, attend)  # noqa: E731
        layout = state.causal.self_layout(args[0], args[1]) if state.causal is not None else None
        return state.tap(args[0], args[1], heads, attend, layout=layout, attend_lse=attend_lse)
    return override


def install_recorder(target, recorder: Recorder, info: Optional[ModelInfo] = None,
                     kinds: Optional[Tuple[str, ...]] = None, model_sampling=None) -> CallTracker:
    """Route every Wan attention call through ``recorder``; returns the call tracker.

    ``target``: a ``ModelPatcher`` (patched in place, so pass a clone; ``info``/``kinds`` are read from it), or the
    ``transformer_options`` dict of a Wan DiT called directly (benchmarks: give ``info``; there is no sampling pass,
    so call ``recorder.begin_pass``/``end_pass`` around the evaluations). Installs an ``optimized_attention_override``
    (calling through an earlier one), per-block ``dit``/``double_block`` patches, a ``DIFFUSION_MODEL`` wrapper and,
    on a patcher, an ``OUTER_SAMPLE`` wrapper (ComfyUI's causal Wan: an ``APPLY_MODEL`` wrapper in place of
    ``DIFFUSION_MODEL``, see :mod:`.comfy_causal`).
    """
    patcher = not isinstance(target, dict)
    if patcher and (info is None or kinds is None):
        info, kinds = model_info(target)
    if info is None:
        raise ValueError("install_recorder on a transformer_options dict needs the model's ModelInfo")
    kinds = info.call_kinds if kinds is None else kinds
    recorder.plan.check_model(info.num_blocks, info.num_heads)  # at the Attach node, before any sampling
    to = target.model_options.setdefault("transformer_options", {}) if patcher else target
    if patcher and model_sampling is None:
        model_sampling = getattr(target.model, "model_sampling", None)
    state = _Comfy(recorder, info, kinds, model_sampling, to.get("optimized_attention_override"))
    dm = getattr(getattr(target, "model", None), "diffusion_model", None) if patcher else None
    if dm is not None and is_comfy_causal(dm):
        check_comfy_causal(dm)
        state.causal = ComfyCausal(state)
    # which weights: two Attach nodes sharing one recorder over different models are experts (Wan 2.2 A14B)
    state.weights = id(getattr(getattr(target, "model", None), "diffusion_model", None)) if patcher else None
    to["optimized_attention_override"] = _make_override(state)
    replace = to.get("patches_replace", {}).get("dit", {})
    patches = {i: _make_block_patch(state, i, replace.get(("double_block", i))) for i in range(info.num_blocks)}
    if patcher:
        target.add_wrapper_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, _make_outer_sample(state))
        if state.causal is not None:  # its chunks bypass the DiT's wrappers; apply_model sees every evaluation
            target.add_wrapper_with_key(patcher_extension.WrappersMP.APPLY_MODEL, KEY, _make_forward(state, True))
        else:
            target.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, _make_forward(state))
        for i, patch in patches.items():
            target.set_model_patch_replace(patch, "dit", "double_block", i)
    else:
        patcher_extension.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY,
                                               _make_forward(state), to)
        dit = to.setdefault("patches_replace", {}).setdefault("dit", {})
        for i, patch in patches.items():
            dit[("double_block", i)] = patch
    return state


def attach_recorder(model_patcher, recorder: Recorder):
    """A clone of ``model_patcher`` whose every Wan attention call goes through ``recorder``."""
    info, kinds = model_info(model_patcher)
    model = model_patcher.clone()
    install_recorder(model, recorder, info, kinds)
    return model
