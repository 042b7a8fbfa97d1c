"""ComfyUI's own causal Wan (2026) on the ComfyUI trees the tests run, which predate it: the real upstream files where
they are found, else a stand-in written from reading them. Test-side only; nothing here is part of the pack.

Upstream ships, around the model, pieces the older trees lack; they are added in the test process (never by editing
a tree):

* ``comfy/ldm/wan/ar_model.py`` (comfyanonymous/ComfyUI at a41ffd2 and at b05044d): ``CausalWanModel``, whose
  ``forward`` takes the autoregressive path (``forward_block``) when ``transformer_options["ar_state"]`` is set. That
  path calls each block *without* ``transformer_options`` and keeps a KV cache per block (``k``, ``v`` and ``end``:
  a LongTensor at a41ffd2, a Python int at b05044d, where the model also became a ``WanModel`` subclass) and a
  cross-attention cache (``is_init``, ``k``, ``v``);
* ``sample_ar_video`` (``comfy/k_diffusion/sampling.py`` at 02159d8): chunk by chunk, each chunk denoised with the
  sigma schedule (re-noised between steps with a seed of its own, the cache's ``end`` moved back over the chunk),
  then one evaluation at sigma 0 that writes the clean chunk into the cache; an ``initial_latent`` (image to video)
  is written first the same way;
* ``comfy_extras/nodes_ar_video.py`` (effa185): ``EmptyARVideoLatent``, ``SamplerARVideo``, ``ARVideoI2V``;
* ``WAN21_CausalAR`` (``comfy/model_base.py``): ``WAN21`` with ``CausalWanModel`` as its diffusion model.

The real files are read from ``COMFY_AR_SOURCES`` (or ``~/comfy-ar-sources``): ``ar_model_a41ffd2.py``,
``ar_model_b05044d.py``, ``nodes_ar_video_effa185.py``, ``sample_ar_video_02159d8.py`` (the function alone).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from typing import Optional

import torch

SOURCE_FILES = {"a41ffd2": "ar_model_a41ffd2.py", "b05044d": "ar_model_b05044d.py",
                "nodes": "nodes_ar_video_effa185.py", "sampler": "sample_ar_video_02159d8.py"}
AR_NOT_FOUND = ("ComfyUI causal Wan sources NOT FOUND: set COMFY_AR_SOURCES=<folder with "
                + ", ".join(SOURCE_FILES.values()) + "> (upstream ComfyUI files, never committed) to test the real "
                "files; the stand-in runs without them")


def ar_sources() -> Optional[str]:
    """The folder holding the four upstream files, or None."""
    for path in (os.environ.get("COMFY_AR_SOURCES"), os.path.expanduser("~/comfy-ar-sources")):
        if path and all(os.path.isfile(os.path.join(path, f)) for f in SOURCE_FILES.values()):
            return os.path.abspath(path)
    return None


# -- the stand-in model ------------------------------------------------------------------------------------------
def _standin_module(int_end: bool, pass_options: bool):
    """A module ``comfy.ldm.wan.ar_model_standin_*`` (the package the pack's Attach node accepts) whose
    ``CausalWanModel`` behaves as upstream's: ``int_end`` keeps the cache's ``end`` as a Python int (b05044d) instead
    of a LongTensor (a41ffd2); ``pass_options`` simulates a later ComfyUI that passes ``transformer_options`` down to
    the blocks on the autoregressive path."""
    import comfy.ldm.common_dit
    import comfy.model_management
    from comfy.ldm.flux.math import apply_rope1
    from comfy.ldm.modules.attention import optimized_attention
    from comfy.ldm.wan.model import WanAttentionBlock, WanModel, WanSelfAttention, repeat_e, sinusoidal_embedding_1d

    name = f"comfy.ldm.wan.ar_model_standin_{'int' if int_end else 'tensor'}{'_options' if pass_options else ''}"
    if name in sys.modules:
        return sys.modules[name]
    mod = types.ModuleType(name)

    class CausalWanSelfAttention(WanSelfAttention):
        """Wan's self-attention weights; roped keys and plain values appended to the block's cache, the chunk's
        queries attending to every key written so far (no mask)."""

        def forward(self, x, freqs, kv_cache=None, transformer_options={}):
            b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
            q = apply_rope1(self.norm_q(self.q(x)).view(b, s, n, d), freqs)
            k = apply_rope1(self.norm_k(self.k(x)).view(b, s, n, d), freqs)
            v = self.v(x).view(b, s, n, d)
            if kv_cache is None:
                keys, values, length = k, v, s
            else:
                end = int(kv_cache["end"]) if int_end else kv_cache["end"].item()
                length = end + s
                kv_cache["k"][:, end:length] = k
                kv_cache["v"][:, end:length] = v
                if int_end:
                    kv_cache["end"] = length
                else:
                    kv_cache["end"].fill_(length)
                keys, values = kv_cache["k"][:, :length], kv_cache["v"][:, :length]
            out = optimized_attention(q.view(b, s, n * d), keys.reshape(b, length, n * d),
                                      values.reshape(b, length, n * d), heads=self.num_heads,
                                      transformer_options=transformer_options)
            return self.o(out)

    class CausalWanAttentionBlock(WanAttentionBlock):
        """Wan's block with the cached self-attention; the text keys and values are computed once per generation
        and read from the cross-attention cache afterwards."""

        def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True,
                     cross_attn_norm=False, eps=1e-6, operation_settings={}):
            super().__init__(cross_attn_type, dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps,
                             operation_settings=operation_settings)
            self.self_attn = CausalWanSelfAttention(dim, num_heads, window_size, qk_norm, eps,
                                                    operation_settings=operation_settings)

        def forward(self, x, e, freqs, context, context_img_len=257, kv_cache=None, crossattn_cache=None,
                    transformer_options={}):
            mod_ = comfy.model_management.cast_to(self.modulation, dtype=x.dtype, device=x.device)
            e = (mod_ + e).chunk(6, dim=1) if e.ndim < 4 else (mod_.unsqueeze(0) + e).unbind(2)
            x = x.contiguous()
            y = self.self_attn(torch.addcmul(repeat_e(e[0], x), self.norm1(x), 1 + repeat_e(e[1], x)), freqs,
                               kv_cache=kv_cache, transformer_options=transformer_options)
            x = torch.addcmul(x, y, repeat_e(e[2], x))
            ca = self.cross_attn
            if crossattn_cache is not None and crossattn_cache.get("is_init"):
                q = ca.norm_q(ca.q(self.norm3(x)))
                x = x + ca.o(optimized_attention(q, crossattn_cache["k"], crossattn_cache["v"], heads=self.num_heads,
                                                 transformer_options=transformer_options))
            else:
                x = x + ca(self.norm3(x), context, context_img_len=context_img_len,
                           transformer_options=transformer_options)
                if crossattn_cache is not None:
                    crossattn_cache.update(k=ca.norm_k(ca.k(context)), v=ca.v(context), is_init=True)
            y = self.ffn(torch.addcmul(repeat_e(e[3], x), self.norm2(x), 1 + repeat_e(e[4], x)))
            return torch.addcmul(x, y, repeat_e(e[5], x))

    class CausalWanModel(WanModel):
        """Wan 2.1's weights; ``forward`` with ``ar_state`` runs one chunk against the caches."""

        def __init__(self, **kwargs):
            super().__init__(wan_attn_block_class=CausalWanAttentionBlock, **kwargs)

        @property
        def head_dim(self):
            return self.dim // self.num_heads

        def init_kv_caches(self, batch_size, max_seq_len, device, dtype):
            shape = (batch_size, max_seq_len, self.num_heads, self.head_dim)
            return [{"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype),
                     "end": 0 if int_end else torch.tensor([0], dtype=torch.long, device=device)}
                    for _ in range(self.num_layers)]

        def init_crossattn_caches(self, batch_size, device, dtype):
            return [{"is_init": False} for _ in range(self.num_layers)]

        def forward_block(self, x, timestep, context, start_frame, kv_caches, crossattn_caches, clip_fea=None,
                          transformer_options=None):
            x = comfy.ldm.common_dit.pad_to_patch_size(x, self.patch_size)
            t, h, w = x.shape[-3:]
            x = self.patch_embedding(x.float()).to(x.dtype)
            grid_sizes = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)
            e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, timestep.flatten()).to(dtype=x.dtype))
            e = e.reshape(timestep.shape[0], -1, e.shape[-1])
            e0 = self.time_projection(e).unflatten(2, (6, self.dim))
            context = self.text_embedding(context)
            context_img_len = None
            if clip_fea is not None and self.img_emb is not None:
                context = torch.concat([self.img_emb(clip_fea), context], dim=1)
                context_img_len = clip_fea.shape[-2]
            freqs = self.rope_encode(t, h, w, t_start=start_frame, device=x.device, dtype=x.dtype)
            extra = {"transformer_options": transformer_options} if pass_options else {}
            for i, block in enumerate(self.blocks):
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len,
                          kv_cache=kv_caches[i], crossattn_cache=crossattn_caches[i], **extra)
            x = self.unpatchify(self.head(x, e), grid_sizes)
            return x[:, :, :t, :h, :w]

        def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
            ar_state = transformer_options.get("ar_state")
            if ar_state is None:
                return super().forward(x, timestep, context, clip_fea=clip_fea, time_dim_concat=time_dim_concat,
                                       transformer_options=transformer_options, **kwargs)
            per_frame = timestep.unsqueeze(1).expand(x.shape[0], x.shape[2])
            return self.forward_block(x, per_frame, context, ar_state["start_frame"], ar_state["kv_caches"],
                                      ar_state["crossattn_caches"], clip_fea=clip_fea,
                                      transformer_options=transformer_options)

    for cls in (CausalWanSelfAttention, CausalWanAttentionBlock, CausalWanModel):
        cls.__module__ = name
    mod.CausalWanSelfAttention, mod.CausalWanAttentionBlock, mod.CausalWanModel = (
        CausalWanSelfAttention, CausalWanAttentionBlock, CausalWanModel)
    sys.modules[name] = mod
    return mod


# -- the stand-in sampler and nodes ------------------------------------------------------------------------------
@torch.no_grad()
def standin_sample_ar_video(model, x, sigmas, extra_args=None, callback=None, disable=None, num_frame_per_block=1):
    """The ``ar_video`` sampler as upstream runs it (see the module docstring)."""
    extra_args = extra_args or {}
    options = extra_args.get("model_options", {}).get("transformer_options", {})
    if x.ndim != 5:
        raise ValueError(f"ar_video needs 5-D video latents, got {tuple(x.shape)}")
    base = model.inner_model.inner_model
    dm = base.diffusion_model
    if not (hasattr(dm, "init_kv_caches") and hasattr(dm, "init_crossattn_caches")):
        raise TypeError("ar_video needs a causal Wan diffusion model (init_kv_caches / init_crossattn_caches)")
    seed = extra_args.get("seed", 0)
    batch, _, frames, height, width = x.shape
    frame_tokens = math.ceil(height / 2) * math.ceil(width / 2)
    dtype = base.get_dtype()
    kv, cross = dm.init_kv_caches(batch, frames * frame_tokens, x.device, dtype), dm.init_crossattn_caches(batch, x.device, dtype)
    out, ones, start = torch.zeros_like(x), x.new_ones([batch]), 0

    def evaluate(latent, sigma, first):
        options["ar_state"] = {"start_frame": first, "kv_caches": kv, "crossattn_caches": cross}
        return model(latent, sigma * ones, **extra_args)

    def rewind(n):
        for cache in kv:
            cache["end"] -= n * frame_tokens

    initial = options.get("ar_config", {}).get("initial_latent")
    if initial is not None:
        initial = base.process_latent_in(initial).to(device=x.device, dtype=dtype)
        out[:, :, :initial.shape[2]] = initial
        evaluate(initial, sigmas.new_zeros([1]), 0)
        start = initial.shape[2]
    chunks = math.ceil((frames - start) / num_frame_per_block)
    steps = len(sigmas) - 1
    done = 0
    try:
        for chunk in range(chunks):
            n = min(num_frame_per_block, frames - start)
            latent = x[:, :, start:start + n]
            for i in range(steps):
                denoised = evaluate(latent, sigmas[i], start)
                if callback is not None:
                    callback({"x": latent, "i": done * steps // (chunks * steps), "sigma": sigmas[i],
                              "sigma_hat": sigmas[i], "denoised": denoised})
                if sigmas[i + 1] == 0:
                    latent = denoised
                else:
                    torch.manual_seed(seed + chunk * 1000 + i)
                    latent = (1.0 - sigmas[i + 1]) * denoised + sigmas[i + 1] * torch.randn_like(denoised)
                    rewind(n)
                done += 1
            out[:, :, start:start + n] = latent
            rewind(n)
            evaluate(latent, sigmas.new_zeros([1]), start)  # the clean chunk into the cache
            start += n
    finally:
        options.pop("ar_state", None)
    return out


def _standin_nodes():
    import comfy.model_management
    import comfy.samplers
    import comfy.utils
    from comfy_api.latest import io

    def zeros(width, height, length, batch_size):
        return torch.zeros([batch_size, 16, (length - 1) // 4 + 1, height // 8, width // 8],
                           device=comfy.model_management.intermediate_device())

    size = [io.Int.Input("width", default=832, min=16, max=8192, step=16),
            io.Int.Input("height", default=480, min=16, max=8192, step=16),
            io.Int.Input("length", default=81, min=1, max=1024, step=4),
            io.Int.Input("batch_size", default=1, min=1, max=64)]

    class EmptyARVideoLatent(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="EmptyARVideoLatent", category="latent/video", inputs=list(size),
                             outputs=[io.Latent.Output()])

        @classmethod
        def execute(cls, width, height, length, batch_size):
            return io.NodeOutput({"samples": zeros(width, height, length, batch_size)})

    class SamplerARVideo(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="SamplerARVideo", category="sampling/custom_sampling/samplers",
                             inputs=[io.Int.Input("num_frame_per_block", default=1, min=1, max=64)],
                             outputs=[io.Sampler.Output()])

        @classmethod
        def execute(cls, num_frame_per_block):
            return io.NodeOutput(comfy.samplers.ksampler("ar_video", {"num_frame_per_block": num_frame_per_block}))

    class ARVideoI2V(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="ARVideoI2V", category="conditioning/video_models",
                             inputs=[io.Model.Input("model"), io.Vae.Input("vae"), io.Image.Input("start_image")] + list(size),
                             outputs=[io.Model.Output(), io.Latent.Output()])

        @classmethod
        def execute(cls, model, vae, start_image, width, height, length, batch_size):
            image = comfy.utils.common_upscale(start_image[:1].movedim(-1, 1), width, height, "bilinear",
                                               "center").movedim(1, -1)
            m = model.clone()
            to = m.model_options.setdefault("transformer_options", {})
            to.setdefault("ar_config", {})["initial_latent"] = vae.encode(image[:, :, :, :3])
            return io.NodeOutput(m, {"samples": zeros(width, height, length, batch_size)})

    return types.SimpleNamespace(EmptyARVideoLatent=EmptyARVideoLatent, SamplerARVideo=SamplerARVideo,
                                 ARVideoI2V=ARVideoI2V)


# -- loading either ---------------------------------------------------------------------------------------------
def _load_file(name: str, path: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def ar_model_module(source: str = "standin-int", pass_options: bool = False):
    """The module of a ``CausalWanModel``: ``"a41ffd2"``/``"b05044d"`` (the real file, loaded as
    ``comfy.ldm.wan.ar_model_<commit>``), or the stand-in ``"standin-tensor"`` (a41ffd2's LongTensor ``end``) /
    ``"standin-int"`` (b05044d's int)."""
    if source.startswith("standin"):
        return _standin_module(int_end=source == "standin-int", pass_options=pass_options)
    folder = ar_sources()
    if folder is None:
        raise RuntimeError(AR_NOT_FOUND)
    return _load_file(f"comfy.ldm.wan.ar_model_{source}", os.path.join(folder, SOURCE_FILES[source]))


def sampler_function(real: bool = False):
    """``sample_ar_video``: upstream's function (``real``) or the stand-in."""
    if not real:
        return standin_sample_ar_video
    folder = ar_sources()
    if folder is None:
        raise RuntimeError(AR_NOT_FOUND)
    from tqdm.auto import trange
    namespace = {"torch": torch, "trange": trange}
    with open(os.path.join(folder, SOURCE_FILES["sampler"])) as f:
        exec(compile(f.read(), "sample_ar_video_02159d8.py", "exec"), namespace)
    return namespace["sample_ar_video"]


def nodes_module(real: bool = False):
    """The AR video nodes: upstream's file (``real``) or the stand-in."""
    if not real:
        return _standin_nodes()
    folder = ar_sources()
    if folder is None:
        raise RuntimeError(AR_NOT_FOUND)
    return _load_file("comfy_extras.nodes_ar_video_effa185", os.path.join(folder, SOURCE_FILES["nodes"]))


def install_sampler(real: bool = False) -> None:
    """Make ``ar_video`` a ComfyUI sampler in this process (``comfy.samplers.ksampler("ar_video")`` finds
    ``k_diffusion.sampling.sample_ar_video``), as upstream ships it."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers
    kds.sample_ar_video = sampler_function(real)
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
        if "ar_video" not in names:
            names.append("ar_video")


def causal_patcher(checkpoint: str, source: str = "standin-int", pass_options: bool = False):
    """A ModelPatcher of ``WAN21_CausalAR`` (upstream's model class: ``WAN21`` with ``CausalWanModel``) holding the
    weights of a Wan checkpoint (the causal model is weight-compatible with Wan 2.1)."""
    import comfy.ldm.wan.model
    import comfy.model_base
    import comfy.model_patcher
    from devtools.tiny_comfy import load_model
    plain = load_model(checkpoint)
    causal = ar_model_module(source, pass_options).CausalWanModel

    class WAN21_CausalAR(comfy.model_base.WAN21):
        def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
            super(comfy.model_base.WAN21, self).__init__(model_config, model_type, device=device, unet_model=causal)
            self.image_to_video = False

    model = WAN21_CausalAR(plain.model.model_config, device=torch.device("cpu"))
    missing, unexpected = model.diffusion_model.load_state_dict(plain.model.diffusion_model.state_dict(), strict=False)
    assert not unexpected and not [m for m in missing if not m.startswith("rope")], (missing, unexpected)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
