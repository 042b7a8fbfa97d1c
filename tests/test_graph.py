"""The graph users build: the design card's node names, image context by default where the model has it, pictures
the size of the video with legends readable at any width, decoded frames that must match the recording."""
import importlib
import json
import os

import numpy as np
import pytest
import torch

from comfy_harness import (conditioning, empty_latent, ksampler, load_comfy, load_model, needs_comfy,
                           recording_options, tiny_vae, tiny_wan_checkpoint)
from wan_capture.views.render import LEGEND_TEXT, MIN_TEXT, legend, legend_layout, text_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def node(pack, module, name):
    return getattr(importlib.import_module(f"{pack.__name__}.nodes.{module}"), name)


def recorded_t2v(tmp_path):
    """A tiny t2v sampling recorded by the Attach node: the pack, its recorder, the LATENT and the decoded frames."""
    pack = load_comfy()
    import folder_paths
    folder_paths.set_output_directory(str(tmp_path / "output"))
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    model, rec = node(pack, "attach_node", "AttachAttentionRecorder").execute(
        model=base, options=recording_options(pack, text_positions="1,3")).args
    out = ksampler(model, conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v"))
    with torch.no_grad():
        images = tiny_vae("t2v").decode(out["samples"])
    return pack, rec, out, images.reshape(-1, *images.shape[-3:])


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.000123, 0.0456), (-12345.6, 98765.4)])
def test_legend_size_labels_never_overlap_at_any_width(lo, hi):
    for width in (24, 32, 48, 64, 96, 160, 416, 832):
        layout = legend_layout(width, lo, hi)
        size = layout["size"]
        lo_w = text_size(f"{lo:.3g}" if abs(lo) >= 1e-3 or lo == 0 else f"{lo:.2e}", size)[0]
        if layout["lines"] == 1:  # side by side: the low label ends before the high one starts
            assert layout["lo"][0] + lo_w < layout["hi"][0], (width, layout)
        else:
            assert layout["hi"][1] > 0
        assert MIN_TEXT <= size <= LEGEND_TEXT
        strip = legend(width, lo, hi, "inferno")
        assert strip.shape[1] == width and strip.shape[0] >= 6 + layout["lines"] * MIN_TEXT


@needs_comfy
def test_legend_size_the_heatmap_is_the_size_of_the_video_by_default(tmp_path):
    pack, rec, out, images = recorded_t2v(tmp_path)
    heatmap = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    plain = heatmap.execute(recorder=rec, samples=out, images=images, token="pos001").args[0]
    assert tuple(plain.shape) == tuple(images.shape)  # frames, height, width, 3: blend or set beside as they are
    style = node(pack, "view_nodes", "HeatmapStyleNode").execute(legend=True).args[0]
    legended = heatmap.execute(recorder=rec, samples=out, images=images, token="pos001", style=style).args[0]
    assert legended.shape[0] == images.shape[0] and legended.shape[1] > images.shape[1]  # the option adds rows


@needs_comfy
def test_heatmap_node_the_four_names_exist_in_real_comfyui_and_the_heatmap_renders(comfy_server):
    from api_util import get, run_prompt
    from devtools.tiny_workflow import to_tiny
    info = get(comfy_server.url + "/object_info")
    names = {v["display_name"] for v in info.values()}
    assert {"Attach Attention Recorder", "Weighted Token Tracker", "Save Attention Maps",
            "Attention Heatmap"} <= names
    assert info["WanAttentionOverlay"]["display_name"] == "Attention Heatmap"
    assert info["WanAttentionHeatmap"]["display_name"] == "Attention Heatmap (0.1.0)"  # retired id still loads
    api = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")))
    api["20"]["inputs"]["batch_name"] = "heatmap_node"
    entry = run_prompt(comfy_server.url, to_tiny(api))
    assert entry["status"]["status_str"] == "success", entry["status"]
    heat = [n for n, v in api.items() if v["class_type"] == "WanAttentionOverlay"][0]
    shown = entry["outputs"][heat]["images"]
    assert shown and all(i["type"] == "temp" for i in shown)


@needs_comfy
def test_image_context_default_on_where_the_model_has_it(tmp_path):
    pack = load_comfy()
    import folder_paths
    folder_paths.set_output_directory(str(tmp_path / "output"))
    attach = node(pack, "attach_node", "AttachAttentionRecorder")
    i2v = load_model(tiny_wan_checkpoint(str(tmp_path / "i2v.safetensors"), "i2v"))
    model, rec = attach.execute(model=i2v, options=None, record="sink statistics").args
    assert rec.plan.record_image_context  # no options node: on, since the model has image context
    ksampler(model, conditioning("i2v", 1), conditioning("i2v", 2), empty_latent("i2v"))
    assert rec.latest.image and {"share", "received"} <= set(next(iter(rec.latest.image.values())))
    off = recording_options(pack, image_context=False)
    assert not attach.execute(model=i2v, options=off, record="sink statistics").args[1].plan.record_image_context
    t2v = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    out = attach.execute(model=t2v, options=None, record="sink statistics")
    assert not out.args[1].plan.record_image_context and not (out.ui or {}).get("text")
    out = attach.execute(model=t2v, options=recording_options(pack, image_context=True), record="sink statistics")
    assert not out.args[1].plan.record_image_context and not (out.ui or {}).get("text")  # nothing to say: none to record
    both = attach.execute(model=t2v, options=recording_options(pack, text_positions="1"), record="both").args[1]
    assert both.plan.record_cross and both.plan.record_sink_stats  # the README's word for both


@needs_comfy
def test_frames_mismatch_save_refuses_frames_of_another_video(tmp_path):
    pack, rec, out, images = recorded_t2v(tmp_path)
    assert images.shape[0] == 9
    save = node(pack, "save_node", "SaveAttentionMaps").PREPARE_CLASS_CLONE({})
    heatmap = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    for bad, why in ((images[:7], "time mismatch: 7 frames"),
                     (torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), scale_factor=2).permute(0, 2, 3, 1),
                      "are 128x128 pixels, but this recording's video is 64x64")):
        with pytest.raises(ValueError, match=why):
            save.execute(recorder=rec, samples=out, images=bad, batch_name="mismatch")
    with pytest.raises(ValueError, match="time mismatch: 7 frames"):  # the heatmap says the same
        heatmap.execute(recorder=rec, samples=out, images=images[:7], token="pos001")
    assert not (tmp_path / "output" / "mismatch").exists()  # refused before anything was written
    saved = save.execute(recorder=rec, samples=out, images=images, batch_name="mismatch").args[0]
    assert saved == "mismatch/attention_maps"


@needs_comfy
def test_trim_latent_vace_save_and_views_from_trimvideolatent_equal_the_samplers(tmp_path):
    """VACE users wire Save and the views as VAE Decode is wired, from TrimVideoLatent: the same recording, the same
    files and pictures, time-aligned (the reference frame left out)."""
    pack = load_comfy()
    import folder_paths
    from devtools.tiny_comfy import core_nodes
    TrimVideoLatent, WanVaceToVideo = core_nodes("nodes_wan").TrimVideoLatent, core_nodes("nodes_wan").WanVaceToVideo
    folder_paths.set_output_directory(str(tmp_path / "output"))
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "vace.safetensors"), "vace"))
    vae = tiny_vae("t2v")
    reference = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    pos, neg, latent, trim = WanVaceToVideo.execute(conditioning("t2v", 1), conditioning("t2v", 2), vae, 64, 64, 9, 1,
                                                    1.0, reference_image=reference).args
    model, rec = node(pack, "attach_node", "AttachAttentionRecorder").execute(
        model=base, options=recording_options(pack, text_positions="0,3", storage_dtype="float32")).args
    out = ksampler(model, pos, neg, latent)
    trimmed = TrimVideoLatent.execute(out, trim).args[0]
    with torch.no_grad():
        images = vae.decode(trimmed["samples"])
    images = images.reshape(-1, *images.shape[-3:])
    heatmap = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    a = heatmap.execute(recorder=rec, samples=out, images=images, token="pos000").args[0]
    b = heatmap.execute(recorder=rec, samples=trimmed, images=images, token="pos000").args[0]
    assert a.shape[0] == 9 and torch.equal(a, b)
    save = node(pack, "save_node", "SaveAttentionMaps").PREPARE_CLASS_CLONE({})
    for name, latent_in in (("from_sampler", out), ("from_trim", trimmed)):
        save.execute(recorder=rec, samples=latent_in, images=images, batch_name=name)
    one = tmp_path / "output" / "from_sampler" / "attention_maps" / "prompt_000_vid001"
    two = tmp_path / "output" / "from_trim" / "attention_maps" / "prompt_000_vid001"
    arrays = sorted(p.relative_to(one) for p in one.rglob("*.npy"))
    assert arrays and arrays == sorted(p.relative_to(two) for p in two.rglob("*.npy"))
    assert all((one / p).read_bytes() == (two / p).read_bytes() for p in arrays)
    with pytest.raises(ValueError, match="SamplerCustom's 'output' or 'denoised_output'; VACE: the sampler's"):
        heatmap.execute(recorder=rec, samples={"samples": trimmed["samples"] + 1}, token="pos000")


@needs_comfy
def test_trim_latent_first_a14b_sampler_gives_the_recording_up_to_it(tmp_path):
    from comfy_harness import ksampler_advanced
    pack = load_comfy()
    import folder_paths
    folder_paths.set_output_directory(str(tmp_path / "output"))
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    pos, neg = conditioning("t2v", 1), conditioning("t2v", 2)
    high, rec = node(pack, "attach_node", "AttachAttentionRecorder").execute(
        model=base, options=recording_options(pack, text_positions="2")).args
    low = pack.nodes.comfy_attach.attach_recorder(base.clone(), rec)
    first = ksampler_advanced(high, pos, neg, empty_latent("t2v"), 0, 2, 4, leftover=True)
    second = ksampler_advanced(low, pos, neg, first, 2, 10000, 4, leftover=False, add_noise=False)
    take_for_latent = importlib.import_module(pack.__name__ + ".nodes.recording").take_for_latent
    whole, upto = take_for_latent(rec, second), take_for_latent(rec, first)
    assert whole.steps == [0, 1, 2, 3] and upto.steps == [0, 1]
    assert all(torch.equal(upto.cross[k], whole.cross[k]) for k in upto.cross)


@needs_comfy
def test_frames_mismatch_reference_mask_of_another_size_is_said_plainly(tmp_path):
    pack, rec, out, _ = recorded_t2v(tmp_path)
    mask_node = node(pack, "mask_node", "AttentionMask")
    mask, iou, _ = mask_node.execute(recorder=rec, samples=out, token="pos001", method="top_percent", value=30.0).args
    assert mask_node.execute(recorder=rec, samples=out, token="pos001", method="top_percent", value=30.0,
                             reference_mask=mask).args[1] == 1.0
    with pytest.raises(ValueError, match=r"reference MASK is 1 frame\(s\) of 32x32, the attention mask 9 frames of "
                                         r"64x64: give a mask of the decoded video's size"):
        mask_node.execute(recorder=rec, samples=out, token="pos001", method="top_percent", value=30.0,
                          reference_mask=torch.ones(1, 32, 32))


@needs_comfy
def test_negative_one_step_maps_equal_float64_and_a_mismatched_text_is_refused(tmp_path):
    """One tracker takes both prompts and encodes both: connected to Attach and the sampler, the uncond rows' maps are
    the negative prompt's words, equal to float64 from the q/k the model's own calls carried. A sampler fed another
    negative text is refused before anything is recorded, never saved under the wrong words."""
    from comfy_harness import capture_override, tiny_clip, tiny_spiece_model
    from reference import naive_probs, naive_scores
    pack = load_comfy()  # first: ComfyUI's nodes module, not this pack's nodes package
    import folder_paths
    import nodes
    folder_paths.set_output_directory(str(tmp_path / "output"))
    clip = tiny_clip(tiny_spiece_model(), str(tmp_path))
    spec, prompt, _, positive, negative = node(pack, "tracker_node", "WeightedTokenTracker").execute(
        clip=clip, text="a beautiful (flower:2.5) near a tree",
        negative_text="the (snow:1.4) falls on a dark (river:1.3) mill").args
    assert spec.negative is not None and [w.label for w in spec.negative.words] == ["snow", "river"]
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    plain = ksampler(base, positive, negative, empty_latent("t2v"))
    spy, calls = capture_override(base)
    attach = node(pack, "attach_node", "AttachAttentionRecorder")
    model, rec = attach.execute(model=spy, token_tracking=spec,
                                options=recording_options(pack, storage_dtype="float32", store_per_head=True)).args
    assert rec.plan.branch == "both"  # the branch follows from what is connected
    out = ksampler(model, positive, negative, empty_latent("t2v"))
    assert torch.equal(out["samples"], plain["samples"]), "recording changed the sampled latent"
    take = rec.latest
    words = spec.negative
    for i, (q, k, heads, order) in enumerate(c for j, c in enumerate(calls) if j % 2 == 1):  # self, cross per block
        step, block = i // 2, i % 2
        r = order.index(1)  # ComfyUI: 1 = uncond
        hq = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)[r:r + 1]
        hk = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)[r:r + 1]
        probs = naive_probs(naive_scores(hq, hk)[0])[0]
        got = take.cross[(step, "uncond")][0, block]
        for w in words.words:
            torch.testing.assert_close(got[..., words.columns(w)].double(), probs[..., list(w.positions)],
                                       rtol=1e-4, atol=1e-6)
    heatmap = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    assert heatmap.execute(recorder=rec, samples=out, branch="uncond", token="snow").args[0].shape[0] == 9
    other = nodes.CLIPTextEncode().encode(clip, "blurry, low quality")[0]
    model, rec = attach.execute(model=base, token_tracking=spec).args
    with pytest.raises(ValueError, match="uncond rows attend to another text than the negative prompt the Weighted "
                                         "Token Tracker encoded .* Connect the tracker's 'negative' output"):
        ksampler(model, positive, other, empty_latent("t2v"))
    assert not rec.latest.store.arrays  # refused before anything was recorded
    with pytest.raises(ValueError, match="cond rows attend to another text .* tracker's 'positive' output"):
        ksampler(model, other, negative, empty_latent("t2v"))


@needs_comfy
def test_negative_one_step_contexts_repeated_to_a_common_length_still_match():
    """ComfyUI batches contexts of other lengths by repeating each to a common length: a tracker's encoding repeated
    so is the same text, another text is not."""
    from types import SimpleNamespace
    pack = load_comfy()
    check = importlib.import_module(pack.__name__ + ".nodes.comfy_attach").check_contexts
    enc = {"cond": torch.randn(1, 3, 4), "uncond": torch.randn(1, 2, 4)}
    take = SimpleNamespace(id=1, log=SimpleNamespace(passes=[0]))
    state = SimpleNamespace(recorder=SimpleNamespace(plan=SimpleNamespace(extra={"encoded": enc}), active=take))
    context = torch.stack([enc["uncond"][0].repeat(3, 1), enc["cond"][0].repeat(2, 1)])  # lcm(3, 2) = 6 tokens
    check(state, context, ("uncond", "cond"))
    state.checked = None
    context[1, 5, 0] += 1
    with pytest.raises(ValueError, match="cond rows attend to another text"):
        check(state, context, ("uncond", "cond"))


@needs_comfy
def test_trim_latent_samplercustom_denoised_output_finds_the_recording(tmp_path):
    """SamplerCustom's ``denoised_output`` (the last step's x0) names the same recording as its ``output``: the same
    pictures from either."""
    pack = load_comfy()
    import folder_paths
    from devtools.tiny_comfy import core_nodes
    cs = core_nodes("nodes_custom_sampler")
    BasicScheduler, KSamplerSelect, SamplerCustom = cs.BasicScheduler, cs.KSamplerSelect, cs.SamplerCustom
    folder_paths.set_output_directory(str(tmp_path / "output"))
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    model, rec = node(pack, "attach_node", "AttachAttentionRecorder").execute(
        model=base, options=recording_options(pack, text_positions="1,3", storage_dtype="float32")).args
    sampler = KSamplerSelect().get_sampler("euler")[0]
    sigmas = BasicScheduler().get_sigmas(model, "simple", 3, 1.0)[0]
    out, denoised = SamplerCustom().sample(model, True, 1, 3.0, conditioning("t2v", 1), conditioning("t2v", 2),
                                           sampler, sigmas, empty_latent("t2v"))
    assert not torch.equal(out["samples"], denoised["samples"])  # two different LATENTs
    view = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    a = view.execute(recorder=rec, samples=out, token="pos001").args[0]
    b = view.execute(recorder=rec, samples=denoised, token="pos001").args[0]
    assert torch.equal(a, b) and a.abs().sum() > 0


@needs_comfy
def test_frames_mismatch_save_progress_says_files_not_steps(tmp_path, monkeypatch):
    """Save's progress under the node reads "writing files k/N" (ComfyUI's bar alone shows "step k/N")."""
    pack, rec, out, images = recorded_t2v(tmp_path)
    import server
    sent = []
    monkeypatch.setattr(server.PromptServer, "instance",
                        type("S", (), {"send_progress_text": lambda self, text, nid: sent.append((text, nid))})(),
                        raising=False)
    save = node(pack, "save_node", "SaveAttentionMaps")
    try:  # the V3 API's hidden inputs: upstream takes them as they are, hiddenswitch under "hidden_inputs"
        cls = save.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": "7"}})
        if cls.hidden.unique_id != "7":
            raise KeyError("hidden_inputs")
    except (KeyError, AttributeError):
        cls = save.PREPARE_CLASS_CLONE({"UNIQUE_ID": "7"})
    cls.execute(recorder=rec, samples=out, images=images, batch_name="progress")
    files = [p for p in (tmp_path / "output" / "progress").rglob("*") if p.is_file()]
    assert sent and all(nid == "7" and text.startswith("writing files ") for text, nid in sent)
    done, total = map(int, sent[-1][0].split()[-1].split("/"))
    # every file counted once, the summary twice (written first marked partial, then complete)
    assert done == total == len(files) + 1


@needs_comfy
def test_key_max_off_chosen_on_the_attach_node(tmp_path):
    """The cheaper sink statistics are one choice of the Attach node's record: no key max is recorded."""
    pack, _, _, _ = recorded_t2v(tmp_path)
    build_plan = importlib.import_module(pack.__name__ + ".nodes.attach_node").build_plan
    plan = build_plan("sink statistics, no key max", "all", "all")
    assert plan.record_sink_stats and not plan.record_key_max and not plan.record_cross
    assert build_plan("sink statistics", "all", "all").record_key_max
