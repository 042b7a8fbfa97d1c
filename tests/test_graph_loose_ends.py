"""Loose ends of the graph, through real prompts on a ComfyUI server (tiny models): listed negative words tracked in
the one-tracker wiring (N1), tooltips and messages of that wiring (N2), Save on the first A14B expert's LATENT (N3),
image context on a t2v graph with an Options node (N4), the negative prompt encoded only where needed (N5)."""
import copy
import itertools
import os

import numpy as np

from api_util import error_of, get, run_prompt
from comfy_harness import needs_comfy

pytestmark = needs_comfy
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NONCE = itertools.count(1)


def example(name: str, variant: str = "t2v") -> dict:
    from devtools.tiny_workflow import tiny_example
    return tiny_example(name, variant)


def ui_texts(entry, nid: str) -> list:
    return entry["outputs"].get(nid, {}).get("text", [])


def saved_video(server, entry):
    from attention_analyzer import AttentionAnalyzer
    saved = [r for o in entry["outputs"].values() for r in o.get("attention_maps", [])]
    assert saved and saved[0]["status"] == "complete", saved
    folder = server.output / saved[0]["subfolder"]
    an = AttentionAnalyzer(str(folder.parent))
    return an, folder.name


def test_graph_loose_ends_listed_negative_words_are_tracked_for_the_uncond_rows(comfy_server):
    g = example("wan21_t2v_attention.json")
    g["4"]["inputs"].update(text="a static (flower:2.5) near a tree", negative_text="blurry, static, low quality",
                            mode="both", words="tree, blurry, static")
    g["20"]["inputs"]["batch_name"] = "loose_n1"
    entry = run_prompt(comfy_server.url, g)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    said = " ".join(ui_texts(entry, "4"))
    assert "in both prompts: static" in said and "negative: " in said, said
    an, video = saved_video(comfy_server, entry)
    assert set(an.list_tokens(video)) == {"flower", "tree", "static"}
    assert set(an.list_tokens(video, "uncond")) == {"blurry", "static"}
    summary = an.summary(video)
    negative = {w["label"]: w["positions"] for w in summary["negative_tokens"]}
    words = {w["label"]: w["positions"] for w in summary["tokens"]}
    assert negative["static"] != words["static"]  # each prompt's own positions
    for label in ("blurry", "static"):
        maps = an.load_all_steps(video, label, "uncond")  # [steps, blocks, heads, spatial, pieces]
        assert maps.shape[0] == 3 and np.isfinite(maps).all() and (maps >= 0).all() and (maps <= 1).all()
    # a listed word in neither prompt: refused, naming both
    g2 = copy.deepcopy(g)
    g2["4"]["inputs"]["words"] = "kite"
    entry = run_prompt(comfy_server.url, g2)
    assert entry["status"]["status_str"] == "error"
    assert "'kite' is in neither the prompt" in error_of(entry) and "negative prompt" in error_of(entry)


def test_graph_loose_ends_listed_chinese_negative_word_at_the_node(tmp_path):
    """The official workflows' case: an unweighted Chinese negative prompt, a listed word of it (with a tokenizer
    that knows Chinese)."""
    from test_comfy_contexts import mixed_spiece, node
    from comfy_harness import load_comfy, tiny_clip
    pack = load_comfy()
    clip = tiny_clip(mixed_spiece(), str(tmp_path))
    tracker = node(pack, "tracker_node", "WeightedTokenTracker")
    out = tracker.execute(clip=clip, text="一朵美丽的红花在树旁", mode="listed", words="红花, 过曝",
                          negative_text="色调艳丽，过曝，静态，细节模糊不清")
    tracking = out.args[0]
    assert [w.label for w in tracking.words] == ["红花"]
    assert [w.label for w in tracking.negative.words] == ["过曝"]
    ids = [t[0] for t in clip.tokenize("色调艳丽，过曝，静态，细节模糊不清", return_word_ids=True)["umt5xxl"][0]]
    assert list(tracking.negative.words[0].token_ids) == [ids[p] for p in tracking.negative.words[0].positions]


def test_graph_loose_ends_tooltips_and_messages_describe_the_one_tracker_wiring(comfy_server):
    info = get(comfy_server.url + "/object_info")
    tracker = info["WanWeightedTokenTracker"]["input"]
    attach = info["WanAttachRecorder"]["input"]["optional"]
    options = info["WanRecordingOptions"]["input"]["optional"]
    assert "connect the 'prompt' output" not in tracker["required"]["text"][1]["tooltip"]
    assert "'positive' output" in tracker["required"]["text"][1]["tooltip"]
    assert "Older wiring only" in attach["negative_tracking"][1]["tooltip"]
    assert "negative_text" in attach["token_tracking"][1]["tooltip"]
    assert "negative_tracking" not in options["branch"][1]["tooltip"] and "negative_text" in options["branch"][1]["tooltip"]
    # uncond maps asked for without negative words: the message names the tracker's negative_text
    g = example("wan21_t2v_attention.json")
    g["4"]["inputs"]["negative_text"] = ""
    g["30"] = {"class_type": "WanRecordingOptions", "inputs": {"branch": "uncond"}}
    g["7"]["inputs"]["options"] = ["30", 0]
    g["9"]["inputs"]["negative"] = ["31", 0]
    g["31"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 3]}}
    entry = run_prompt(comfy_server.url, g)
    assert entry["status"]["status_str"] == "error"
    assert "'negative_text'" in error_of(entry) and "negative_tracking" not in error_of(entry), error_of(entry)


def test_graph_loose_ends_save_on_the_first_expert_names_it(comfy_server):
    g = example("wan22_a14b_two_experts_attention.json")
    # a second Save on the high-noise expert's LATENT (it may run before the second expert's Attach node)
    g["25"] = {"class_type": "WanSaveAttention", "inputs": {"recorder": ["7", 1], "samples": ["9", 0],
                                                            "batch_name": "loose_n3"}}
    del g["20"]
    entry = run_prompt(comfy_server.url, g)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    an, video = saved_video(comfy_server, entry)
    summary = an.summary(video)
    steps = summary["steps"]
    assert summary["experts"] == [{"expert": "high_noise", "steps": [steps[0], steps[-1]]}]
    assert summary["model_family"] == "wan2.2_a14b"
    label = an.list_tokens(video)[0]
    assert [an.load_metadata(video, label, s)["expert"] for s in steps] == ["high_noise"] * len(steps)
    # Save on the second expert's: both, as before
    g["25"]["inputs"].update(samples=["19", 0], batch_name="loose_n3b")
    g["4"]["inputs"]["text"] += " again"  # sampled anew
    entry = run_prompt(comfy_server.url, g)
    an, video = saved_video(comfy_server, entry)
    assert [e["expert"] for e in an.summary(video)["experts"]] == ["high_noise", "low_noise"]


def test_graph_loose_ends_image_context_is_silent_on_a_t2v_graph_with_options(comfy_server):
    g = example("wan21_t2v_attention.json")
    g["30"] = {"class_type": "WanRecordingOptions", "inputs": {}}  # every option at its default
    g["7"]["inputs"].update(options=["30", 0], record="cross attention + sink statistics")
    g["20"]["inputs"]["batch_name"] = "loose_n4"
    entry = run_prompt(comfy_server.url, g)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    assert not any("image_context" in t for o in entry["outputs"].values() for t in o.get("text", [])), entry["outputs"]
    an, video = saved_video(comfy_server, entry)
    assert an.list_image_context_steps(video) == [] and an.list_self_attention_steps(video) == [0, 1, 2]


def encoder_calls(url) -> int:
    entry = run_prompt(url, {"1": {"class_type": "TinyEncoderCalls", "inputs": {"nonce": next(NONCE)}}})
    return int(entry["outputs"]["1"]["text"][0])


def test_graph_loose_ends_negative_text_encoded_only_where_needed(comfy_server):
    def passes(negative_text: str, connected: bool) -> int:
        g = example("wan21_t2v_attention.json")
        g["4"]["inputs"].update(text=f"a (flower:2.5) near {next(NONCE)} trees", negative_text=negative_text)
        if not connected:
            g["9"]["inputs"]["negative"] = ["31", 0]
            g["31"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 3]}}
        before = encoder_calls(comfy_server.url)
        entry = run_prompt(comfy_server.url, g)
        assert entry["status"]["status_str"] == "success", error_of(entry)
        return encoder_calls(comfy_server.url) - before
    assert passes("", connected=False) == 1  # the positive prompt only
    assert passes("", connected=True) == 2  # the sampler needs the empty prompt's encoding
    assert passes("blurry, static", connected=True) == 2
