"""Attention Heatmap inside real ComfyUI: every view, from a recording and from saved maps, into SaveAnimatedWEBP."""
import importlib
import os

import pytest
import torch

from comfy_harness import (empty_latent, ksampler, load_comfy, load_model, needs_comfy, tiny_clip, tiny_spiece_model,
                           tiny_wan_checkpoint, widget_defaults)

pytestmark = needs_comfy


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heat")
    pack = load_comfy()
    import folder_paths
    import nodes
    folder_paths.set_output_directory(str(tmp / "output"))
    folder_paths.set_temp_directory(str(tmp / "temp"))
    mod = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    clip = tiny_clip(tiny_spiece_model(), str(tmp))
    model = load_model(tiny_wan_checkpoint(str(tmp / "t2v.safetensors")))
    spec, prompt, _ = mod("tracker_node").WeightedTokenTracker.execute(
        clip=clip, text="a beautiful (flower:2.5) near a (tree:1.5)", mode="weighted", words="", variation=0).args
    attach = mod("attach_node").AttachAttentionRecorder
    widgets = widget_defaults(attach, record_sink_stats=True, store_per_head=True, window_query_frames="1")
    recorded, rec = attach.execute(model=model, token_tracking=spec, **widgets).args
    pos, neg = nodes.CLIPTextEncode().encode(clip, prompt)[0], nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = ksampler(recorded, pos, neg, empty_latent("t2v"))
    save = mod("save_node").SaveAttentionMaps.PREPARE_CLASS_CLONE({})
    saved = save.execute(recorder=rec, samples=latent, batch_name="heat", storage_format="numpy", compress=False,
                         storage_interval=1, storage_dtype="float32", spatial_downsample_factor=1, video_number=1,
                         prompt_id="").args[0]
    node = mod("heatmap_node").AttentionHeatmap.PREPARE_CLASS_CLONE({})
    return dict(rec=rec, latent=latent, node=node, saved=saved, tmp=tmp)


def run_view(scene, view, **kw):
    args = dict(view=view, tokens="", steps="all", step_mode="mean", blocks="all", heads="all", branch="cond",
                frame=-1, batch_index=0, window_block=0, window_values="scores", colormap="inferno",
                normalize="per_video", vmin=0.0, vmax=1.0, percentile_low=1.0, percentile_high=99.0, alpha=0.5,
                legend=True, recorder=scene["rec"], samples=scene["latent"])
    args.update(kw)
    return scene["node"].execute(**args)


def test_token_overlay_over_decoded_frames_into_webp(scene):
    import nodes
    from comfy_extras.nodes_images import SaveAnimatedWEBP
    frames = torch.rand(9, 64, 64, 3)
    out = run_view(scene, "token overlay", images=frames, tokens="tree", legend=False)
    image = out.args[0]
    assert image.shape == (9, 64, 64, 3) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert not torch.equal(image, frames) and out.ui.as_dict()["images"]
    res = SaveAnimatedWEBP().save_images(image, 8.0, "heat/overlay", True, 80, "default")
    path = os.path.join(scene["tmp"], "output", res["ui"]["images"][0]["subfolder"], res["ui"]["images"][0]["filename"])
    assert os.path.getsize(path) > 0 and nodes is not None


def test_every_view_from_recording_and_saved_maps_agree(scene):
    for view, kw in [("token overlay", {}), ("token grid", {}), ("block grid", {"tokens": "flower"}),
                     ("sink overlay", {"step_mode": "each"}), ("self-attention window", {"steps": "1"}),
                     ("frame x frame mass", {"heads": "0,1"})]:
        live = run_view(scene, view, **kw).args[0]
        saved = run_view(scene, view, recorder=None, samples=None, attention_maps_path=scene["saved"],
                         video_id="prompt_000_vid001", **kw).args[0]
        assert live.ndim == 4 and live.shape[-1] == 3 and live.shape[0] >= 1, view
        assert live.shape == saved.shape, view
        # the saved maps went through float32 files: the same picture
        assert (live - saved).abs().max() < 1e-3, view
    assert run_view(scene, "sink overlay", step_mode="each").args[0].shape[0] == 3 * 9  # 3 steps x 9 frames


def test_bad_selections_are_clear(scene):
    with pytest.raises(ValueError, match="no tracked word 'rose'; tracked: \\['flower', 'tree'\\]"):
        run_view(scene, "token overlay", tokens="rose")
    with pytest.raises(ValueError, match="steps \\[7\\] were not recorded"):
        run_view(scene, "token overlay", steps="7")
    with pytest.raises(ValueError, match="blocks \\[5\\] were not recorded; recorded blocks: \\[0, 1\\]"):
        run_view(scene, "token overlay", blocks="5")
    with pytest.raises(ValueError, match="connect the sampler's LATENT"):
        run_view(scene, "token overlay", samples=None)
    with pytest.raises(Exception, match="outside the output folder"):
        run_view(scene, "token overlay", recorder=None, samples=None, attention_maps_path="../../etc", video_id="x")


def test_mask_node_from_recording_and_saved_maps(scene):
    """Attention Mask: one MASK per decoded frame (9 for 3 latent frames), the same from the recording and from the
    saved maps, and scored against a reference (itself: IoU 1; its complement: IoU 0)."""
    node = importlib.import_module(scene["node"].__module__.replace("heatmap_node", "mask_node")).AttentionMask
    node = node.PREPARE_CLASS_CLONE({})
    args = dict(token="flower", method="top_percent", value=25.0, steps="all", blocks="all")
    live = node.execute(recorder=scene["rec"], samples=scene["latent"], **args).args
    saved = node.execute(attention_maps_path=scene["saved"], **args).args
    mask = live[0]
    assert mask.shape == (9, 64, 64) and torch.equal(mask, saved[0]) and live[1] == -1.0
    frac = mask.mean(dim=(1, 2))
    assert float(frac.min()) >= 0.25 and float(frac.max()) < 0.6  # a quarter of each frame's cells (ties included)
    scored = node.execute(recorder=scene["rec"], samples=scene["latent"], reference_mask=mask, **args).args
    assert scored[1] == 1.0 and scored[2] == 1.0
    scored = node.execute(recorder=scene["rec"], samples=scene["latent"], reference_mask=1 - mask, **args).args
    assert scored[1] == 0.0 and scored[2] == 0.0
    schema = node.GET_SCHEMA()
    assert len(schema.inputs) <= 12 and all(getattr(i, "tooltip", None) for i in schema.inputs)
