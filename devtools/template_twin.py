"""The 2026 Wan workflow templates (``comfyui-workflow-templates-json`` 0.1.123): each classified as recorded or refused
(with what a user is told), and tiny twins of the ones a tree can run, with the pack wired in as a user would.

A twin is the template's own node graph, converted from its UI form with the server's ``/object_info``: the model
files become the tiny random models of ``tiny_nodes``, the video 9 frames of 64x64, sampling 3 steps; LoRAs are left
out (their files are the user's), outputs that write videos are replaced by a ``SaveLatent`` of each sampler's
output. With the pack: an attention spy (test-side: it keeps the q/k every attention call receives) and Attach
Attention Recorder between each sampler and the model it samples, and Save Attention Maps on the last sampler's
output. Templates built of subgraphs (the 2026 editor's), or of node types or model architectures the tree or the
tiny models lack, are not run here, and the table says why.
"""
from __future__ import annotations

import copy
import importlib.resources
import json
from typing import Dict, List, Optional, Tuple

PACKAGE = "comfyui_workflow_templates_json"
MODEL_LOADERS = {"UNETLoader", "UnetLoaderGGUF", "CheckpointLoaderSimple"}
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SAMPLERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"}
DROPPED = {"MarkdownNote", "Note", "SaveVideo", "CreateVideo", "SaveAnimatedWEBP", "SaveAnimatedPNG", "PreviewImage",
           "SaveImage", "SaveWEBM", "VHS_VideoCombine"}


def _messages():
    """What the pack tells a user, by the situations the templates meet (the pack's own strings)."""
    import importlib
    from devtools.tiny_comfy import load_comfy
    return importlib.import_module(f"{load_comfy().__name__}.nodes.comfy_attach").UNSUPPORTED


def wan_templates() -> Dict[str, dict]:
    """Every Wan template of the package: its workflows that load a Wan model or use Wan's nodes."""
    root = importlib.resources.files(PACKAGE) / "templates"
    out = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            wf = json.loads(entry.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if not isinstance(wf, dict) or "nodes" not in wf:
            continue
        nodes = all_nodes(wf)
        models = [str(v) for n in nodes if n["type"] in MODEL_LOADERS for v in (n.get("widgets_values") or [])[:1]]
        if any("wan" in m.lower() or "causal_forcing" in m.lower() for m in models) or "wan" in entry.name.lower():
            out[entry.name[:-5]] = wf
    return out


def all_nodes(wf: dict) -> List[dict]:
    """The nodes of a workflow and of its subgraphs (not the subgraph instances themselves)."""
    subgraphs = wf.get("definitions", {}).get("subgraphs", [])
    ids = {g["id"] for g in subgraphs}
    return [n for n in [n for g in subgraphs for n in g["nodes"]] + wf["nodes"] if n["type"] not in ids]


def classify(wf: dict) -> Tuple[str, str]:
    """``(verdict, why)``: ``recorded``, ``refused`` (the message a user sees) or ``not applicable``."""
    types = {n["type"] for n in all_nodes(wf)}
    if not types & MODEL_LOADERS:
        api = sorted(t for t in types if t.endswith("Api") or t.startswith("Wan") and "Api" in t)
        return "not applicable", f"cloud API nodes ({', '.join(api) or 'no model loader'}): no local model to record"
    unsupported = _messages()
    if types & {"WanSoundImageToVideo", "WanSoundImageToVideoExtend"}:
        return "refused", f"Attach refuses WanModel_S2V: {unsupported['WanModel_S2V']}"
    if types & {"WanAnimateToVideo", "WanAnimate2ToVideo"}:
        return "refused", f"Attach refuses AnimateWanModel: {unsupported['AnimateWanModel']}"
    if types & {"ContextWindowsManual", "WanContextWindowsManual"}:
        return "refused", "the first evaluation stops: Attach Attention Recorder cannot record a sampling with context windows"
    if "BerniniConditioning" in types:
        return "refused", ("the first attention call stops: Bernini's context_latents add tokens the latent grid does "
                           "not explain (an unknown token stream)")
    if "SamplerARVideo" in types:
        return "recorded", "ComfyUI's causal Wan, per chunk with its KV-cache log"
    return "recorded", "a Wan DiT under ComfyUI's samplers"


# model files whose architecture other tests record exactly (test name), where the template's own twin cannot run
COVERED = {"wan2.2_t2v": "Wan 2.2 A14B's two experts: tests/test_comfy_recorder.py",
           "causal_forcing": "ComfyUI's causal Wan: pytest -k core_causal", "humo": "HuMo: pytest -k extra_streams"}


def covered(wf: dict) -> Optional[str]:
    """Which test records this template's architecture exactly, where one does."""
    names = " ".join(str(v).lower() for n in all_nodes(wf) if n["type"] in MODEL_LOADERS
                     for v in (n.get("widgets_values") or [])[:1])
    return next((why for marker, why in COVERED.items() if marker in names), None)


def tiny_variant(wf: dict) -> Tuple[Optional[str], str]:
    """The tiny model a twin can use, from the template's model files, or None and why not."""
    names = " ".join(str(v).lower() for n in all_nodes(wf) if n["type"] in MODEL_LOADERS
                     for v in (n.get("widgets_values") or [])[:1])
    for marker, variant in (("wan2.1_fun_inp", "i2v"), ("wan2.1_fun_control", "fun_control"), ("ati", "i2v"),
                            ("wanmove", "i2v"), ("wan2.2_i2v", "i2v22")):
        if marker in names:  # an architecture of a tiny variant under another file name
            return variant, ""
    for marker, why in (("fun", "Wan 2.2 Fun control/inpaint and Fun camera"), ("alpha", "Wan alpha (RGBA VAE)"),
                        ("camera", "Wan camera"), ("scail", "SCAIL"), ("s2v", "S2V"), ("animate", "Animate"),
                        ("bernini", "Bernini"), ("dancer", "Dancer"), ("infinitetalk", "InfiniteTalk"),
                        ("causal_forcing", "causal Wan (its own twin: pytest -k core_causal)")):
        if marker in names:
            return None, f"no tiny twin of the {why} architecture yet"
    for marker, variant in (("vace", "vace"), ("ti2v", "ti2v"), ("flf2v", "i2v"), ("i2v", "i2v"), ("t2v", "t2v")):
        if marker in names:
            return variant, ""
    return None, f"no tiny twin for the model files {names!r}"


# -- UI -> API -----------------------------------------------------------------------------------------------------
def to_api(wf: dict, info: dict) -> Tuple[Optional[dict], str]:
    """The template as an API prompt (``/object_info`` gives each node's inputs), or None and why it cannot be."""
    if wf.get("definitions", {}).get("subgraphs"):
        return None, "built of subgraphs (the 2026 editor's); not converted here"
    links = {l[0]: l for l in wf["links"]}
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] not in DROPPED}
    missing = sorted({n["type"] for n in nodes.values()} - set(info))
    if missing:
        return None, f"node types this tree lacks: {', '.join(missing)}"
    api = {}
    for nid, n in nodes.items():
        if n.get("mode", 0) in (2, 4):
            continue  # muted or bypassed
        spec = info[n["type"]]
        linked = {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        values = iter(n.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                t = spec["input"][section][name]
                widget = isinstance(t[0], list) or t[0] in WIDGETS
                if widget:
                    value = next(values, None)
                    if len(t) > 1 and isinstance(t[1], dict) and t[1].get("control_after_generate"):
                        next(values, None)
                    if name not in linked and value is not None:
                        inputs[name] = value
                if name in linked:
                    _, origin, slot = links[linked[name]][:3]
                    if origin in nodes and nodes[origin].get("mode", 0) not in (2, 4):
                        inputs[name] = [str(origin), slot]
        api[str(nid)] = {"class_type": n["type"], "inputs": inputs}
    return api, ""


def _consumers(api: dict, nid: str, slot: int):
    for node in api.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value == [nid, slot]:
                yield node, name


def tiny_twin(api: dict, variant: str, with_pack: bool, prefix: str, spy: Optional[str] = None) -> dict:
    """The API prompt at tiny size, LoRAs left out, a SaveLatent per sampler; ``with_pack``: spy + Attach before each
    sampler's model, Save Attention Maps on the last sampler's output."""
    from devtools.tiny_workflow import to_tiny
    g = copy.deepcopy(api)
    files = sorted({n["class_type"] for n in g.values()} & {"LoadVideo", "LoadAudio", "RecordAudio"})
    if files:
        raise ValueError(f"it loads the user's video or audio ({', '.join(files)}); no tiny stand-in of those yet")
    for nid, node in list(g.items()):  # LoRA loaders pass their model (and clip) through
        if node["class_type"] in ("LoraLoaderModelOnly", "LoraLoader"):
            for slot, name in enumerate(("model", "clip")):
                for consumer, key in list(_consumers(g, nid, slot)):
                    if name not in node["inputs"]:
                        raise ValueError(f"its {node['class_type']} gets its {name} from no node this conversion keeps")
                    consumer["inputs"][key] = node["inputs"][name]
            del g[nid]
    g = to_tiny(g, variant)
    for node in g.values():  # every node with a video size gets the twin's
        for k, v in {"width": 64, "height": 64, "length": 9}.items():
            if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                node["inputs"][k] = v
    samplers = [nid for nid, n in g.items() if n["class_type"] in SAMPLERS]
    for nid in samplers:
        g[f"{nid}_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [nid, 0],
                                                                     "filename_prefix": f"{prefix}_{nid}"}}
    if not with_pack:
        return g
    attached: Dict[str, list] = {}
    first = None
    for nid in sorted(samplers, key=int):
        node = g[nid]
        holder = node if "model" in node["inputs"] else g[node["inputs"]["guider"][0]]
        source = holder["inputs"]["model"]
        key = json.dumps(source)
        if key not in attached:
            n = len(attached)
            g[f"spy{n}"] = {"class_type": "TinyAttentionSpy", "inputs": {"model": source, "folder": spy or prefix}}
            inputs = {"model": [f"spy{n}", 0], "record": "cross attention + sink statistics", "options": ["opts", 0]}
            if first is not None:
                inputs["share_recorder"] = [first, 1]
            g[f"attach{n}"] = {"class_type": "WanAttachRecorder", "inputs": inputs}
            first = first or f"attach{n}"
            attached[key] = [f"attach{n}", 0]
        for consumer, name in list(_consumers(g, *source)):
            if consumer["class_type"] not in ("TinyAttentionSpy",):
                consumer["inputs"][name] = attached[key]
    g["opts"] = {"class_type": "WanRecordingOptions", "inputs": {"text_positions": "0,5", "storage_dtype": "float32",
                                                                 "store_per_head": True}}
    last = max(samplers, key=int)
    g["save"] = {"class_type": "WanSaveAttention", "inputs": {"recorder": [first, 1], "samples": [last, 0],
                                                              "batch_name": prefix}}
    return g
