"""What the recording needs to know about a Wan model, described in one place for every host.

ComfyUI's ``comfy.ldm.wan.model.WanModel`` (and its VACE/camera subclasses), the official code's
``wan.modules.model.WanModel``, diffusers' ``WanTransformer3DModel`` and causal Wan (Self-Forcing / CausVid
``CausalWanModel``) name the same facts differently; :func:`describe_model` reads each of them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

BIDIRECTIONAL, CAUSAL = "bidirectional", "causal"


@dataclass(frozen=True)
class ModelInfo:
    """Geometry and kind of a Wan DiT. ``as_dict()`` is what metadata files carry under ``model``."""

    model_type: str  # host's name for the model family: "WAN21", "WAN22", "wan-official", "diffusers-...", ...
    diffusion_model: str  # class name of the DiT
    num_blocks: int
    num_heads: int
    head_dim: int
    dim: int
    patch_size: Tuple[int, int, int]
    vae_stride: Tuple[int, int, int]
    cross_attention: str = "t2v"  # "t2v": text only; "i2v": CLIP-vision image tokens before the text
    latent_channels: int = 16
    in_channels: int = 16
    variant: str = BIDIRECTIONAL  # or "causal": chunks of frames against a KV cache
    extra_calls: Tuple[str, ...] = ()  # a block's calls after its cross-attention (HuMo: audio), not recorded

    @property
    def causal(self) -> bool:
        return self.variant == CAUSAL

    @property
    def cross_kinds(self) -> Tuple[str, ...]:
        """The kinds of a block's cross-attention calls, in Wan's order: the image context (i2v), then the text."""
        from .capture.call import CROSS_IMAGE, CROSS_TEXT
        return (CROSS_IMAGE, CROSS_TEXT) if self.cross_attention == "i2v" else (CROSS_TEXT,)

    @property
    def call_kinds(self) -> Tuple[str, ...]:
        """The kinds of a block's attention calls, in Wan's order: self-attention, then the cross-attention."""
        from .capture.call import SELF
        return (SELF,) + self.cross_kinds + tuple(self.extra_calls)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"], d["vae_stride"] = list(self.patch_size), list(self.vae_stride)
        extra = d.pop("extra_calls")
        if extra:  # only models that have them (HuMo): every other model's metadata is as before
            d["extra_calls"] = list(extra)
        return d


def _first(*values):
    """The first value that is not None; callables are called only when reached (attribute reads can warn)."""
    for v in values:
        v = v() if callable(v) else v
        if v is not None:
            return v
    return None


def describe_model(dm, model_type: Optional[str] = None) -> ModelInfo:
    """The :class:`ModelInfo` of a Wan DiT from any supported host (see the module docstring)."""
    cfg = getattr(dm, "config", None)
    cfg_get = (lambda name: getattr(cfg, name, None)) if cfg is not None and not isinstance(cfg, dict) else (
        lambda name: cfg.get(name) if isinstance(cfg, dict) else None)
    blocks = getattr(dm, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"{type(dm).__name__} has no transformer blocks: not a Wan DiT")
    # config first: diffusers' ModelMixin answers config names as attributes with a deprecation warning
    heads = int(_first(cfg_get("num_attention_heads"), cfg_get("num_heads"), lambda: getattr(dm, "num_heads", None)))
    dim = _first(cfg_get("dim"), lambda: getattr(dm, "dim", None) if cfg is None else None)
    if dim is None:
        dim = heads * int(cfg_get("attention_head_dim"))
    dim = int(dim)
    patch = tuple(int(p) for p in _first(cfg_get("patch_size"), lambda: getattr(dm, "patch_size", None), (1, 2, 2)))
    out_dim = int(_first(cfg_get("out_channels"), cfg_get("out_dim"), lambda: getattr(dm, "out_dim", None), 16))
    embed = getattr(dm, "patch_embedding", None)
    in_channels = int(embed.weight.shape[1]) if embed is not None and hasattr(embed, "weight") else out_dim
    block0 = blocks[0]
    cross = getattr(block0, "cross_attn", None) or getattr(block0, "attn2", None)
    i2v = cross is not None and ("I2V" in type(cross).__name__ or getattr(cross, "add_k_proj", None) is not None
                                 or getattr(cross, "k_img", None) is not None)
    name = type(dm).__name__
    vae_spatial = 16 if out_dim == 48 else 8  # the Wan 2.2 TI2V VAE compresses 16x, Wan 2.1's 8x
    from .capture.call import CROSS_AUDIO
    extra = (CROSS_AUDIO,) if hasattr(block0, "audio_cross_attn_wrapper") else ()  # HuMo's audio attention
    return ModelInfo(
        model_type=model_type or name, diffusion_model=name, num_blocks=len(blocks), num_heads=heads,
        head_dim=dim // heads, dim=dim, patch_size=patch, vae_stride=(4, vae_spatial, vae_spatial),
        cross_attention="i2v" if i2v else "t2v", latent_channels=out_dim, in_channels=in_channels,
        variant=CAUSAL if name.startswith("Causal") else BIDIRECTIONAL, extra_calls=extra)
