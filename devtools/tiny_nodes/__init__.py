"""Test and demo helper nodes (never part of the shipped pack): tiny random Wan models inside a running ComfyUI.

`TinyWanModels` gives MODEL, CLIP and VAE built on the fly (a 2-block Wan DiT, a one-layer umt5 over a
sentencepiece model trained in milliseconds, a random Wan VAE); `TinyClipVisionOutput` stands in for CLIP vision and
`TinyVideo` for a loaded video;
`TinyCausalWanModel` is ComfyUI's own causal Wan (2026) with the same tiny weights. On trees older than that model
the `ar_video` sampler and the AR video nodes are added here too (`devtools.comfy_ar`: upstream's files where
COMFY_AR_SOURCES has them, else the stand-in).
"""
import functools
import importlib.util
import os
import sys
import tempfile
import types

import torch
from comfy_api.latest import ComfyExtension, io



def _devtools() -> None:
    """ComfyUI loads this folder as a custom node of its own (a symlink in custom_nodes/), from where the repository
    is not importable: the ``devtools`` package beside this folder's real location is loaded by its file."""
    if "devtools" in sys.modules:
        return
    folder = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    spec = importlib.util.spec_from_file_location("devtools", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["devtools"] = module
    spec.loader.exec_module(module)


_devtools()
import devtools.comfy_ar as car  # noqa: E402
import devtools.tiny_comfy as tc  # noqa: E402


ENCODER_CALLS = [0]  # text-encoder passes of the tiny CLIP since the server started (TinyEncoderCalls reports it)


@functools.lru_cache(maxsize=None)
def _clip():
    clip = tc.tiny_clip(tc.tiny_spiece_model(), tempfile.mkdtemp(prefix="tiny_te_"))
    encode = clip.cond_stage_model.encode_token_weights

    def counted(*args, **kwargs):
        ENCODER_CALLS[0] += 1
        return encode(*args, **kwargs)
    clip.cond_stage_model.encode_token_weights = counted
    return clip


class TinyEncoderCalls(io.ComfyNode):
    """How many text-encoder passes the tiny CLIP has made (``nonce``: a new value runs it again, uncached)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="TinyEncoderCalls", display_name="Tiny Encoder Calls (tests)", category="testing",
                         inputs=[io.Int.Input("nonce", default=0, min=0)], outputs=[], is_output_node=True)

    @classmethod
    def execute(cls, nonce):
        return io.NodeOutput(ui={"text": [str(ENCODER_CALLS[0])]})


@functools.lru_cache(maxsize=None)
def _vae(variant):
    return tc.tiny_vae(variant)


@functools.lru_cache(maxsize=None)
def _model(variant, blocks, seed):
    folder = tempfile.mkdtemp(prefix="tiny_wan_")
    return tc.load_model(tc.tiny_wan_checkpoint(os.path.join(folder, f"{variant}.safetensors"), variant, blocks, seed=seed))


class TinyWanModels(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TinyWanModels", display_name="Tiny Wan Models (tests)", category="testing",
            inputs=[io.Combo.Input("variant", options=list(tc.VARIANTS), default="t2v"),
                    io.Int.Input("blocks", default=2, min=1, max=8), io.Int.Input("seed", default=0, min=0)],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

    @classmethod
    def execute(cls, variant, blocks, seed):
        return io.NodeOutput(_model(variant, blocks, seed), _clip(), _vae(variant))


class TinyClipVisionOutput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="TinyClipVisionOutput", display_name="Tiny CLIP Vision Output (tests)",
                         category="testing", inputs=[io.Int.Input("seed", default=0, min=0)],
                         outputs=[io.ClipVisionOutput.Output()])

    @classmethod
    def execute(cls, seed):
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput(types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g),
                                                   image_embeds=torch.randn(1, 1024, generator=g)))


@functools.lru_cache(maxsize=None)
def _causal(source, blocks, seed):
    folder = tempfile.mkdtemp(prefix="tiny_causal_wan_")
    return car.causal_patcher(tc.tiny_wan_checkpoint(os.path.join(folder, "t2v.safetensors"), "t2v", blocks, seed=seed),
                              source)


class TinyVideo(io.ComfyNode):
    """Stands in for LoadVideo (a user's file): a seeded random clip as a VIDEO, 16 fps, no audio."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="TinyVideo", display_name="Tiny Video (tests)", category="testing",
                         inputs=[io.Int.Input("frames", default=9, min=1), io.Int.Input("width", default=64, min=8),
                                 io.Int.Input("height", default=64, min=8), io.Int.Input("seed", default=0, min=0)],
                         outputs=[io.Video.Output()])

    @classmethod
    def execute(cls, frames, width, height, seed):
        from fractions import Fraction
        from comfy_api.latest import InputImpl, Types
        images = torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(seed))
        return io.NodeOutput(InputImpl.VideoFromComponents(Types.VideoComponents(images=images,
                                                                                 frame_rate=Fraction(16))))


class TinyCausalWanModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TinyCausalWanModel", display_name="Tiny Causal Wan Model (tests)", category="testing",
            inputs=[io.Combo.Input("source", options=["standin-int", "standin-tensor", "a41ffd2", "b05044d"],
                                   default="standin-int"),
                    io.Int.Input("blocks", default=2, min=1, max=8), io.Int.Input("seed", default=0, min=0)],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, source, blocks, seed):
        return io.NodeOutput(_causal(source, blocks, seed))


class TinyAttentionSpy(io.ComfyNode):
    """Keeps the q and k of every attention call of the MODEL (and its rows' cond/uncond order), one file per call
    in output/<folder>/: what the tests recompute in float64."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="TinyAttentionSpy", display_name="Tiny Attention Spy (tests)", category="testing",
                         inputs=[io.Model.Input("model"), io.String.Input("folder", default="attention_spy")],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, folder):
        import folder_paths
        out = os.path.join(folder_paths.get_output_directory(), folder)
        os.makedirs(out, exist_ok=True)
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        previous = to.get("optimized_attention_override")
        def spy(func, *args, **kwargs):  # numbered at the call: spies of several models write one sequence
            order = list((kwargs.get("transformer_options") or {}).get("cond_or_uncond") or [0])
            torch.save({"q": args[0].detach().cpu(), "k": args[1].detach().cpu(),
                        "heads": int(kwargs["heads"] if "heads" in kwargs else args[3]), "order": order},
                       os.path.join(out, f"call_{len(os.listdir(out)):05d}.pt"))
            return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        to["optimized_attention_override"] = spy
        return io.NodeOutput(m)


def _ar_video_nodes():
    """The AR video nodes and sampler where this ComfyUI lacks them (upstream's files if found, else the stand-in)."""
    import nodes
    if "SamplerARVideo" in nodes.NODE_CLASS_MAPPINGS:
        return []
    real = car.ar_sources() is not None
    car.install_sampler(real)
    mod = car.nodes_module(real)
    return [mod.EmptyARVideoLatent, mod.SamplerARVideo, mod.ARVideoI2V]


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [TinyWanModels, TinyClipVisionOutput, TinyVideo, TinyEncoderCalls, TinyCausalWanModel, TinyAttentionSpy] + _ar_video_nodes()


async def comfy_entrypoint():
    return _Extension()


# hiddenswitch's ComfyUI logs an ERROR for a package without NODE_CLASS_MAPPINGS (upstream loads the entry point only
# where it is absent): see the pack's __init__.py
if importlib.util.find_spec("comfy_compatibility") is not None:
    NODE_CLASS_MAPPINGS: dict = {}
