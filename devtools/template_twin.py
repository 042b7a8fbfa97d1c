"""The 2026 Wan workflow templates (``comfyui-workflow-templates-json`` 0.1.123): each classified as recorded or refused
(with what a user is told), and tiny twins of the ones a tree can run, with the pack wired in as a user would.

A twin is the template's own node graph, converted from its UI form with the server's ``/object_info``: the model
files become the tiny random models of ``tiny_nodes``, the video 9 frames of 64x64, sampling 3 steps; LoRAs are left
out (their files are the user's), outputs that write videos are replaced by a ``SaveLatent`` of each sampler's
output. With the pack: an attention spy (test-side: it keeps the q/k every attention call receives) and Attach
Attention Recorder between each sampler and the model it samples, and Save Attention Maps on the last sampler's
output. Subgraphs (the 2026 editor's) are flattened as the frontend does; a user's video becomes ``TinyVideo``.
Templates of node types or model architectures the tree or the tiny models lack are not run here, and the table
says why.
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
                            ("wanmove", "i2v"), ("wan2.2_i2v", "i2v22"), ("wan2.2_fun_control_5b", "fun22_5b"),
                            ("wan2.2_fun_inpaint_5b", "fun_inp_5b"), ("wan2.2_fun_control", "fun22"),
                            ("wan2.2_fun_inpaint", "i2v22"), ("wan2.2_fun_camera", "camera22"),
                            ("wan2.1_fun_camera", "camera")):
        if marker in names:  # an architecture of a tiny variant under another file name
            return variant, ""
    for marker, why in (("alpha", "Wan alpha (RGBA VAE)"), ("scail", "SCAIL"), ("s2v", "S2V"), ("animate", "Animate"),
                        ("bernini", "Bernini"), ("dancer", "Dancer"), ("infinitetalk", "InfiniteTalk"),
                        ("causal_forcing", "causal Wan (its own twin: pytest -k core_causal)")):
        if marker in names:
            return None, f"no tiny twin of the {why} architecture yet"
    for marker, variant in (("vace", "vace"), ("ti2v", "ti2v"), ("flf2v", "i2v"), ("i2v", "i2v"), ("t2v", "t2v")):
        if marker in names:
            return variant, ""
    return None, f"no tiny twin for the model files {names!r}"


# -- UI -> API -----------------------------------------------------------------------------------------------------
SUBGRAPH_IN, SUBGRAPH_OUT = -10, -20  # the ids of a subgraph's input and output nodes in its links
PASS_THROUGH = {"Reroute"}
PRIMITIVE_INTS = {"PrimitiveInt"}
SWITCHES = {"ComfySwitchNode", "ComfySoftSwitchNode"}  # frontend-only nodes that hand their one input on


def _link(l) -> tuple:
    """``(id, origin, origin_slot, target, target_slot)`` of a link in either form (list at top level, dict inside
    a subgraph)."""
    if isinstance(l, dict):
        return l["id"], l["origin_id"], l["origin_slot"], l["target_id"], l["target_slot"]
    return tuple(l[:5])


CONTROL_AFTER_GENERATE = {"fixed", "randomize", "increment", "decrement"}


def _widget_values(names: List[str], values: list, g: dict) -> dict:
    """The older subgraph form's instance values by input name: one per widget input in order, a seed's
    control-after-generate value after it where the editor kept one."""
    if not values:
        return {}
    out = {}
    rest = list(values)
    for name in names:
        if not rest:
            break
        out[name] = rest.pop(0)
        if rest and isinstance(out[name], int) and rest[0] in CONTROL_AFTER_GENERATE and len(rest) > len(
                names) - len(out):
            rest.pop(0)
    if rest or len(out) != len(names):
        raise ValueError(f"subgraph {g.get('name')!r}: {len(values)} widget values for {len(names)} widget inputs")
    return out


def flatten(wf: dict) -> dict:
    """The workflow with every subgraph instance (the 2026 editor's) replaced by the subgraph's own nodes, nested ones
    too, as the frontend does when it queues a prompt: links through the subgraph's inputs and outputs joined, the
    instance's widget values (older form: in the order of the subgraph's widget inputs) set on the inner widgets
    they feed; in the newer form (``proxyWidgets``) the values are the inner nodes' own. Raises ValueError where a
    subgraph cannot be read that way."""
    subgraphs = {g["id"]: g for g in wf.get("definitions", {}).get("subgraphs", [])}
    nodes = [dict(n, inputs=[dict(i) for i in n.get("inputs", [])]) for n in wf["nodes"]]
    links = {l[0]: list(_link(l)) for l in wf["links"]}
    next_node = 1 + max([n["id"] for n in nodes] + [n["id"] for g in subgraphs.values() for n in g["nodes"]])
    next_link = 1 + max([l for l in links] + [_link(l)[0] for g in subgraphs.values() for l in g["links"]] + [0])
    for _ in range(16):  # nesting depth
        instance = next((n for n in nodes if n["type"] in subgraphs), None)
        if instance is None:
            break
        g = subgraphs[instance["type"]]
        nodes.remove(instance)
        ids = {}
        for inner in g["nodes"]:
            ids[inner["id"]] = next_node
            next_node += 1
        outer_in = {i["name"]: links.get(i.get("link")) for i in instance.get("inputs", [])}
        values = instance.get("widgets_values") or []
        widget_inputs = [i["name"] for i in g["inputs"] if i["type"] in WIDGETS or i["type"].startswith("COMFY_DYNAMICCOMBO")]
        given = _widget_values(widget_inputs, values, g)
        inner_links, overrides = {}, {}
        for l in g["links"]:
            lid, origin, oslot, target, tslot = _link(l)
            if origin == SUBGRAPH_IN:
                name = g["inputs"][oslot]["name"]
                if outer_in.get(name):  # linked at the instance: joined to what feeds it
                    inner_links[lid] = [None, outer_in[name][1], outer_in[name][2], ids.get(target, target), tslot]
                elif name in given:
                    overrides[(ids[target], tslot)] = given[name]
                continue  # unlinked, no value: the inner widget keeps its own
            inner_links[lid] = [None, ids.get(origin, origin), oslot, ids.get(target, target), tslot]
        out_links = {}  # output slot -> inner (origin, slot)
        for lid, (_, origin, oslot, target, tslot) in list(inner_links.items()):
            if target == SUBGRAPH_OUT:
                out_links[tslot] = (origin, oslot)
                del inner_links[lid]
        renamed = {}
        for lid, l in inner_links.items():
            l[0] = renamed[lid] = next_link
            links[next_link] = l
            next_link += 1
        for lid, l in list(links.items()):  # the instance's outputs: from the inner node that feeds them
            if l[1] == instance["id"]:
                if l[2] not in out_links:
                    raise ValueError(f"subgraph {g.get('name')!r}: output {l[2]} is fed by no inner node")
                l[1], l[2] = out_links[l[2]]
            elif l[3] == instance["id"]:
                del links[lid]
        for inner in g["nodes"]:
            n = dict(inner, id=ids[inner["id"]], inputs=[dict(i) for i in inner.get("inputs", [])])
            for slot, i in enumerate(n["inputs"]):
                i["link"] = renamed.get(i.get("link"))
                if (n["id"], slot) in overrides:
                    n.setdefault("_values", {})[i["name"]] = overrides[(n["id"], slot)]
            nodes.append(n)
    else:
        raise ValueError("subgraphs nested more than 16 deep")
    return {"nodes": nodes, "links": list(links.values())}


def to_api(wf: dict, info: dict) -> Tuple[Optional[dict], str]:
    """The template as an API prompt (``/object_info`` gives each node's inputs), or None and why it cannot be.

    Subgraphs are flattened first. As the frontend queues it: bypassed nodes hand on their input of the same type,
    muted ones are left out with what only they feed, a ``PrimitiveNode``'s value is set on the widget it feeds."""
    try:
        wf = flatten(wf)
    except ValueError as e:
        return None, f"its subgraphs cannot be flattened: {e}"
    links = {l[0]: l for l in wf["links"]}
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] not in DROPPED}
    by_id = {n["id"]: n for n in wf["nodes"]}

    def source(link_id, want_type: str, depth: int = 0):
        """What a link really brings: ``(node, slot)``, a ``("value", v)``, or None (muted, dropped)."""
        _, origin, slot = links[link_id][:3]
        node = by_id.get(origin)
        if node is None or depth > 64:
            return None
        if node["type"] == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        if node.get("mode", 0) == 4 or node["type"] in PASS_THROUGH:  # bypassed: the first input of the type
            out_type = (node.get("outputs") or [{}])[slot].get("type", want_type) if node.get("outputs") else want_type
            for i in node.get("inputs", []):
                if i.get("link") is not None and (i.get("type") == out_type or node["type"] in PASS_THROUGH):
                    return source(i["link"], out_type, depth + 1)
            return None
        if node.get("mode", 0) == 2 or origin not in nodes:
            return None
        return (str(origin), slot)

    kept = {nid: n for nid, n in nodes.items() if n.get("mode", 0) not in (2, 4) and n["type"] not in PASS_THROUGH
            and n["type"] != "PrimitiveNode"}
    missing = sorted({n["type"] for n in kept.values()} - set(info))
    if missing:
        return None, f"node types this tree lacks: {', '.join(missing)}"
    api = {}
    for nid, n in kept.items():
        spec = info[n["type"]]
        linked = {i["name"]: (i["link"], i.get("type", "")) for i in n.get("inputs", []) if i.get("link") is not None}
        values = iter(n.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                t = spec["input"][section][name]
                widget = isinstance(t[0], list) or t[0] in WIDGETS
                if widget:
                    value = next(values, None) if not isinstance(n.get("widgets_values"), dict) else \
                        n["widgets_values"].get(name)
                    if len(t) > 1 and isinstance(t[1], dict) and t[1].get("control_after_generate") and \
                            not isinstance(n.get("widgets_values"), dict):
                        next(values, None)
                    value = n.get("_values", {}).get(name, value)
                    if name not in linked and value is not None:
                        inputs[name] = value
                if name in linked:
                    got = source(*linked[name])
                    if got is not None and got[0] == "value":
                        inputs[name] = got[1]
                    elif got is not None:
                        inputs[name] = [got[0], got[1]]
                    elif widget and value is not None:
                        inputs[name] = value
        api[str(nid)] = {"class_type": n["type"], "inputs": inputs}
    return api, ""


def _consumers(api: dict, nid: str, slot: int):
    for node in api.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value == [nid, slot]:
                yield node, name


def _primitives(g: dict, value: list) -> List[str]:
    """The primitive int nodes a linked input takes its value from, through 2026's switch nodes."""
    node = g.get(value[0], {})
    if node.get("class_type") in PRIMITIVE_INTS:
        return [value[0]]
    if node.get("class_type") in SWITCHES:
        return [n for k in ("on_true", "on_false") if isinstance(node["inputs"].get(k), list)
                for n in _primitives(g, node["inputs"][k])]
    return []


def _ancestors(g: dict, nid: str) -> set:
    """Every node ``nid`` takes an input from, directly or not."""
    seen, todo = set(), [nid]
    while todo:
        for value in g[todo.pop()]["inputs"].values():
            if isinstance(value, list) and value and value[0] in g and value[0] not in seen:
                seen.add(value[0])
                todo.append(value[0])
    return seen


def tiny_twin(api: dict, variant: str, with_pack: bool, prefix: str, spy: Optional[str] = None) -> dict:
    """The API prompt at tiny size, LoRAs left out, a SaveLatent per sampler; ``with_pack``: spy + Attach before each
    sampler's model, Save Attention Maps on the last sampler's output."""
    from devtools.tiny_workflow import to_tiny
    g = copy.deepcopy(api)
    files = sorted({n["class_type"] for n in g.values()} & {"LoadAudio", "RecordAudio"})
    if files:
        raise ValueError(f"it loads the user's audio ({', '.join(files)}); no tiny stand-in of that yet")
    for nid, node in g.items():  # the user's video: a seeded random clip of the twin's size
        if node["class_type"] == "LoadVideo":
            g[nid] = {"class_type": "TinyVideo", "inputs": {"frames": 9, "width": 64, "height": 64, "seed": 0}}
    for nid, node in list(g.items()):  # LoRA loaders pass their model (and clip) through
        if node["class_type"] in ("LoraLoaderModelOnly", "LoraLoader"):
            for slot, name in enumerate(("model", "clip")):
                for consumer, key in list(_consumers(g, nid, slot)):
                    if name not in node["inputs"]:
                        raise ValueError(f"its {node['class_type']} gets its {name} from no node this conversion keeps")
                    consumer["inputs"][key] = node["inputs"][name]
            del g[nid]
    g = to_tiny(g, variant)
    size = {"width": 64, "height": 64, "length": 9}
    for node in list(g.values()):  # every video size gets the twin's, also where primitive nodes give it
        for k, v in size.items():
            value = node["inputs"].get(k)
            if isinstance(value, list):
                for nid in _primitives(g, value):
                    g[nid]["inputs"]["value"] = v
            elif k in node["inputs"]:
                node["inputs"][k] = v
        if node["class_type"] in SAMPLERS and isinstance(node["inputs"].get("steps"), list):
            for nid in _primitives(g, node["inputs"]["steps"]):  # steps a switch picks (lightning LoRA or not)
                g[nid]["inputs"]["value"] = 3
    samplers = [nid for nid, n in g.items() if n["class_type"] in SAMPLERS]
    for nid in samplers:
        g[f"{nid}_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [nid, 0],
                                                                     "filename_prefix": f"{prefix}_{nid}"}}
    if not with_pack:
        return g
    # the sampler that ends the chain (whose output no other sampler takes): Save on it sees every step. Only the
    # samplers that chain feeds from are recorded (a template of several independent videos saves the last one)
    ends = [nid for nid in samplers if not any(c["class_type"] in SAMPLERS for c, _ in _consumers(g, nid, 0))]
    last = max(ends or samplers, key=int)
    chain = [nid for nid in samplers if nid == last or nid in _ancestors(g, last)]
    attached: Dict[str, list] = {}
    first = None
    for nid in sorted(chain, key=int):
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
        holder["inputs"]["model"] = attached[key]
    g["opts"] = {"class_type": "WanRecordingOptions", "inputs": {"text_positions": "0,5", "storage_dtype": "float32",
                                                                 "store_per_head": True}}
    g["save"] = {"class_type": "WanSaveAttention", "inputs": {"recorder": [first, 1], "samples": [last, 0],
                                                              "batch_name": prefix}}
    return g
