"""The shipped example workflows: UI files validate against the server's own node definitions; the API twins
run end to end with the tiny models."""
import json
import os

import pytest

from api_util import error_of, get, run_prompt
from devtools.tiny_workflow import to_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "example_workflows")
NAMES = sorted(f[:-5] for f in os.listdir(EXAMPLES) if f.endswith(".json"))
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_INPUTS = {"unet_name", "clip_name", "vae_name", "image"}  # model and image files the user provides


def test_every_example_has_an_api_twin():
    assert len(NAMES) == 4
    for name in NAMES:
        assert os.path.isfile(os.path.join(EXAMPLES, "api", f"{name}.json"))


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_node_definitions(comfy_server, name):
    info = get(comfy_server.url + "/object_info")
    wf = json.load(open(os.path.join(EXAMPLES, f"{name}.json")))
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == len(wf["links"])
    for n in wf["nodes"]:
        assert n["type"] in info, f"{n['type']} is not a node this server knows"
        spec = info[n["type"]]
        widgets = []
        for section in ("required", "optional"):
            for iname in spec["input_order"].get(section, []):
                t = spec["input"][section][iname]
                if isinstance(t[0], list) or t[0] in WIDGETS:
                    widgets.append((iname, t))
        expected = len(widgets) + sum(1 for _, t in widgets if len(t) > 1 and t[1].get("control_after_generate"))
        assert len(n["widgets_values"]) == expected, (n["type"], n["widgets_values"])
        linked = {i["name"] for i in n["inputs"] if i["link"] is not None}
        for iname in spec["input_order"].get("required", []):
            t = spec["input"]["required"][iname]
            if not (isinstance(t[0], list) or t[0] in WIDGETS):
                assert iname in linked, f"{n['type']}.{iname} is required and not connected"
        values = iter(n["widgets_values"])
        for iname, t in widgets:
            v = next(values)
            if len(t) > 1 and t[1].get("control_after_generate"):
                next(values)
            options = t[0] if isinstance(t[0], list) else (t[1].get("options") if t[0] == "COMBO" else None)
            if options is not None and iname not in linked and iname not in FILE_INPUTS:
                assert v in options, f"{n['type']}.{iname} = {v!r} not in {options}"
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out_type = info[nodes[src]["type"]]["output"][src_slot]
        assert out_type == kind and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_end_to_end_tiny(comfy_server, name):
    api = json.load(open(os.path.join(EXAMPLES, "api", f"{name}.json")))
    variant = "i2v" if "i2v" in name else "t2v"
    entry = run_prompt(comfy_server.url, to_tiny(api, variant))
    assert entry["status"]["status_str"] == "success", error_of(entry)
    saved = [r for out in entry["outputs"].values() for r in out.get("attention_maps", [])]
    assert saved and all(r["status"] == "complete" for r in saved)
    summary = json.load(open(comfy_server.output / saved[0]["subfolder"] / "summary.json"))
    assert summary["status"] == "complete" and summary["latent_grid"] == [3, 4, 4]
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images and all((comfy_server.output / i["subfolder"] / i["filename"]).stat().st_size > 0
                          for i in images if i["type"] == "output")
    if "a14b" in name:
        assert summary["total_steps"] == 3 and summary["steps"] == [0, 1, 2]
    if "sink" in name:
        assert summary["self_attention"] and summary["windows"] and summary["steps"] == [0]
