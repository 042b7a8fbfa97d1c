"""Real ComfyUI, found at COMFYUI_PATH or two folders up, and tiny random Wan checkpoints built on the fly.

Shared by the tests, the demo and the benchmark; nothing here is committed weights.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "wan_attention_capture"


def find_comfyui():
    env = os.environ.get("COMFYUI_PATH")
    candidates = [env] if env else []
    candidates.append(os.path.dirname(os.path.dirname(ROOT)))  # <ComfyUI>/custom_nodes/<pack>
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
            return os.path.abspath(path)
    return None


COMFYUI = find_comfyui()
NOT_FOUND = ("ComfyUI NOT FOUND: set COMFYUI_PATH=<ComfyUI checkout> (or install this pack in "
             "<ComfyUI>/custom_nodes/) to run the ComfyUI tests")


def load_comfy(cpu: bool = True):
    """Import ComfyUI's backend and this pack as ComfyUI loads custom nodes; returns the pack module."""
    if COMFYUI is None:
        raise RuntimeError(NOT_FOUND)
    if COMFYUI not in sys.path:
        sys.path.insert(0, COMFYUI)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


VARIANTS = {
    # name: (WanModel kwargs, latent channels)
    "t2v": (dict(model_type="t2v", in_dim=16, out_dim=16), 16),
    "i2v": (dict(model_type="i2v", in_dim=36, out_dim=16), 16),
    "ti2v": (dict(model_type="t2v", in_dim=48, out_dim=48), 48),
}


def tiny_wan_checkpoint(path: str, variant: str = "t2v", blocks: int = 2, dim: int = 256, seed: int = 0) -> str:
    """Write a random Wan DiT (head_dim 128, so dim 256 = 2 heads) as safetensors that ComfyUI detects."""
    import comfy.ldm.wan.model as wan
    import comfy.ops
    import safetensors.torch
    kwargs, _ = VARIANTS[variant]
    model = wan.WanModel(dim=dim, ffn_dim=2 * dim, num_heads=dim // 128, num_layers=blocks, text_dim=4096,
                         operations=comfy.ops.disable_weight_init, **kwargs)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        std = 1.0 if ("norm" in name and name.endswith("weight")) else 0.05
        base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
        sd[name] = (base + torch.randn(p.shape, generator=g) * (0.02 if base else std)).to(torch.float32)
    safetensors.torch.save_file(sd, path)
    return path


def load_model(path: str):
    import comfy.sd
    return comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32})


def conditioning(variant: str, seed: int, text_len: int = 512):
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if variant == "i2v":
        extra["clip_vision_output"] = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g))
    return [[torch.randn(1, text_len, 4096, generator=g), extra]]


def empty_latent(variant: str, frames: int = 9, height: int = 64, width: int = 64, batch: int = 1,
                 spatial: int = 8) -> dict:
    channels = VARIANTS[variant][1]
    return {"samples": torch.zeros(batch, channels, (frames - 1) // 4 + 1, height // spatial, width // spatial)}


def ksampler(model, positive, negative, latent, seed=1, steps=3, cfg=3.0, sampler="euler", scheduler="simple"):
    import nodes
    return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]


def ksampler_advanced(model, positive, negative, latent, start, end, steps, leftover, add_noise=True, seed=1):
    import nodes
    return nodes.KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", seed, steps, 3.0, "euler",
                                           "simple", positive, negative, latent, start, end,
                                           "enable" if leftover else "disable")[0]
