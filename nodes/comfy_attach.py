"""Attach a :class:`wan_capture.Recorder` to a ComfyUI Wan model clone, through ComfyUI's own patch points.

Nothing global is touched: everything lives in the clone's ``model_options``, so other models (and the unpatched
original) run as before, and nothing is left behind after sampling.

* ``OUTER_SAMPLE`` wrapper: one sampling pass; knows the sigma schedule, fingerprints the input and output latents.
* ``DIFFUSION_MODEL`` wrapper: one model evaluation; the latent grid, the step (from the sigma), the cond/uncond rows.
* ``dit``/``double_block`` replace patch per block: the block index (Wan sets none in ``transformer_options``).
* ``optimized_attention_override``: every attention call; its position inside the block gives its kind (Wan calls
  self-attention, then for i2v image cross-attention, then text cross-attention). Another override is called
  through, whichever was installed first, per-module backends and tensor containers are honoured
  (:mod:`.comfy_dispatch`); re-asserted at ``ON_PREPARE_STATE`` and on each evaluation's options.
* ComfyUI's own causal Wan (``ar_model.CausalWanModel``): per-evaluation block hooks (:mod:`.comfy_causal`).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import comfy.patcher_extension as patcher_extension
import torch

from ..wan_capture import Grid, Recorder, branch_rows, fingerprint
from ..wan_capture.capture.lse_attention import LseAttention
from ..wan_capture.model_info import ModelInfo, describe_model
from ..wan_capture.capture.time_layout import TimeLayout, vace_reference_frames
from ..wan_capture.capture.tracker import CallTracker, Evaluation
from .comfy_causal import ComfyCausal, check_comfy_causal, is_comfy_causal
from .comfy_dispatch import Dispatch, backend_modules

KEY = "wan_attention_capture"


class _Comfy(CallTracker):
    """The call tracker plus what the ComfyUI patch points need: the sampling's sigmas and an earlier override."""

    def __init__(self, recorder: Recorder, info: ModelInfo, kinds, model_sampling, previous_override, dm=None):
        super().__init__(recorder, info, kinds)
        self.model_sampling = model_sampling
        self.dispatch = Dispatch(previous_override, backend_modules(dm), lambda previous: _make_override(self, previous))
        self.lse_attention = LseAttention()
        self.causal: Optional[ComfyCausal] = None  # ComfyUI's own causal Wan (comfy_causal)
        self.calls_seen = 0  # attention calls that reached the recorder in the evaluation in flight


# Wan models of ComfyUI whose token streams the recorder cannot lay out yet: refused at Attach, saying why
UNSUPPORTED = {
    "WanModel_S2V": "Wan 2.2 S2V calls its blocks without transformer_options (no attention call would reach the "
                    "recorder) and appends reference and motion (FramePack) tokens after the video tokens",
    "AnimateWanModel": "Wan 2.2 Animate samples a latent that carries the reference image's frames in front of the "
                       "video (WanAnimateToVideo's trim_latent), which the recorder cannot tell from video frames",
}


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
    why = UNSUPPORTED.get(type(dm).__name__)
    if why:
        raise TypeError(f"Attach Attention Recorder does not support {type(base).__name__} / {type(dm).__name__} yet: "
                        f"{why}. Sample it without the recorder")
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
        state.dispatch.kernels.clear()
        sampling = {"seed": seed, "cfg": getattr(guider, "cfg", None), "guider": type(guider).__name__}
        take = state.recorder.begin_pass(sigmas.tolist(), state.info, input_fingerprint=fingerprint(latent_image),
                                         sampling=sampling, weights=state.weights)
        try:
            out = executor(*args, **kwargs)
        except BaseException as e:  # interrupted or failed: keep what was recorded, marked partial
            take.log.sampling["attention"] = state.dispatch.describe()
            state.recorder.end_pass(error=e)
            state.end_evaluation()
            raise
        take.log.sampling["attention"] = state.dispatch.describe()
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
        # last word on the hook: this evaluation's options, after every ON_PREPARE_STATE callback has run
        state.dispatch.install(to)
        if to.get("context_window") is not None:
            raise ValueError("Attach Attention Recorder cannot record a sampling with context windows (ComfyUI's "
                             "context windows evaluate the video in windows of frames, each as if it were the whole "
                             "video): remove the context windows node to record, or sample without the recorder")
        t, h, w = x.shape[-3:]
        time_dim_concat = args[4] if len(args) > 4 and hasattr(args[4], "shape") else kwargs.get("time_dim_concat")
        lead = trail = 0
        streams = ["", ""]
        if time_dim_concat is not None:  # Phantom: subject frames appended after the video's
            trail, streams[1] = time_dim_concat.shape[-3], "Phantom subject images"
        reference = kwargs.get("reference_latent")
        if reference is not None and getattr(dm, "ref_conv", None) is not None:
            lead, streams[0] = 1, "Wan 2.2 Fun reference"  # the reference latent goes in front
        elif reference is not None and type(dm).__name__ == "HumoWanModel" and reference.shape[-2:] == x.shape[-2:]:
            trail, streams[1] = trail + reference.shape[-3], "HuMo reference frames"  # after the video, RoPE next
        grid = Grid.from_latent((t + lead + trail, h, w), state.info.patch_size)
        take = state.recorder.active
        if take.grid is None:
            take.time_layout = TimeLayout(vace_reference_frames(kwargs.get("vace_context")), lead, trail, *streams)
        inputs = tuple(n for n in EXTRA_INPUTS if _given(kwargs.get(n)))
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
        state.begin_evaluation(Evaluation(step, exact, sigma, timestep, branches, grid, chunk, inputs))
        state.calls_seen = 0
        try:
            with contextlib.ExitStack() as hooks:
                if causal is not None:
                    hooks.enter_context(causal.hooks(dm, to))
                if state.dispatch.backend_modules:
                    hooks.enter_context(state.dispatch.module_hooks())
                out = executor(*args, **kwargs)
            if state.calls_seen == 0 and step is not None:
                raise TypeError(
                    f"{state.info.model_type} / {type(dm).__name__}: none of its attention calls reached Attach "
                    "Attention Recorder (its blocks get no transformer_options), so nothing of it can be recorded: "
                    "this model is not supported yet. Sample it without the recorder")
            return out
        finally:
            state.end_evaluation()
    return forward


def _given(value) -> bool:
    """A tensor input, or a list of them (Bernini's context_latents)."""
    if isinstance(value, (list, tuple)):
        return any(hasattr(v, "shape") for v in value)
    return hasattr(value, "shape")


# conditioning inputs of ComfyUI's Wan models that may add tokens beside the video's (named in refusals)
EXTRA_INPUTS = ("reference_latent", "reference_motion", "context_latents", "time_dim_concat", "vace_context",
                "pose_latents", "face_pixel_values", "audio_embed", "control_video")


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


def _noop():
    return None


def _make_override(state: _Comfy, previous):
    """The recorder's override over ``previous`` (the one on the hook when it was installed), with a
    ``container_function`` for calls made with tensor containers (see :mod:`.comfy_dispatch`)."""
    d = state.dispatch

    @contextlib.contextmanager
    def entered():
        d.depth += 1
        try:
            yield d.depth == 1
        finally:
            d.depth -= 1

    def override(func, *args, **kwargs):
        with entered() as outer:
            if not outer:  # a node chained onto the recorder called it back: pass through
                return d.attend(previous, func, args, kwargs)
            state.calls_seen += 1
            d.note(previous)
            heads = int(kwargs["heads"] if "heads" in kwargs else args[3])
            attend = lambda: d.attend(previous, func, args, kwargs)  # noqa: E731
            attend_lse = None
            # ComfyUI's plain call (no mask, default reshapes) and nothing else computing it: the log-sum-exp can come
            # from the same attention kernel, verified bit-identical once per shape (wan_capture.capture.lse_attention)
            if (d.plain(previous) and len(args) <= 4 and kwargs.get("mask") is None
                    and not kwargs.get("skip_reshape") and not kwargs.get("skip_output_reshape") and args[0].is_cuda):
                attend_lse = lambda: state.lse_attention(args[0], args[1], args[2], heads, attend)  # noqa: E731
            layout = state.causal.self_layout(args[0], args[1]) if state.causal is not None else None
            if layout is not None:  # a chunk against its KV cache: the statistics kernels compute its log-sum-exp
                attend_lse = None
            return state.tap(args[0], args[1], heads, attend, layout=layout, attend_lse=attend_lse)

    def containers(*args, **kwargs):
        with entered() as outer:
            if outer:  # record from the containers' tensors, let go of them, then the kernel consumes the containers
                state.calls_seen += 1
                d.note(previous)
                heads = int(kwargs["heads"] if "heads" in kwargs else args[3])
                q, k = args[0].peek(), args[1].peek()
                layout = state.causal.self_layout(q, k) if state.causal is not None else None
                state.tap(q, k, heads, _noop, layout=layout)
                del q, k
            return d.attend_containers(previous, args, kwargs)

    override.container_function = containers
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
    dm = getattr(getattr(target, "model", None), "diffusion_model", None) if patcher else None
    state = _Comfy(recorder, info, kinds, model_sampling, to.get("optimized_attention_override"), dm)
    if dm is not None and is_comfy_causal(dm):
        check_comfy_causal(dm)
        state.causal = ComfyCausal(state)
    # which weights: two Attach nodes sharing one recorder over different models are experts (Wan 2.2 A14B)
    state.weights = id(getattr(getattr(target, "model", None), "diffusion_model", None)) if patcher else None
    recorder.attach(state.weights)
    state.dispatch.install(to)
    replace = to.get("patches_replace", {}).get("dit", {})
    patches = {i: _make_block_patch(state, i, replace.get(("double_block", i))) for i in range(info.num_blocks)}
    if patcher:
        target.add_wrapper_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, _make_outer_sample(state))
        # ComfyUI of 2026 passes each evaluation's model_options here (core's convention: re-assert the override)
        target.add_callback_with_key(patcher_extension.CallbacksMP.ON_PREPARE_STATE, KEY,
                                     lambda patcher, timestep, model_options=None: state.dispatch.install(
                                         (model_options or {}).get("transformer_options")))
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
