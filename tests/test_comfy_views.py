"""The view nodes inside real ComfyUI: every node and mode, from a recording and from saved maps (Load Attention
Maps), into SaveAnimatedWEBP; the Attention Mask node."""
import importlib
import os

import pytest
import torch

from comfy_harness import (empty_latent, ksampler, load_comfy, load_model, needs_comfy, recording_options, tiny_clip,
                           tiny_spiece_model, tiny_wan_checkpoint)

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
        clip=clip, text="a beautiful (flower:2.5) near a (tree:1.5)", mode="weighted", words="", variation=0).args[:3]
    attach = mod("attach_node").AttachAttentionRecorder
    opts = recording_options(pack, store_per_head=True, window_query_frames="1")
    recorded, rec = attach.execute(model=model, token_tracking=spec, options=opts,
                                   record="cross attention + sink statistics").args
    pos, neg = nodes.CLIPTextEncode().encode(clip, prompt)[0], nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = ksampler(recorded, pos, neg, empty_latent("t2v"))
    save = mod("save_node").SaveAttentionMaps.PREPARE_CLASS_CLONE({})
    saved = save.execute(recorder=rec, samples=latent, batch_name="heat").args[0]
    loaded = mod("source_node").LoadAttentionMaps.execute(attention_maps_path=saved).args[0]
    views = {cls.GET_SCHEMA().node_id: cls.PREPARE_CLASS_CLONE({}) for cls in mod("view_nodes").NODES}
    return dict(rec=rec, latent=latent, views=views, saved=saved, loaded=loaded, tmp=tmp, mod=mod, pack=pack)


def run(scene, node_id, live=True, **kw):
    source = dict(recorder=scene["rec"], samples=scene["latent"]) if live else dict(recorder=scene["loaded"])
    return scene["views"][node_id].execute(**{**source, **kw})


def test_token_overlay_over_decoded_frames_into_webp(scene):
    from devtools.tiny_comfy import core_nodes
    SaveAnimatedWEBP = core_nodes("nodes_images").SaveAnimatedWEBP
    frames = torch.rand(9, 64, 64, 3)
    style = scene["views"]["WanHeatmapStyle"].execute(legend=False).args[0]
    out = run(scene, "WanAttentionOverlay", images=frames, token="tree", style=style)
    image = out.args[0]
    assert image.shape == (9, 64, 64, 3) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert not torch.equal(image, frames) and out.ui.as_dict()["images"]
    res = SaveAnimatedWEBP().save_images(image, 8.0, "heat/overlay", True, 80, "default")
    ui = res.ui.as_dict() if hasattr(res, "ui") else res["ui"]  # hiddenswitch's is a V3 node
    path = os.path.join(scene["tmp"], "output", ui["images"][0]["subfolder"], ui["images"][0]["filename"])
    assert os.path.getsize(path) > 0


def test_every_view_node_and_mode_from_recording_and_saved_maps_agree(scene):
    cases = [("WanAttentionOverlay", {}), ("WanAttentionOverlay", {"step_mode": "each", "token": "tree"}),
             ("WanAttentionStatisticOverlay", {"step_mode": "each"}), ("WanAttentionGrid", {}),
             ("WanAttentionGrid", {"rows": "blocks", "tokens": "flower"}),
             ("WanAttentionMatrix", {"matrix": "window scores", "steps": "1", "blocks": "0"}),
             ("WanAttentionMatrix", {"matrix": "window probabilities"}),
             ("WanAttentionMatrix", {"matrix": "frame x frame mass", "heads": "0,1"})]
    for node_id, kw in cases:
        live = run(scene, node_id, **kw).args[0]
        saved = run(scene, node_id, live=False, **kw).args[0]
        assert live.ndim == 4 and live.shape[-1] == 3 and live.shape[0] >= 1, (node_id, kw)
        assert live.shape == saved.shape, (node_id, kw)
        # the saved maps went through float32 files: the same picture
        assert (live - saved).abs().max() < 1e-3, (node_id, kw)
    assert run(scene, "WanAttentionStatisticOverlay", step_mode="each").args[0].shape[0] == 3 * 9  # 3 steps x 9 frames
    one = run(scene, "WanAttentionOverlay", steps="every 2", step_mode="each").args[0]
    assert one.shape[0] == 2 * 9  # steps 0 and 2


def test_style_changes_colours_not_layout(scene):
    style = scene["views"]["WanHeatmapStyle"]
    gray = style.execute(colormap="gray", legend=False).args[0]
    img = run(scene, "WanAttentionOverlay", style=gray).args[0]
    assert torch.allclose(img[..., 0], img[..., 1]) and torch.allclose(img[..., 1], img[..., 2])  # gray is gray
    fixed = style.execute(colormap="gray", normalize="fixed", low=0.0, high=1e-9, legend=False).args[0]
    sat = run(scene, "WanAttentionOverlay", style=fixed).args[0]
    assert float(sat.min()) == 1.0  # every probability is above the tiny fixed range: all white
    with pytest.raises(ValueError, match="vmax > vmin"):
        style.execute(normalize="fixed", low=1.0, high=1.0)


def test_bad_selections_are_clear(scene):
    with pytest.raises(ValueError, match="no tracked word 'rose'; tracked: \\['flower', 'tree'\\]"):
        run(scene, "WanAttentionOverlay", token="rose")
    with pytest.raises(ValueError, match="steps \\[7\\] were not recorded"):
        run(scene, "WanAttentionOverlay", steps="7")
    with pytest.raises(ValueError, match="blocks \\[5\\] were not recorded; recorded blocks: \\[0, 1\\]"):
        run(scene, "WanAttentionOverlay", blocks="5")
    with pytest.raises(ValueError, match="connect the sampler's LATENT"):
        run(scene, "WanAttentionOverlay", samples=None)
    with pytest.raises(ValueError, match="batch_index 3 is outside the 1 loaded videos"):
        run(scene, "WanAttentionOverlay", live=False, batch_index=3)
    with pytest.raises(KeyError, match="no image-context statistics"):
        run(scene, "WanAttentionStatisticOverlay", statistic="image share (i2v)")
    with pytest.raises(Exception, match="outside the output folder"):
        scene["mod"]("source_node").LoadAttentionMaps.execute(attention_maps_path="../../etc")
    with pytest.raises(ValueError, match="no saved video 'x'"):
        scene["mod"]("source_node").LoadAttentionMaps.execute(attention_maps_path=scene["saved"], video_id="x")
    with pytest.raises(TypeError, match="share_recorder needs the live recorder"):  # saved maps cannot record
        scene["mod"]("attach_node").AttachAttentionRecorder.execute(model=None, share_recorder=scene["loaded"])


def test_mask_node_from_recording_and_saved_maps(scene):
    """Attention Mask: one MASK per decoded frame (9 for 3 latent frames), the same from the recording and from the
    saved maps, and scored against a reference (itself: IoU 1; its complement: IoU 0)."""
    node = scene["mod"]("mask_node").AttentionMask.PREPARE_CLASS_CLONE({})
    args = dict(token="flower", method="top_percent", value=25.0)
    live = node.execute(recorder=scene["rec"], samples=scene["latent"], **args).args
    saved = node.execute(recorder=scene["loaded"], **args).args
    mask = live[0]
    assert mask.shape == (9, 64, 64) and torch.equal(mask, saved[0]) and live[1] == -1.0
    frac = mask.mean(dim=(1, 2))
    assert float(frac.min()) >= 0.25 and float(frac.max()) < 0.6  # a quarter of each frame's cells (ties included)
    scored = node.execute(recorder=scene["rec"], samples=scene["latent"], reference_mask=mask, **args).args
    assert scored[1] == 1.0 and scored[2] == 1.0
    scored = node.execute(recorder=scene["rec"], samples=scene["latent"], reference_mask=1 - mask, **args).args
    assert scored[1] == 0.0 and scored[2] == 0.0
    with pytest.raises(ValueError, match="time mismatch: 10 frames were given"):
        node.execute(recorder=scene["rec"], samples=scene["latent"], images=torch.rand(10, 64, 64, 3), **args)
