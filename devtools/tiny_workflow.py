"""Turn an example API workflow into its tiny twin: real model loaders become the tiny helper nodes, the video
shrinks to 9 frames at 64x64 and sampling to 3 steps, so it runs anywhere in seconds."""
from __future__ import annotations

import copy

LOADER_OUTPUT = {"UNETLoader": 0, "CLIPLoader": 1, "VAELoader": 2}
LATENTS = {"EmptyHunyuanLatentVideo", "WanImageToVideo", "Wan22ImageToVideoLatent", "EmptyLatentImage"}


def to_tiny(graph: dict, variant: str = "t2v", steps: int = 3) -> dict:
    g = copy.deepcopy(graph)
    replaced = {}  # (node id) -> (tiny node id, output index)
    unet_seeds = 0
    for nid, node in list(g.items()):
        cls = node["class_type"]
        if cls in LOADER_OUTPUT:
            seed = unet_seeds if cls == "UNETLoader" else 0
            unet_seeds += cls == "UNETLoader"
            tid = f"tiny_{seed}"
            g.setdefault(tid, {"class_type": "TinyWanModels", "inputs": {"variant": variant, "blocks": 2, "seed": seed}})
            replaced[nid] = (tid, LOADER_OUTPUT[cls])
            del g[nid]
        elif cls == "CLIPVisionLoader":
            del g[nid]
        elif cls == "CLIPVisionEncode":
            g[nid] = {"class_type": "TinyClipVisionOutput", "inputs": {"seed": 0}}
        elif cls == "LoadImage":
            g[nid] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}}
    for node in g.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value and value[0] in replaced:
                tid, out = replaced[value[0]]
                node["inputs"][key] = [tid, out]
        if node["class_type"] in LATENTS:
            node["inputs"].update({k: v for k, v in {"width": 64, "height": 64, "length": 9}.items()
                                   if k in node["inputs"]})
        if isinstance(node["inputs"].get("steps"), int):  # samplers; the heatmap's "steps" is a selection string
            scale = steps / node["inputs"]["steps"]
            for k in ("start_at_step", "end_at_step"):
                if k in node["inputs"] and node["inputs"][k] < 10000:
                    node["inputs"][k] = round(node["inputs"][k] * scale)
            node["inputs"]["steps"] = steps
    return g


VIEWS = {"WanAttentionOverlay", "WanAttentionGrid", "SaveAnimatedWEBP", "SaveImage"}


def tiny_example(name: str, variant: str = "t2v") -> dict:
    """``example_workflows/api/<name>`` at tiny size, without its view nodes (the recording and its Save only)."""
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows", "api", name)
    with open(path, encoding="utf-8") as f:
        g = to_tiny(json.load(f), variant)
    return {k: v for k, v in g.items() if v["class_type"] not in VIEWS}
