"""Write example_workflows/: each example as a UI workflow (what the ComfyUI frontend loads and the template
browser lists) and its API-format twin in example_workflows/api/ (what the runner and the tests queue).

    COMFYUI_PATH=<ComfyUI> python -m scripts.make_workflows

Widget order and defaults come from a running server's /object_info, so the UI files match the node definitions.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request

from devtools import comfy_server
from devtools import tiny_comfy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "example_workflows")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

T2V_MODEL, CLIP, VAE = "wan2.1_t2v_1.3B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"
NEGATIVE = "blurry, low quality, static, distorted"


def loaders(unet=T2V_MODEL):
    return {
        "1": ("UNETLoader", {"unet_name": unet, "weight_dtype": "default"}),
        "2": ("CLIPLoader", {"clip_name": CLIP, "type": "wan", "device": "default"}),
        "3": ("VAELoader", {"vae_name": VAE}),
    }


def text(tracker_text, words="", one_step=True):
    """The prompts: one tracker that encodes both (its 'positive'/'negative' outputs feed the sampler, and the
    uncond rows' maps are the negative prompt's words), or the tracker beside two CLIP Text Encode nodes."""
    tracker = {"clip": ["2", 0], "text": tracker_text, **({"mode": "both", "words": words} if words else {})}
    if one_step:
        return {"4": ("WanWeightedTokenTracker", {**tracker, "negative_text": NEGATIVE})}
    return {
        "4": ("WanWeightedTokenTracker", tracker),
        "5": ("CLIPTextEncode", {"clip": ["2", 0], "text": ["4", 1]}),
        "6": ("CLIPTextEncode", {"clip": ["2", 0], "text": NEGATIVE}),
    }


VIEW_NODES = {"token overlay": ("WanAttentionOverlay", {}), "sink overlay": ("WanAttentionStatisticOverlay", {}),
              "token grid": ("WanAttentionGrid", {}), "block grid": ("WanAttentionGrid", {"rows": "blocks"}),
              "self-attention window": ("WanAttentionMatrix", {"matrix": "window scores"}),
              "frame x frame mass": ("WanAttentionMatrix", {"matrix": "frame x frame mass"})}


def outputs(recorder, samples, images, first_id=20, views=("token overlay", "token grid")):
    nodes = {
        str(first_id): ("WanSaveAttention", {"recorder": recorder, "samples": samples, "images": images}),
    }
    for i, view in enumerate(views):
        hid, sid = str(first_id + 1 + 2 * i), str(first_id + 2 + 2 * i)
        cls, kw = VIEW_NODES[view]
        kw = {**kw, "recorder": recorder, "samples": samples}
        if kw.get("matrix") == "frame x frame mass":
            kw.pop("matrix")  # the Attention Matrix's default view
        if view in ("token overlay", "sink overlay"):
            kw["images"] = images
        nodes[hid] = (cls, kw)
        if view in ("token overlay", "sink overlay"):
            nodes[sid] = ("SaveAnimatedWEBP", {"images": [hid, 0], "filename_prefix": f"wan_attention/{view.replace(' ', '_')}",
                                               "fps": 16.0, "lossless": False, "quality": 90, "method": "default"})
        else:
            nodes[sid] = ("SaveImage", {"images": [hid, 0], "filename_prefix": f"wan_attention/{view.replace(' ', '_')}"})
    return nodes


def t2v():
    g = {**loaders(), **text("a beautiful (flower:2.5) near a (tree:1.5), gentle wind, sunny garden")}
    g.update({
        "7": ("WanAttachRecorder", {"model": ["1", 0], "token_tracking": ["4", 0]}),
        "8": ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        "9": ("KSampler", {"model": ["7", 0], "seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc",
                           "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["8", 0],
                           "denoise": 1.0}),
        "10": ("VAEDecode", {"samples": ["9", 0], "vae": ["3", 0]}),
    })
    g.update(outputs(["7", 1], ["9", 0], ["10", 0]))
    return g


def i2v():
    g = {**loaders("wan2.1_i2v_480p_14B_fp16.safetensors"), **text("a (cat:2.0) turns its head toward the (window:1.5)")}
    g.update({
        "11": ("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"}),
        "12": ("LoadImage", {"image": "example.png"}),
        "13": ("CLIPVisionEncode", {"clip_vision": ["11", 0], "image": ["12", 0], "crop": "none"}),
        "14": ("WanImageToVideo", {"positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0],
                                   "clip_vision_output": ["13", 0], "start_image": ["12", 0], "width": 832,
                                   "height": 480, "length": 33, "batch_size": 1}),
        # image context is recorded by default where the model has it (i2v): no options node needed
        "7": ("WanAttachRecorder", {"model": ["1", 0], "token_tracking": ["4", 0]}),
        "9": ("KSampler", {"model": ["7", 0], "seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "uni_pc",
                           "scheduler": "simple", "positive": ["14", 0], "negative": ["14", 1],
                           "latent_image": ["14", 2], "denoise": 1.0}),
        "10": ("VAEDecode", {"samples": ["9", 0], "vae": ["3", 0]}),
    })
    g.update(outputs(["7", 1], ["9", 0], ["10", 0]))
    return g


def a14b():
    g = {**loaders("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
         **text("a (red kite:2.0) rises over a (beach:1.5) at sunset")}
    g.update({
        "15": ("UNETLoader", {"unet_name": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}),
        "16": ("ModelSamplingSD3", {"model": ["1", 0], "shift": 8.0}),
        "17": ("ModelSamplingSD3", {"model": ["15", 0], "shift": 8.0}),
        "7": ("WanAttachRecorder", {"model": ["16", 0], "token_tracking": ["4", 0]}),
        "18": ("WanAttachRecorder", {"model": ["17", 0], "share_recorder": ["7", 1]}),
        "8": ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        "9": ("KSamplerAdvanced", {"model": ["7", 0], "add_noise": "enable", "noise_seed": 42, "steps": 20, "cfg": 3.5,
                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0],
                                   "negative": ["6", 0], "latent_image": ["8", 0], "start_at_step": 0,
                                   "end_at_step": 10, "return_with_leftover_noise": "enable"}),
        "19": ("KSamplerAdvanced", {"model": ["18", 0], "add_noise": "disable", "noise_seed": 42, "steps": 20,
                                    "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0],
                                    "negative": ["6", 0], "latent_image": ["9", 0], "start_at_step": 10,
                                    "end_at_step": 10000, "return_with_leftover_noise": "disable"}),
        "10": ("VAEDecode", {"samples": ["19", 0], "vae": ["3", 0]}),
    })
    g.update(outputs(["7", 1], ["19", 0], ["10", 0], views=("token overlay", "block grid")))
    return g


def sink_study():
    g = {**loaders(), **text("a (dog:1.5) runs across a field", one_step=False)}
    g.update({
        "11": ("WanWeightedTokenTracker", {"clip": ["2", 0], "text": NEGATIVE, "mode": "listed",
                                           "words": "blurry, <padding>"}),
        "12": ("WanRecordingOptions", {"branch": "both", "window_query_frames": "0", "store_per_head": True}),
        "7": ("WanAttachRecorder", {"model": ["1", 0], "token_tracking": ["4", 0], "negative_tracking": ["11", 0],
                                    "record": "cross attention + sink statistics", "steps": "every 5",
                                    "options": ["12", 0]}),
        "8": ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
        "9": ("KSampler", {"model": ["7", 0], "seed": 42, "steps": 30, "cfg": 6.0, "sampler_name": "uni_pc",
                           "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["8", 0],
                           "denoise": 1.0}),
        "10": ("VAEDecode", {"samples": ["9", 0], "vae": ["3", 0]}),
    })
    g["6"] = ("CLIPTextEncode", {"clip": ["2", 0], "text": ["11", 1]})  # the negative prompt the tracker saw
    g.update(outputs(["7", 1], ["9", 0], ["10", 0], views=("sink overlay", "frame x frame mass", "self-attention window")))
    return g


EXAMPLES = {
    "wan21_t2v_attention": (t2v, "Wan 2.1 t2v: where weighted words land, overlaid on the video"),
    "wan21_i2v_attention": (i2v, "Wan 2.1 i2v: cross-attention of weighted words with an input image"),
    "wan22_a14b_two_experts_attention": (a14b, "Wan 2.2 A14B: one recording across both experts"),
    "wan21_attention_sink_study": (sink_study, "Self-attention sinks (received attention, frame x frame mass, exact "
                                               "window) and the negative prompt's words in the uncond rows"),
}


def widget_names(info: dict) -> list:
    names = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            kind = spec[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append((name, spec))
    return names


def fill_defaults(api: dict, object_info: dict, pack_nodes: bool = True) -> dict:
    """Give every widget a value: the example's, else the node's default (first option for combos).

    ``pack_nodes=False``: the pack's own nodes keep only the inputs the example gives (their other inputs are
    optional with defaults: the API twins show what an API prompt needs); ComfyUI's nodes get every widget."""
    for node in api.values():
        info = object_info[node["class_type"]]
        if not pack_nodes and info.get("category", "").startswith("Wan Attention Capture"):
            continue
        for name, spec in widget_names(info):
            if name in node["inputs"]:
                continue
            opts = spec[1] if len(spec) > 1 else {}
            if "default" in opts:
                node["inputs"][name] = opts["default"]
            elif isinstance(spec[0], list) and spec[0]:
                node["inputs"][name] = spec[0][0]
            elif spec[0] == "COMBO" and opts.get("options"):
                node["inputs"][name] = opts["options"][0]
    return api


def to_ui(api: dict, object_info: dict, title: str) -> dict:
    """The frontend's workflow format for an API graph: nodes with widget values in definition order, and links."""
    ids = {nid: i + 1 for i, nid in enumerate(sorted(api, key=int))}
    depth = {}

    def d(nid):
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]
    links, nodes, out_links = [], [], {}
    rows = {}
    for nid in sorted(api, key=int):
        d(nid)
    for nid in sorted(api, key=lambda n: (depth[n], int(n))):
        node, info = api[nid], object_info[api[nid]["class_type"]]
        widgets = widget_names(info)
        widget_set = {n for n, _ in widgets}
        inputs = []
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, []):
                spec = info["input"][section][name]
                value = node["inputs"].get(name)
                kind = "COMBO" if isinstance(spec[0], list) else spec[0]
                if name in widget_set and not isinstance(value, list):
                    continue
                entry = {"name": name, "type": kind, "link": None}
                if name in widget_set:
                    entry["widget"] = {"name": name}
                if isinstance(value, list):
                    link_id = len(links) + 1
                    src = value[0]
                    src_type = object_info[api[src]["class_type"]]["output"][value[1]]
                    links.append([link_id, ids[src], value[1], ids[nid], len(inputs), src_type])
                    out_links.setdefault((src, value[1]), []).append(link_id)
                    entry["link"] = link_id
                inputs.append(entry)
        values = []
        for name, spec in widgets:
            v = node["inputs"].get(name)
            values.append("" if isinstance(v, list) else v)
            if len(spec) > 1 and spec[1].get("control_after_generate"):
                values.append("fixed")
        row = rows.setdefault(depth[nid], 0)
        rows[depth[nid]] += 1
        nodes.append({"id": ids[nid], "type": node["class_type"], "pos": [40 + depth[nid] * 380, 40 + row * 300],
                      "size": [340, 220], "flags": {}, "order": len(nodes), "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": values, "_api_id": nid})
    for n in nodes:
        info, api_id = object_info[n["type"]], n.pop("_api_id")
        n["outputs"] = [{"name": name, "type": kind, "links": out_links.get((api_id, i), []), "slot_index": i}
                        for i, (name, kind) in enumerate(zip(info.get("output_name", info["output"]), info["output"]))]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"info": {"title": title}, "ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


ONE_STEP = {("5", 0): ["4", 3], ("6", 0): ["4", 4]}  # CLIP Text Encode outputs -> the tracker's own encodings


def api_graph(build) -> dict:
    g = build()
    remap = {} if "5" in g else ONE_STEP
    return {nid: {"class_type": cls, "inputs": {k: remap.get(tuple(v), v) if isinstance(v, list) else v
                                                for k, v in inputs.items()}} for nid, (cls, inputs) in g.items()}


def main() -> int:
    if tiny_comfy.COMFYUI is None:
        print(tiny_comfy.NOT_FOUND, file=sys.stderr)
        return 2
    proc, url, _ = comfy_server.start(tiny_comfy.COMFYUI, tempfile.mkdtemp(prefix="wan_capture_wf_"), tiny_nodes=False)
    try:
        with urllib.request.urlopen(url + "/object_info", timeout=30) as r:
            object_info = json.load(r)
    finally:
        comfy_server.stop(proc)
    os.makedirs(os.path.join(OUT, "api"), exist_ok=True)
    for name, (build, title) in EXAMPLES.items():
        api = fill_defaults(api_graph(build), object_info, pack_nodes=False)
        with open(os.path.join(OUT, "api", f"{name}.json"), "w") as f:
            json.dump(api, f, indent=2)
        api = fill_defaults(api_graph(build), object_info)  # the UI file shows every widget's value
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(to_ui(api, object_info, title), f, indent=2)
        print(f"wrote example_workflows/{name}.json and example_workflows/api/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
