"""Stand-ins of what ComfyUI 0.38.1 (2026-11) changed around attention, for tests on the older trees (0.3.64,
hiddenswitch 0.12.1) that lack it. Test-side only, never part of the pack; written from reading upstream's files
(not copied), each piece naming the file and commit it follows:

* ``comfy/ldm/modules/attention.py`` (Comfy-Org/ComfyUI 05080f6): ``AttentionTensorContainer`` (q/k/v handed to a
  kernel that takes them, so they can be freed while it runs), ``ComfyAttention`` (an attention module's own
  function, set from a ``comfy_attention.config`` entry of the checkpoint: ``{"attention": "comfy_kitchen_int8"}``),
  ``wrap_attn`` (the hook's override first, handed the containers when it has a ``container_function`` and their
  tensors otherwise, with ``preferred_attention`` dropped; else the module's function; else the global kernel or
  its container path) and ``get_attention_function``;
* ``comfy/model_patcher.py``: ``set_model_optimized_attention`` (an override that calls its function and ignores
  ``func`` and whatever was on the hook, carrying the function's ``container_function``);
* ``comfy_extras/nodes_model_advanced.py`` (691e827): ``ModelAttentionBackend`` (a clone with that override);
* ``comfy_extras/nodes_sparse_attention.py`` (01dafad): core's convention for writing the hook: a new override over
  the one on the hook, installed at patch time and again at every ``ON_PREPARE_STATE``;
* ``comfy/samplers.py``: ``prepare_state(timestep, model_options)`` before each batch of evaluations;
* ``comfy/ldm/wan/model.py`` (0c9a69a): Wan's attention modules each with a ``comfy_attention``, calling the
  dispatch with q/k/v in containers and ``preferred_attention=self.comfy_attention``; ``context_latents`` (Bernini's
  in-context references) appended after the video tokens. Their RoPE source rotation is left out here: where their
  tokens go is what the recorder meets.

The comfy-kitchen int8 kernel needs a GPU; its stand-in quantizes q and k to int8 (one scale per tensor) and
computes softmax attention in float32, so its output differs from the global kernel's, as the real one's does.
Every kernel here can note the q/k it received and whether the tensors it took were still held elsewhere.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import types
import weakref
from typing import Callable, List, Optional

import torch

INT8 = "comfy_kitchen_int8"
SEEN: Optional[List[dict]] = None  # set to a list to note each kernel call: q, k and what it took still alive


def _note(kernel: str, q, k, alive=None) -> None:
    if SEEN is not None:
        SEEN.append({"kernel": kernel, "q": q.detach().clone(), "k": k.detach().clone(), "held": alive})


class AttentionTensorContainer:
    """A tensor handed to the kernel that takes it (``peek`` reads it, ``take`` hands it over)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def peek(self) -> torch.Tensor:
        if self.tensor is None:
            raise RuntimeError("attention tensor container has already been consumed")
        return self.tensor

    def take(self) -> torch.Tensor:
        tensor, self.tensor = self.peek(), None
        return tensor


def wrap_attn(func):
    """0.38.1's dispatch around an attention function (see the module docstring)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        preferred = kwargs.pop("preferred_attention", None)
        containers = args[:3] if len(args) >= 3 and isinstance(args[0], AttentionTensorContainer) else None
        fresh = "_inside_attn_wrapper" not in kwargs
        try:
            if fresh:
                kwargs["_inside_attn_wrapper"] = True
                override = (kwargs.get("transformer_options") or {}).get("optimized_attention_override")
                if override is not None:
                    if containers is not None:
                        handed = getattr(override, "container_function", None)
                        if handed is not None:
                            return handed(*args, **kwargs)
                        args = tuple(c.take() for c in containers) + args[3:]
                    return override(func, *args, **kwargs)
                if preferred is not None and preferred.function is not None:
                    return preferred.function(*args, **kwargs)
            if containers is not None:
                if wrapper.container_function is not None:
                    return wrapper.container_function(*args, **kwargs)
                args = tuple(c.take() for c in containers) + args[3:]
            return func(*args, **kwargs)
        finally:
            if fresh:
                del kwargs["_inside_attn_wrapper"]
    wrapper.container_function = None
    return wrapper


def _softmax_attention(q, k, v, heads, kernel: str, quantize: bool, mask=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):
    """Attention of ``[B, L, heads*d]`` (or ``[B, heads, L, d]`` with ``skip_reshape``) in float32."""
    _note(kernel, q, k)
    if not skip_reshape:
        b, _, hd = q.shape
        q, k, v = (t.reshape(b, -1, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    if quantize:  # int8, one symmetric scale per tensor
        q, k = ((t / (t.abs().amax() / 127).clamp_min(1e-12)).round().clamp(-127, 127) * (t.abs().amax() / 127)
                for t in (q, k))
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = (p @ v).to(dtype)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])


def _takes_containers(kernel: str, quantize: bool):
    """A kernel's container path: it takes q/k/v and notes whether anything else still held them."""
    def run(*args, **kwargs):
        kwargs.pop("_inside_attn_wrapper", None)
        kwargs.pop("transformer_options", None)
        q, k, v = (c.take() for c in args[:3])
        refs = [weakref.ref(q), weakref.ref(k)]
        heads = kwargs.pop("heads", args[3] if len(args) > 3 else None)
        out = _softmax_attention(q, k, v, heads, kernel, quantize, **kwargs)
        del q, k, v
        if SEEN is not None:  # _softmax_attention noted q and k; what is left is whether anything still holds them
            SEEN[-1]["held"] = any(r() is not None for r in refs)
        return out
    return run


def _global(q, k, v, heads, **kwargs):
    kwargs.pop("transformer_options", None)
    return _softmax_attention(q, k, v, heads, "global", False, **kwargs)


def _int8(q, k, v, heads, **kwargs):
    kwargs.pop("transformer_options", None)
    return _softmax_attention(q, k, v, heads, INT8, True, **kwargs)


optimized_attention = wrap_attn(_global)
attention_comfy_kitchen_int8 = wrap_attn(_int8)
attention_comfy_kitchen_int8.container_function = _takes_containers(INT8, True)
REGISTERED_ATTENTION_FUNCTIONS = {"pytorch": optimized_attention, INT8: attention_comfy_kitchen_int8}


def get_attention_function(name: str, default=...):
    if name == "optimized":
        return optimized_attention
    if name not in REGISTERED_ATTENTION_FUNCTIONS:
        if default is ...:
            raise KeyError(f"Attention function {name} not found.")
        return default
    return REGISTERED_ATTENTION_FUNCTIONS[name]


class ComfyAttention(torch.nn.Module):
    """An attention module's own function, from its ``config`` entry in the state dict."""

    def __init__(self):
        super().__init__()
        self.config, self.function = None, None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.config, self.function = None, None
        metadata = state_dict.pop(prefix + "config", None)
        if metadata is not None:
            config = json.loads(metadata.numpy().tobytes())
            if config.get("attention") == INT8:
                self.config, self.function = config, attention_comfy_kitchen_int8
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def config_entry(method: str = INT8) -> torch.Tensor:
    """The checkpoint entry that gives an attention module its own function."""
    return torch.tensor(list(json.dumps({"attention": method}).encode()), dtype=torch.uint8)


# -- the hook's writers -------------------------------------------------------------------------------------------
def set_model_optimized_attention(patcher, function: Callable) -> None:
    """ModelPatcher.set_model_optimized_attention: replaces whatever is on the hook."""
    def optimized_attention_override(_, *args, **kwargs):
        return function(*args, **kwargs)
    container = getattr(function, "container_function", None)
    if container is not None:
        optimized_attention_override.container_function = container
    patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = optimized_attention_override


def model_attention_backend(model, name: str = INT8):
    """The Model Attention Backend node: a clone whose every attention call runs ``name``."""
    m = model.clone()
    set_model_optimized_attention(m, get_attention_function(name, None) or get_attention_function("pytorch"))
    return m


def sparse_attention(model, tokens_at_least: int = 1):
    """A node written as core's block-sparse attention node is: calls of at least ``tokens_at_least`` square tokens
    (self-attention) go to its own kernel (here the int8 stand-in), the others on to the override under it (or
    ``func``); installed over the hook at patch time and at every ON_PREPARE_STATE."""
    import comfy.patcher_extension
    installed = set()

    def make(previous):
        def override(func, q, k, v, heads, mask=None, **kwargs):
            if q.shape == k.shape and q.shape[1] >= tokens_at_least and mask is None:
                return _int8(q, k, v, heads, **kwargs)
            return func(q, k, v, heads, mask=mask, **kwargs) if previous is None else previous(func, q, k, v, heads,
                                                                                                mask=mask, **kwargs)
        return override

    def install(transformer_options):
        current = transformer_options.get("optimized_attention_override")
        if current in installed:
            return
        override = make(current)
        installed.add(override)
        transformer_options["optimized_attention_override"] = override

    m = model.clone()
    install(m.model_options.setdefault("transformer_options", {}))
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE, "block_sparse_attention",
                            lambda patcher, timestep, model_options=None: install(model_options["transformer_options"])
                            if model_options is not None else None)
    return m


# -- 0.38.1 in this process ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def emulate():
    """Within the block: ``comfy.ldm.modules.attention`` dispatches as 0.38.1's does (the names above), and the
    sampler calls ``prepare_state(timestep, model_options)`` before each batch of evaluations."""
    import comfy.ldm.modules.attention as attention
    import comfy.patcher_extension
    import comfy.samplers
    names = {"AttentionTensorContainer": AttentionTensorContainer, "ComfyAttention": ComfyAttention,
             "wrap_attn": wrap_attn, "optimized_attention": optimized_attention,
             "REGISTERED_ATTENTION_FUNCTIONS": REGISTERED_ATTENTION_FUNCTIONS,
             "get_attention_function": get_attention_function,
             "attention_comfy_kitchen_int8": attention_comfy_kitchen_int8}
    saved = {n: getattr(attention, n, None) for n in names}
    calc = comfy.samplers._calc_cond_batch

    def calc_cond_batch(model, conds, x_in, timestep, model_options):
        patcher = model.current_patcher
        for callback in patcher.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE):
            try:
                callback(patcher, timestep, model_options)
            except TypeError:  # a callback of the older signature (patcher, timestep): the tree's own call has it
                pass
        return calc(model, conds, x_in, timestep, model_options)
    try:
        for n, v in names.items():
            setattr(attention, n, v)
        comfy.samplers._calc_cond_batch = calc_cond_batch
        yield
    finally:
        comfy.samplers._calc_cond_batch = calc
        for n, v in saved.items():
            if v is None:
                delattr(attention, n)
            else:
                setattr(attention, n, v)


# -- Wan's attention with containers and module backends ----------------------------------------------------------
def wan_module():
    """``comfy.ldm.wan.model_0381``: Wan classes of the tree whose attention is 0.38.1's (see the module docstring)."""
    name = "comfy.ldm.wan.model_0381"
    if name in sys.modules:
        return sys.modules[name]
    import comfy.ldm.wan.model as wan
    from comfy.ldm.flux.math import apply_rope1

    def dispatch(*args, **kwargs):
        return sys.modules["comfy.ldm.modules.attention"].optimized_attention(*args, **kwargs)

    class WanSelfAttention(wan.WanSelfAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.comfy_attention = ComfyAttention()

        def forward(self, x, freqs, transformer_options={}):
            b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
            q = AttentionTensorContainer(apply_rope1(self.norm_q(self.q(x)).view(b, s, n, d), freqs).view(b, s, n * d))
            k = AttentionTensorContainer(apply_rope1(self.norm_k(self.k(x)).view(b, s, n, d), freqs).view(b, s, n * d))
            v = AttentionTensorContainer(self.v(x).view(b, s, n * d))
            return self.o(dispatch(q, k, v, heads=self.num_heads, preferred_attention=self.comfy_attention,
                                   transformer_options=transformer_options))

    class WanT2VCrossAttention(WanSelfAttention):
        def forward(self, x, context, transformer_options={}, **kwargs):
            q = AttentionTensorContainer(self.norm_q(self.q(x)))
            k = AttentionTensorContainer(self.norm_k(self.k(context)))
            v = AttentionTensorContainer(self.v(context))
            return self.o(dispatch(q, k, v, heads=self.num_heads, preferred_attention=self.comfy_attention,
                                   transformer_options=transformer_options))

    class WanAttentionBlock(wan.WanAttentionBlock):
        def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True,
                     cross_attn_norm=False, eps=1e-6, operation_settings={}):
            super().__init__(cross_attn_type, dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps,
                             operation_settings=operation_settings)
            self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps,
                                              operation_settings=operation_settings)
            self.cross_attn = WanT2VCrossAttention(dim, num_heads, (-1, -1), qk_norm, eps,
                                                   operation_settings=operation_settings)

    class WanModel(wan.WanModel):
        def __init__(self, **kwargs):
            super().__init__(wan_attn_block_class=WanAttentionBlock, **kwargs)

        def forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):
            context_latents = kwargs.pop("context_latents", None)
            if not context_latents:
                return super().forward_orig(x, t, context, clip_fea=clip_fea, freqs=freqs,
                                            transformer_options=transformer_options, **kwargs)
            # Bernini: each in-context latent's tokens after the video's, cut off again before the head
            grid = x.shape[2:]
            main = (grid[0] // self.patch_size[0]) * (grid[1] // self.patch_size[1]) * (grid[2] // self.patch_size[2])
            extra = [self.patch_embedding(lat.float()).to(x.dtype).flatten(2).transpose(1, 2) for lat in context_latents]
            extra_freqs = [self.rope_encode(lat.shape[-3], lat.shape[-2], lat.shape[-1], device=x.device, dtype=x.dtype)
                           for lat in context_latents]
            e = self.time_embedding(wan.sinusoidal_embedding_1d(self.freq_dim, t.flatten()).to(dtype=x.dtype))
            e = e.reshape(t.shape[0], -1, e.shape[-1])
            e0 = self.time_projection(e).unflatten(2, (6, self.dim))
            h = self.patch_embedding(x.float()).to(x.dtype)
            grid_sizes = h.shape[2:]
            h = torch.cat([h.flatten(2).transpose(1, 2)] + extra, dim=1)
            freqs = torch.cat([freqs] + extra_freqs, dim=1)
            context = self.text_embedding(context)
            replace = transformer_options.get("patches_replace", {}).get("dit", {})
            for i, block in enumerate(self.blocks):
                if ("double_block", i) in replace:
                    def block_wrap(args, block=block):
                        return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                             transformer_options=args["transformer_options"])}
                    h = replace[("double_block", i)]({"img": h, "txt": context, "vec": e0, "pe": freqs,
                                                      "transformer_options": transformer_options},
                                                     {"original_block": block_wrap})["img"]
                else:
                    h = block(h, e=e0, freqs=freqs, context=context, transformer_options=transformer_options)
            h = self.head(h, e)[:, :main]
            return self.unpatchify(h, grid_sizes)

    mod = types.ModuleType(name)
    for cls in (WanSelfAttention, WanT2VCrossAttention, WanAttentionBlock, WanModel):
        cls.__module__ = name
        setattr(mod, cls.__name__, cls)
    sys.modules[name] = mod
    return mod


def wan_patcher(checkpoint: str, backends: Optional[dict] = None, device: str = "cpu"):
    """A ModelPatcher of ``WAN21`` whose DiT is the 0.38.1 Wan above, with a tiny checkpoint's weights;
    ``backends``: state-dict prefixes of attention modules (``"blocks.0.self_attn"``) given their own function;
    ``device``: where it samples."""
    import comfy.model_base
    import comfy.model_patcher
    from devtools.tiny_comfy import load_model
    plain = load_model(checkpoint)
    dm_class = wan_module().WanModel

    class WAN21(comfy.model_base.WAN21):
        def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
            super(comfy.model_base.WAN21, self).__init__(model_config, model_type, device=device, unet_model=dm_class)
            self.image_to_video = False

    model = WAN21(plain.model.model_config, device=torch.device("cpu"))
    sd = dict(plain.model.diffusion_model.state_dict())
    for prefix in backends or ():
        sd[f"{prefix}.comfy_attention.config"] = config_entry()
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if not m.startswith("rope")], (missing, unexpected)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))
