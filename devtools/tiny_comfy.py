"""Real ComfyUI, found at COMFYUI_PATH or two folders up, and tiny random Wan checkpoints built on the fly.

Shared by the tests, the demo and the benchmark; nothing here is committed weights.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "wan_attention_capture"


def find_comfyui():
    env = os.environ.get("COMFYUI_PATH")
    candidates = [env] if env else []
    candidates.append(os.path.dirname(os.path.dirname(ROOT)))  # <ComfyUI>/custom_nodes/<pack>
    candidates.append(os.path.expanduser("~/ComfyUI"))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
            return os.path.abspath(path)
    return None


COMFYUI = find_comfyui()
NOT_FOUND = ("ComfyUI NOT FOUND: set COMFYUI_PATH=<ComfyUI checkout> (or install this pack in "
             "<ComfyUI>/custom_nodes/) to run the ComfyUI tests")


def is_hiddenswitch(path: Optional[str] = COMFYUI) -> bool:
    """hiddenswitch's pip-installable ComfyUI (0.12.1): its own layout and entry point (shared/comfyui/README.md)."""
    return bool(path) and os.path.isdir(os.path.join(path, "comfy_compatibility"))


def core_nodes(name: str):
    """A core node module by what exists: ``comfy_extras.nodes_wan`` (upstream) or ``comfy_extras.nodes.nodes_wan``
    (hiddenswitch)."""
    import importlib
    for module in (f"comfy_extras.{name}", f"comfy_extras.nodes.{name}"):
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is not None:
            try:
                return importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
    raise ModuleNotFoundError(f"this ComfyUI has no core node module {name}")


def load_comfy(cpu: bool = True):
    """Import ComfyUI's backend and this pack as ComfyUI loads custom nodes; returns the pack module."""
    if COMFYUI is None:
        raise RuntimeError(NOT_FOUND)
    from devtools.comfy_path import use_comfyui
    use_comfyui(COMFYUI)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    if is_hiddenswitch():  # top-level nodes, folder_paths, server exist only in its vanilla environment
        from comfy_compatibility.vanilla import prepare_vanilla_environment
        prepare_vanilla_environment()
        import folder_paths
        import tempfile
        folder_paths.set_temp_directory(tempfile.mkdtemp(prefix="comfy_temp_"))  # its default is the working folder
    elif importlib.util.find_spec("utils.install_util") is not None:
        import utils.install_util  # noqa: F401  as main.py does: before nodes.py puts comfy/ (its utils.py) on sys.path
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
    "vace": (dict(in_dim=16, out_dim=16, vace_layers=1, vace_in_dim=96), 16),  # VaceWanModel: 1 VACE block
    "i2v22": (dict(model_type="t2v", in_dim=36, out_dim=16), 16),  # Wan 2.2 i2v A14B: image channels, no CLIP vision
    "fun_control": (dict(model_type="i2v", in_dim=48, out_dim=16), 16),  # Wan 2.1 Fun control: control channels too
    # Wan 2.2 Fun control A14B: control + image latents and the mask (16 + 32 + 4), the reference image's own
    # patch embedding (ref_conv: its tokens go in front of the video's)
    "fun22": (dict(model_type="t2v", in_dim=52, out_dim=16, in_dim_ref_conv=16), 16),
    "fun22_5b": (dict(model_type="t2v", in_dim=148, out_dim=48, in_dim_ref_conv=48), 48),  # the same on 2.2's VAE
    "fun_inp_5b": (dict(model_type="t2v", in_dim=100, out_dim=48), 48),  # Wan 2.2 Fun inpaint 5B: image + mask
    "camera": (dict(model_type="camera", in_dim=32, out_dim=16), 16),  # Wan 2.1 Fun camera (CLIP vision)
    "camera22": (dict(model_type="camera_2.2", in_dim=36, out_dim=16), 16),  # Wan 2.2 Fun camera A14B
}


def tiny_wan_checkpoint(path: str, variant: str = "t2v", blocks: int = 2, dim: int = 256, seed: int = 0) -> str:
    """Write a random Wan DiT (head_dim 128, so dim 256 = 2 heads) as safetensors that ComfyUI detects."""
    import comfy.ldm.wan.model as wan
    import comfy.ops
    import safetensors.torch
    kwargs, _ = VARIANTS[variant]
    model_class = {"vace": wan.VaceWanModel, "camera": wan.CameraWanModel, "camera22": wan.CameraWanModel}
    model = model_class.get(variant, wan.WanModel)(dim=dim, ffn_dim=2 * dim, num_heads=dim // 128, num_layers=blocks, text_dim=4096,
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


def capture_override(model):
    """A test-side override installed first: it keeps every attention call's q and k, in call order."""
    calls = []
    clone = model.clone()

    def override(func, *args, **kwargs):
        order = tuple(kwargs["transformer_options"]["cond_or_uncond"])
        calls.append((args[0].detach().clone(), args[1].detach().clone(), kwargs["heads"], order))
        return func(*args, **kwargs)
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return clone, calls


def recording_options(pack, **fields):
    """The Attention Recording Options node's output with ``fields`` set (the rest at their defaults)."""
    import importlib
    node = importlib.import_module(f"{pack.__name__}.nodes.attach_node").AttentionRecordingOptions
    return node.execute(**fields).args[0]


def ksampler(model, positive, negative, latent, seed=1, steps=3, cfg=3.0, sampler="euler", scheduler="simple"):
    import nodes
    return nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]


def ksampler_advanced(model, positive, negative, latent, start, end, steps, leftover, add_noise=True, seed=1):
    import nodes
    return nodes.KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", seed, steps, 3.0, "euler",
                                           "simple", positive, negative, latent, start, end,
                                           "enable" if leftover else "disable")[0]


CORPUS = [
    "a beautiful flower near a tree", "a red flower in a garden next to a tall tree", "the sun over the sea",
    "a cat sleeps on a warm windowsill", "two dogs run across the field", "a beautiful tree next to a flower",
    "a city street at night with neon lights", "a small boat on a calm lake", "snow falls on the mountain",
    "the river flows past an old mill", "a girl holds a red umbrella in the rain", "a bird sings on a branch",
    "A Flowerpot, a Teapot and a Sunflower!", "Wow. (Really) [maybe] {odd} 'quotes' \"double\" x:y - 1.5 2 3",
    "QUIET VILLAGE; JUMPING ZEBRA? KITE", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "flowerpots, sunflowers and teapots in the old village",
]


def tiny_spiece_model(vocab_size: int = 150) -> bytes:
    """A sentencepiece model trained in milliseconds, with umt5's special ids (pad 0, eos 1, unk 2)."""
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def tiny_clip(spiece: bytes, workdir: str, seed: int = 0):
    """A real ComfyUI CLIP: WanT5Tokenizer over ``spiece`` and a one-layer umt5 with Wan's 4096-wide output."""
    import json
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.t5
    import comfy.text_encoders.wan as wan
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    config = {"d_ff": 64, "d_kv": 32, "d_model": 4096, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
              "layer_norm_epsilon": 1e-6, "model_type": "umt5", "num_heads": 2, "num_layers": 1,
              "relative_attention_num_buckets": 32, "vocab_size": vocab, "pad_token_id": 0, "eos_token_id": 1}
    path = os.path.join(workdir, "tiny_umt5.json")
    with open(path, "w") as f:
        json.dump(config, f)

    class TinyUMT5(comfy.sd1_clip.SDClipModel):
        # hiddenswitch's SD1ClipModel passes its own textmodel_json_config: this model keeps its tiny one
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={},
                     textmodel_json_config=None, **kwargs):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=path, dtype=dtype,
                             special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyWanTE(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="umt5xxl",
                             clip_model=TinyUMT5, **kwargs)

    target = comfy.supported_models_base.ClipTarget(wan.WanT5Tokenizer, TinyWanTE)
    clip = comfy.sd.CLIP(target, tokenizer_data={"spiece_model": spiece}, model_options={"dtype": torch.float32})
    g = torch.Generator().manual_seed(seed)
    prefix = "umt5xxl.transformer."
    sd = {k[len(prefix):]: (torch.ones_like(v) if "layer_norm" in k else torch.randn(v.shape, generator=g) * 0.5)
          for k, v in clip.get_sd().items() if k.startswith(prefix)}
    missing, unexpected = clip.cond_stage_model.umt5xxl.transformer.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "weight" in m], (missing, unexpected)
    return clip


def tiny_vae(variant: str = "t2v", seed: int = 0):
    """ComfyUI's real Wan VAE (2.1, or 2.2 for ti2v) with random weights: decodes to the right shape, not a picture."""
    import comfy.sd
    if VARIANTS[variant][1] == 48:
        import comfy.ldm.wan.vae2_2 as wv
        model = wv.WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                          temperal_downsample=[False, True, True], dropout=0.0)
    else:
        import comfy.ldm.wan.vae as wv
        model = wv.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                          temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    return comfy.sd.VAE(sd=sd)
