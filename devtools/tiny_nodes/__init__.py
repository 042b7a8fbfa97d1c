"""Test and demo helper nodes (never part of the shipped pack): tiny random Wan models inside a running ComfyUI.

`TinyWanModels` gives MODEL, CLIP and VAE built on the fly (a 2-block Wan DiT, a one-layer umt5 over a
sentencepiece model trained in milliseconds, a random Wan VAE); `TinyClipVisionOutput` stands in for CLIP vision.
"""
import functools
import os
import sys
import tempfile
import types

import torch
from comfy_api.latest import ComfyExtension, io

# loaded by ComfyUI as a custom node of its own (a symlink): the pack root holds devtools/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
import devtools.tiny_comfy as tc  # noqa: E402


@functools.lru_cache(maxsize=None)
def _clip():
    return tc.tiny_clip(tc.tiny_spiece_model(), tempfile.mkdtemp(prefix="tiny_te_"))


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
            inputs=[io.Combo.Input("variant", options=["t2v", "i2v", "ti2v"], default="t2v"),
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


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [TinyWanModels, TinyClipVisionOutput]


async def comfy_entrypoint():
    return _Extension()
