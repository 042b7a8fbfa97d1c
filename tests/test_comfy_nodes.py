"""The node surfaces: read from the schemas (tooltips, sizes, one home per setting) and exercised (every input of a
view node changes what it draws, in every mode; API prompts with only the essential inputs; retired 0.1.0 nodes)."""
import importlib
import json
import os

import pytest
import torch

from api_util import error_of, run_prompt
from comfy_harness import (empty_latent, ksampler, load_comfy, load_model, needs_comfy, recording_options, tiny_clip,
                           tiny_spiece_model, tiny_wan_checkpoint)
from devtools.tiny_workflow import to_tiny

pytestmark = needs_comfy
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONNECTIONS = {"model", "clip", "recorder", "samples", "images", "token_tracking", "negative_tracking", "options",
               "share_recorder", "style", "reference_mask"}


@pytest.fixture(scope="module")
def pack():
    return load_comfy()


def pack_nodes(pack):
    import asyncio
    ext = importlib.import_module(f"{pack.__name__}.nodes.extension")
    return asyncio.run(asyncio.run(ext.comfy_entrypoint()).get_node_list())


def test_every_input_has_a_tooltip_no_node_over_12_and_one_home_per_setting(pack):
    nodes = pack_nodes(pack)
    schemas = {n.GET_SCHEMA().node_id: n.GET_SCHEMA() for n in nodes}
    assert {"WanAttachRecorder", "WanRecordingOptions", "WanSaveAttention", "WanLoadAttentionMaps",
            "WanAttentionOverlay", "WanAttentionStatisticOverlay", "WanAttentionGrid", "WanAttentionMatrix",
            "WanHeatmapStyle", "WanAttentionMask", "WanWeightedTokenTracker"} <= set(schemas)
    homes = {}
    for nid, schema in schemas.items():
        assert len(schema.inputs) <= 12, (nid, len(schema.inputs))
        for inp in schema.inputs:
            assert getattr(inp, "tooltip", None), f"{nid}.{inp.id} has no tooltip"
            homes.setdefault(inp.id, set()).add(nid)
    readers = {nid for nid, s in schemas.items() if any(i.id == "recorder" for i in s.inputs)}
    recording = {"WanAttachRecorder", "WanRecordingOptions"}
    for name, where in homes.items():
        if len(where) < 2 or name in CONNECTIONS:
            continue
        # what to show (steps, blocks, heads, branch...) is chosen on each node that draws a recording; what to
        # record is chosen once, on the Attach node or its options, and saving takes the recording as it is
        assert where - recording <= readers - {"WanSaveAttention"}, (name, where)
        assert len(where & recording) <= 1, (name, where)
    for moved in ("storage_dtype", "spatial_downsample_factor", "store_per_head", "store_per_block"):
        assert homes[moved] == {"WanRecordingOptions"}, (moved, homes[moved])
    assert "storage_interval" not in homes  # 'every N' in Attach's steps: one way to say it
    assert not any(s.inputs for nid, s in schemas.items() if s.is_deprecated)  # retired: nothing to fill in


def test_node_defaults_are_the_cores(pack):
    from wan_capture import RecordingPlan
    from wan_capture.views.render import HeatmapStyle
    opts = recording_options(pack)
    plan = RecordingPlan(record_cross=False, record_sink_stats=True)
    for name in ("store_per_block", "store_per_head", "storage_dtype", "spatial_downsample_factor", "branch",
                 "memory_budget_mb", "chunk_budget_mb", "window", "heads"):
        assert opts[name] == getattr(plan, name), name
    # image context: the node's default is "where the model has it", decided at Attach (image_context_default)
    assert opts["record_image_context"] is True and plan.record_image_context is False
    style = importlib.import_module(f"{pack.__name__}.nodes.view_nodes").HeatmapStyleNode.execute().args[0]
    assert vars(style) == vars(HeatmapStyle())  # the pack's copy of the core is another module object


@pytest.fixture(scope="module")
def scene(tmp_path_factory, pack):
    """Two videos, both branches with each prompt's words, per-head maps, sink statistics and an exact window."""
    import nodes
    tmp = tmp_path_factory.mktemp("modes")
    mod = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    clip = tiny_clip(tiny_spiece_model(), str(tmp))
    tracker = mod("tracker_node").WeightedTokenTracker
    spec, prompt, _ = tracker.execute(clip=clip, text="a beautiful (flower:2.5) near a (tree:1.5)").args[:3]
    negative, neg_prompt, _ = tracker.execute(clip=clip, text="a (dark:1.3) (river:1.2)").args[:3]
    opts = recording_options(pack, branch="both", store_per_head=True, window_query_frames="1")
    model, rec = mod("attach_node").AttachAttentionRecorder.execute(
        model=load_model(tiny_wan_checkpoint(str(tmp / "t2v.safetensors"))), token_tracking=spec,
        negative_tracking=negative, options=opts, record="cross attention + sink statistics").args
    pos, neg = nodes.CLIPTextEncode().encode(clip, prompt)[0], nodes.CLIPTextEncode().encode(clip, neg_prompt)[0]
    latent = ksampler(model, pos, neg, empty_latent("t2v", batch=2))
    views = mod("view_nodes")
    gray = views.HeatmapStyleNode.execute(colormap="gray").args[0]
    return dict(rec=rec, latent=latent, views=views, gray=gray, mask=mod("mask_node").AttentionMask)


def test_every_input_of_a_view_node_applies_in_every_mode(scene):
    """Each widget changed from its default changes the picture, in each of the node's modes (image share needs an
    i2v recording: tests/test_comfy_contexts.py draws it)."""
    v = scene["views"]
    frames = torch.rand(9, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    other = {"token": "tree", "tokens": "tree", "steps": "0", "step_mode": "each", "blocks": "1", "heads": "1",
             "branch": "uncond", "batch_index": 1, "alpha": 0.2, "frame": 0, "style": scene["gray"], "images": frames}
    modes = [(v.AttentionOverlay, {}), (v.AttentionStatisticOverlay, {"statistic": "attention received (sinks)"}),
             (v.AttentionGrid, {"rows": "words"}), (v.AttentionGrid, {"rows": "blocks"}),
             (v.AttentionMatrix, {"matrix": "window scores"}), (v.AttentionMatrix, {"matrix": "window probabilities"}),
             (v.AttentionMatrix, {"matrix": "frame x frame mass"})]
    for cls, mode in modes:
        node = cls.PREPARE_CLASS_CLONE({})
        base_kw = dict(recorder=scene["rec"], samples=scene["latent"], **mode)
        inputs = [i.id for i in cls.GET_SCHEMA().inputs if i.id not in ("recorder", "samples") and i.id not in mode]
        if "alpha" in inputs:
            base_kw["images"] = frames  # opacity applies over decoded frames
            inputs.remove("images")
        base = node.execute(**base_kw).args[0]
        for name in inputs:
            changed = node.execute(**{**base_kw, name: other[name]}).args[0]
            assert changed.shape != base.shape or not torch.equal(changed, base), (cls.__name__, mode, name)


def test_api_prompt_with_only_essential_inputs_runs_and_retired_nodes_say_what_changed(comfy_server):
    prompt = {
        "1": {"class_type": "TinyWanModels", "inputs": {"variant": "t2v", "blocks": 2, "seed": 0}},
        "2": {"class_type": "WanWeightedTokenTracker", "inputs": {"clip": ["1", 1], "text": "a (flower:2.0) grows"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "WanAttachRecorder", "inputs": {"model": ["1", 0], "token_tracking": ["2", 0]}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                  "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 1, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0],
                                                   "negative": ["4", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "WanSaveAttention", "inputs": {"recorder": ["5", 1], "samples": ["7", 0]}},
        "9": {"class_type": "WanAttentionOverlay", "inputs": {"recorder": ["5", 1], "samples": ["7", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        "11": {"class_type": "WanAttentionMask", "inputs": {"recorder": ["5", 1], "samples": ["7", 0]}},
    }
    entry = run_prompt(comfy_server.url, prompt)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    saved = entry["outputs"]["8"]["attention_maps"][0]
    assert saved["status"] == "complete" and any("token_flower/step_001.npy" in f for f in saved["files"])
    assert entry["outputs"]["10"]["images"]
    old = {"1": prompt["1"], "2": {"class_type": "WanAttentionHeatmap",
                                   "inputs": {"view": "token overlay", "tokens": "", "steps": "all"}},
           "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    entry = run_prompt(comfy_server.url, old)
    message = error_of(entry)
    assert entry["status"]["status_str"] == "error" and "replaced in 0.2.0" in message
    assert "Attention Heatmap" in message and "Attention Matrix" in message


def test_api_twins_spell_out_only_what_differs_from_the_defaults(pack):
    schemas = {n.GET_SCHEMA().node_id: n.GET_SCHEMA() for n in pack_nodes(pack)}
    for name in os.listdir(os.path.join(ROOT, "example_workflows", "api")):
        api = json.load(open(os.path.join(ROOT, "example_workflows", "api", name)))
        for nid, n in api.items():
            schema = schemas.get(n["class_type"])
            if schema is None:
                continue
            defaults = {i.id: getattr(i, "default", None) for i in schema.inputs}
            for key, value in n["inputs"].items():
                assert isinstance(value, list) or value != defaults[key], (name, nid, key)
    assert to_tiny  # the twins run end to end in tests/test_examples.py


def test_bounded_replies_load_fingerprint_stays_in_the_output_folder(pack, tmp_path, monkeypatch):
    """The Load node's cache fingerprint listed and stat'ed any folder it was given (``../../etc``): it now looks only
    inside ComfyUI's output folder (what ``execute`` reads), and at most FINGERPRINT_ENTRIES entries of it."""
    import folder_paths
    node = importlib.import_module(f"{pack.__name__}.nodes.source_node")
    out = tmp_path / "output"
    (out / "b" / "attention_maps" / "v1").mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(out))
    inside = node.LoadAttentionMaps.fingerprint_inputs("b/attention_maps", video_id="")
    assert len(inside) == 5 and inside[-1] == 1, inside  # the folder and its one video were looked at
    (out / "b" / "attention_maps" / "v2").mkdir()
    assert node.LoadAttentionMaps.fingerprint_inputs("b/attention_maps", video_id="") != inside
    seen = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: seen.append(p) or real_scandir(p))
    for outside in ("../../../../etc", "/etc", "b/../../.."):
        assert node.LoadAttentionMaps.fingerprint_inputs(outside, video_id="") == (outside, ""), outside
    assert seen == [], seen
