"""Save Attention Maps inside real ComfyUI: tracker -> recorder -> KSampler -> save -> AttentionAnalyzer."""
import importlib

import numpy as np
import pytest

from comfy_harness import (empty_latent, ksampler, load_comfy, load_model, needs_comfy, recording_options, tiny_clip,
                           tiny_spiece_model, tiny_wan_checkpoint)

pytestmark = needs_comfy


def test_save_node_writes_the_contract_and_reports_paths(tmp_path):
    pack = load_comfy()
    import folder_paths
    import nodes
    folder_paths.set_output_directory(str(tmp_path / "output"))
    mod = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    clip = tiny_clip(tiny_spiece_model(), str(tmp_path))
    model = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    spec, prompt, _ = mod("tracker_node").WeightedTokenTracker.execute(
        clip=clip, text="a [(flower:2.5) near a tree|(tree:3) next to a flower]", mode="weighted", words="",
        variation=1).args[:3]
    negative, neg_prompt, _ = mod("tracker_node").WeightedTokenTracker.execute(
        clip=clip, text="a dull (tree:1.2)", mode="weighted", words="", variation=0).args[:3]
    attach = mod("attach_node").AttachAttentionRecorder
    opts = recording_options(pack, store_per_head=True, branch="both", storage_dtype="float32")
    recorded, rec = attach.execute(model=model, token_tracking=spec, negative_tracking=negative, options=opts,
                                   record="cross attention + sink statistics").args
    pos, neg = nodes.CLIPTextEncode().encode(clip, prompt)[0], nodes.CLIPTextEncode().encode(clip, neg_prompt)[0]
    first = ksampler(recorded, pos, neg, empty_latent("t2v", batch=2), seed=3)
    second = ksampler(recorded, pos, neg, empty_latent("t2v"), seed=4)
    save = mod("save_node").SaveAttentionMaps.PREPARE_CLASS_CLONE({})
    out = save.execute(recorder=rec, samples=first, batch_name="study/../one")  # the rest at their defaults
    assert out.args[0] == "study_.._one/attention_maps"
    report = out.ui["attention_maps"]
    assert [v["video_id"] for v in report] == ["prompt_001_vid001", "prompt_001_vid002"]
    assert all(v["status"] == "complete" for v in report)
    assert "study_.._one/attention_maps/prompt_001_vid001/token_tree/step_002.npy" in report[0]["files"]
    assert "study_.._one/attention_maps/prompt_001_vid002/self_attention/step_000_received.npy" in report[1]["files"]
    from wan_capture import AttentionAnalyzer
    an = AttentionAnalyzer(str(tmp_path / "output" / out.args[0]))
    take = rec.find(pack.wan_capture.fingerprint(first["samples"]))
    assert an.list_tokens("prompt_001_vid002") == ["tree"]
    got = an.load_step("prompt_001_vid002", "tree", 2)
    np.testing.assert_array_equal(got, take.cross[(2, "cond")][1][..., spec.columns(spec.word("tree"))].numpy())
    meta = an.load_metadata("prompt_001_vid002", "tree", 2)
    assert meta["prompt"] == "a tree next to a flower" and meta["prompt_weighted"] == "a (tree:3) next to a flower"
    assert meta["seed"] == 3 and meta["cfg_scale"] == 3.0
    assert meta["token_texts"] == ["tree"] and meta["token_pieces"] == ["\u2581tree"]
    grid = meta["latent_grid"]  # the decoded video the latent stands for (Wan 2.1: 8x VAE, 1x2x2 patches)
    assert (meta["video_frames"], meta["video_height"], meta["video_width"]) == (
        4 * (grid[0] - 1) + 1, grid[1] * 16, grid[2] * 16)
    assert meta["token_weight"] == 3.0 and meta["model"]["model_type"] == "WAN21" and meta["branch"] == "cond"
    assert an.load_step("prompt_001_vid001", "tree", 0, branch="uncond").shape == (
        2, 2, 48, len(negative.word("tree").positions))
    neg_meta = an.load_metadata("prompt_001_vid001", "tree", 0, branch="uncond")
    assert neg_meta["prompt"] == "a dull tree" and neg_meta["token_positions"] == list(negative.word("tree").positions)
    # the other sampling's latent saves the other recording, never this one
    out2 = save.execute(recorder=rec, samples=second, batch_name="two", storage_format="torch", compress=True,
                        video_number=5, prompt_id="custom")
    an2 = AttentionAnalyzer(str(tmp_path / "output" / out2.args[0]))
    assert an2.list_videos() == ["custom_vid005"] and an2.list_steps("custom_vid005", "tree") == [0, 1, 2]
    assert (tmp_path / "output" / "two" / "attention_maps" / "custom_vid005" / "token_tree" / "step_001.pt.gz").is_file()
    assert an2.summary("custom_vid005")["seed"] == 4
    with pytest.raises(ValueError, match="no attention recording matches"):
        save.execute(recorder=rec, samples=empty_latent("t2v"), batch_name="x")


def test_no_overwrite_saving_twice_keeps_both_runs(tmp_path):
    """The Save node's default: a second run into the same batch keeps the first run's folder as it was and writes
    to a new, reported name; overwrite=True replaces the folder as a whole."""
    pack = load_comfy()
    import folder_paths
    import nodes
    folder_paths.set_output_directory(str(tmp_path / "output"))
    mod = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    model = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    attach = mod("attach_node").AttachAttentionRecorder
    recorded, rec = attach.execute(model=model, options=recording_options(pack, text_positions="1,2")).args
    from comfy_harness import conditioning
    runs = [ksampler(recorded, conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v"), seed=s)
            for s in (1, 2, 3)]
    save = mod("save_node").SaveAttentionMaps.PREPARE_CLASS_CLONE({})
    kw = dict(recorder=rec, batch_name="same")
    first = save.execute(samples=runs[0], **kw).ui["attention_maps"][0]
    second = save.execute(samples=runs[1], **kw).ui["attention_maps"][0]
    assert first["video_id"] == "prompt_000_vid001" and second["video_id"] == "prompt_000_vid001_2"
    from wan_capture import AttentionAnalyzer
    an = AttentionAnalyzer(str(tmp_path / "output" / "same" / "attention_maps"))
    assert an.list_videos() == ["prompt_000_vid001", "prompt_000_vid001_2"]
    assert [an.summary(v)["seed"] for v in an.list_videos()] == [1, 2]
    for report in (first, second):
        assert all((tmp_path / "output" / f).is_file() for f in report["files"])
    third = save.execute(samples=runs[2], overwrite=True, **kw).ui["attention_maps"][0]
    assert third["video_id"] == "prompt_000_vid001" and an.summary("prompt_000_vid001")["seed"] == 3
    assert an.summary("prompt_000_vid001_2")["seed"] == 2
