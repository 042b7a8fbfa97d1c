"""One recording model: a recording read live and the same recording saved and loaded answer the same (every view,
pixel for pixel); a saved recording saved again is a byte-for-byte copy; causal takes always save (initial_latent,
two generations); files follow the umask; statistics do not depend on the host's autocast or call order."""
import math
import os
import stat

import numpy as np
import pytest
import torch

from fake_sampling import GRID, HEADS, D, heads_of, run
from reference import naive_probs, naive_scores, naive_sink
from self_forcing import SF_NOT_FOUND, self_forcing_modules, self_forcing_path
from wan_capture import AttentionCall, FrameWindow, Grid, Recorder, RecordingPlan, SaveOptions, record, save_take
from devtools import tiny_causal
from wan_capture.adapters.official import sdpa_attention
from wan_capture.views.masks import attention_masks
from wan_capture.recording import ArrayKey, FolderRecording, MemoryRecording, key_path
from wan_capture.views.select import SelectionError
from wan_capture.recording.save import save_recording
from devtools.tiny_causal import causal_generate
from wan_capture.prompts.tokens import TokenTracking, TrackedWord
from wan_capture.views.maps import (frame_mass, frame_mass_images, grid_image, image_share_maps, mean_window, sink_maps,
                               token_maps, video_frames, window_image)

MODES = ("per_frame", "per_video", "shared", "fixed")
TRACKING = TokenTracking("a (flower:2.5) near a (tree:1.2)", (
    TrackedWord("flower", "flower", (93643,), ("\u2581flower",), (2,), 2.5),
    TrackedWord("tree", "tree", (9,), ("\u2581tree",), (7,), 1.2)), 512)


def bidirectional_take():
    plan = RecordingPlan(text_positions=TRACKING.positions, record_sink_stats=True, storage_dtype="float32",
                         store_per_head=True, window=FrameWindow(1, 2), extra={"tokens": TRACKING.to_json()})
    rec, _ = run(plan, steps=3)
    return rec.latest


CF, CHUNK, CACHE, SINK, H, W = 6, 2, 4, 1, 4, 4  # causal: latent frames, chunk, cache frames, sink, latent size
FT = (H // 2) * (W // 2)
TIMESTEPS = (1000.0, 600.0)


def causal_plan(**kw):
    return RecordingPlan(text_positions=(0, 3), record_sink_stats=True, storage_dtype="float32", store_per_head=True,
                         window=FrameWindow(3, 4), **kw)


def tiny_model():
    torch.manual_seed(0)
    return tiny_causal.CausalWanModel(dim=256, num_heads=2, num_layers=2, local_attn_size=CACHE, sink_size=SINK,
                                      frame_tokens=FT).eval()


def causal_take(initial=None):
    model = tiny_model()
    noise, ctx = torch.randn(1, 16, CF, H, W), torch.randn(1, 8, 4096)
    with record(model, causal_plan()) as rec:
        causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE, initial_latent=initial)
    return rec.latest


def all_views(rec):
    """Every view of a recording, in every normalisation mode, as pixel arrays (plus the mask and the raw maps)."""
    out = {}
    labels = rec.labels_of("cond")
    steps = rec.steps
    for mode in MODES:
        style = dict(cmap="inferno", mode=mode, alpha=0.5, vmin=0.0, vmax=0.5)
        out[f"overlay_{mode}"] = video_frames(token_maps(rec, labels[0], mean_steps=False), rec.meta, None, **style)
        out[f"sinks_{mode}"] = video_frames(sink_maps(rec, steps=[s for s in steps if _has_sink(rec, s)]), rec.meta,
                                            None, latent_grid_maps=True, **style)
        rows = [token_maps(rec, w, steps, mean_steps=False) for w in labels]
        out[f"grid_{mode}"] = grid_image(rows, labels, [str(s) for s in steps], 0, "viridis", mode, "t")
        win = mean_window(rec, [min(k.step for k in rec.keys_of("window"))], [0])
        out[f"window_{mode}"] = np.stack(window_image(win, "scores", None, rec.meta["latent_grid"][1] *
                                                      rec.meta["latent_grid"][2], "gray", mode))
    mass = frame_mass(rec, steps=[s for s in steps if _has_sink(rec, s)])
    out["frame_mass"] = np.stack(frame_mass_images(mass[None], [0], False, "gray", "t", rec.sink_frames))
    out["mask"] = attention_masks(token_maps(rec, labels[0])[0], "top_percent", 30.0)
    out["per_head"] = token_maps(rec, labels[0], heads=[1], blocks=[0])
    return out


def _has_sink(rec, step):
    return any(k.step == step for k in rec.keys_of("sink"))


def saved(take, tmp_path, name="b", **opts):
    video = save_take(take, str(tmp_path), name, SaveOptions(storage_dtype="float32", **opts))[0]
    return FolderRecording.open(str(tmp_path / name / "attention_maps"), video.video_id), video


def assert_same_views(live, loaded):
    assert live.keys() and sorted(live.keys(), key=ArrayKey.order) == sorted(loaded.keys(), key=ArrayKey.order)
    a, b = all_views(live), all_views(loaded)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"view {name} differs between live and saved"


def test_recording_model_every_view_identical_live_and_saved_bidirectional(tmp_path):
    take = bidirectional_take()
    live = MemoryRecording(take)
    loaded, _ = saved(take, tmp_path)
    assert_same_views(live, loaded)
    for key in live.keys():  # and the arrays themselves
        assert np.array_equal(live.get(key), loaded.get(key)), key


def test_recording_model_every_view_identical_live_and_saved_causal(tmp_path):
    take = causal_take()
    live = MemoryRecording(take)
    loaded, _ = saved(take, tmp_path)
    assert live.causal and loaded.causal and live.chunks() == loaded.chunks() == [0, 2, 4]
    assert_same_views(live, loaded)
    for step in live.steps:
        for name in ("received", "key_max", "frame_mass", "entropy"):
            np.testing.assert_array_equal(live.sink(step, name), loaded.sink(step, name))
    assert live.kv_events() == loaded.kv_events()


@pytest.mark.parametrize("fmt,gz", [("numpy", False), ("numpy", True), ("torch", False), ("torch", True)])
def test_recording_model_save_of_load_is_a_byte_copy(tmp_path, fmt, gz):
    for take, name in ((bidirectional_take(), "bi"), (causal_take(), "causal")):
        first, video = saved(take, tmp_path, name, storage_format=fmt, compress=gz)
        copy = save_recording(first, str(tmp_path), name + "_copy", SaveOptions(storage_format=fmt, compress=gz,
                                                                                storage_dtype="float32"))
        assert copy.status == "complete" and copy.video_id == video.video_id
        ext = {"numpy": ".npy", "torch": ".pt"}[fmt] + (".gz" if gz else "")
        folders = {w["label"]: w["folder"] for w in first.words("cond")}
        keys = first.keys()
        assert keys and FolderRecording.open(os.path.dirname(copy.path), copy.video_id).keys() == keys
        for key in keys:
            rel = key_path(key, folders.get(key.name)) + ext
            with open(os.path.join(video.path, rel), "rb") as a, open(os.path.join(copy.path, rel), "rb") as b:
                if fmt == "numpy":
                    assert a.read() == b.read(), rel
                else:  # torch.save writes a zip whose record names differ per call: compare the stored tensors
                    assert np.array_equal(first.get(key), FolderRecording.open(
                        os.path.dirname(copy.path), copy.video_id).get(key)), rel
        if take.causal:
            with open(os.path.join(video.path, "kv_cache_events.json")) as a, \
                    open(os.path.join(copy.path, "kv_cache_events.json")) as b:
                assert a.read() == b.read()


def test_recording_model_per_head_request_on_a_mean_only_recording_is_one_error(tmp_path):
    plan = RecordingPlan(text_positions=(2,), store_per_head=False)
    rec, _ = run(plan, steps=1)
    for source in (MemoryRecording(rec.latest), saved(rec.latest, tmp_path)[0]):
        assert source.heads == [-1]
        with pytest.raises(SelectionError, match=r"heads were recorded as their mean .* heads \[1\] cannot be chosen"):
            token_maps(source, "pos002", heads=[1])
        token_maps(source, "pos002")  # the mean itself is fine


# -- causal takes that always save -----------------------------------------------------------------------------

@pytest.fixture(params=["tiny", "self_forcing"])
def causal_model(request, monkeypatch):
    if request.param == "tiny":
        yield tiny_model(), torch.float32
        return
    if self_forcing_path() is None:
        pytest.skip(SF_NOT_FOUND)
    with self_forcing_modules() as (cm, wm):
        monkeypatch.setattr(wm, "flash_attention", sdpa_attention)  # no flash-attn here
        torch.manual_seed(0)
        model = cm.CausalWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256,
                                  ffn_dim=512, freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2,
                                  local_attn_size=CACHE, sink_size=SINK).eval().to(torch.bfloat16)
        yield model, torch.bfloat16


def test_recording_model_initial_latent_causal_take_saves_and_reads_back(causal_model, tmp_path):
    """Video extension / i2v: the given frames' chunk only has the context pass (step 0, timestep 0), the others
    every step; the take saves, reads back equal to the live recording, and the whole-video views work."""
    model, dtype = causal_model
    noise, ctx = torch.randn(1, 16, CF - CHUNK, H, W).to(dtype), torch.randn(1, 8, 4096).to(dtype)
    initial = torch.randn(1, 16, CHUNK, H, W).to(dtype)
    go = lambda: causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE,  # noqa: E731
                                 initial_latent=initial)
    plain = go()
    with record(model, causal_plan()) as rec:
        out = go()
    assert torch.equal(out, plain), "recording changed the output"
    take = rec.latest
    assert take.status == "complete" and len(rec.takes) == 1
    assert take.step_pass == {0: "context", 1: "denoise", 2: "denoise"}  # timestep 0 came first: step 0
    live = MemoryRecording(take)
    assert live.chunk_steps() == {0: [0], 2: [0, 1, 2], 4: [0, 1, 2]}
    loaded, video = saved(take, tmp_path)
    assert video.status == "complete" and loaded.chunk_steps() == live.chunk_steps()
    assert_same_views(live, loaded)
    # the whole-video token maps of a denoising step: the given chunk's frames are absent (NaN), the rest exact
    maps = loaded.cross("pos000", 1)
    assert np.isnan(maps[:, :, :CHUNK * FT]).all() and not np.isnan(maps[:, :, CHUNK * FT:]).any()
    meta = loaded.metadata(ArrayKey("cross", "pos000", 1))
    assert meta["absent_frames"] == [0, 1] and meta["pass"] == "denoise"
    # the whole-video sink statistic of step 1: query frames of the given chunk have no row
    mass = loaded.sink(1, "frame_mass")
    assert np.all(mass[..., :CHUNK, :] == 0) and np.allclose(mass[..., CHUNK:, :].sum(-1), 1.0, atol=1e-5)
    with pytest.raises(KeyError, match=r"steps per chunk: \{0: \[0\], 2: \[0, 1, 2\], 4: \[0, 1, 2\]\}"):
        loaded.sink(7, "received")


def test_recording_model_two_generations_in_one_record_block_are_two_takes(tmp_path):
    model = tiny_model()
    ctx = torch.randn(1, 8, 4096)
    noises = [torch.randn(1, 16, CF, H, W), torch.randn(1, 16, CF, H, W)]
    alone = []
    for noise in noises:
        with record(model, causal_plan()) as rec:
            causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE)
        alone.append(rec.latest)
    with record(model, causal_plan()) as rec:
        for noise in noises:
            causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE)
    assert len(rec.takes) == 2 and all(t.status == "complete" for t in rec.takes)
    for together, single in zip(rec.takes, alone):
        assert together.skipped == single.skipped and not together.skipped.get("repeated_evaluations")
        a, b = MemoryRecording(together), MemoryRecording(single)
        assert a.keys() == b.keys()
        for key in a.keys():
            assert np.array_equal(a.get(key), b.get(key)), key
        assert together.kv_events == single.kv_events
        assert save_take(together, str(tmp_path), "two", SaveOptions())[0].status == "complete"


# -- files people can read --------------------------------------------------------------------------------------

def test_recording_model_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        video = save_take(bidirectional_take(), str(tmp_path), "perm", SaveOptions())[0]
    finally:
        os.umask(old)
    modes = {}
    for folder, dirs, files in os.walk(tmp_path / "perm"):
        modes[folder] = stat.S_IMODE(os.stat(folder).st_mode)
        for f in files:
            modes[os.path.join(folder, f)] = stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode)
    assert video.path in modes and len(modes) > 10
    for path, mode in modes.items():
        assert mode == (0o755 if os.path.isdir(path) else 0o644), (path, oct(mode))


# -- statistics independent of the host's numerics and call order ----------------------------------------------

def test_recording_model_cpu_bf16_autocast_equals_float64():
    plan = RecordingPlan(text_positions=(1, 4), record_sink_stats=True, storage_dtype="float32", store_per_head=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec, seen = run(plan, steps=1, blocks=2)
    take = rec.latest
    assert take.status == "complete"
    for b in range(2):
        q, k = (t[1:] for t in seen[(0, b, "self")])  # rows: uncond, cond
        received, key_max, mass, ent, _ = naive_sink(heads_of(q).double(), heads_of(k).double(), GRID.frame_tokens)
        got = take.sink[(0, "cond")]
        torch.testing.assert_close(got["received"][:, b].double(), received, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["frame_mass"][:, b].double(), mass, rtol=1e-5, atol=1e-7)
        q, k = (t[1:] for t in seen[(0, b, "cross_text")])
        want = naive_probs(naive_scores(heads_of(q), heads_of(k))[0])[..., [1, 4]]
        torch.testing.assert_close(take.cross[(0, "cond")][:, b].double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order", [("image", "text"), ("text", "image")])
def test_recording_model_image_context_independent_of_call_order(order):
    """An i2v block's image and text calls in either order: the same maps and image share, equal to float64."""
    from wan_capture.capture.tracker import CallTracker, Evaluation
    from wan_capture.model_info import ModelInfo
    info = ModelInfo("WAN21", "WanModel", 1, HEADS, D, HEADS * D, (1, 2, 2), (4, 8, 8), cross_attention="i2v")
    plan = RecordingPlan(text_positions=(3,), record_image_context=True, storage_dtype="float32",
                         store_per_head=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, GRID.tokens, HEADS * D, generator=g)
    ctx = {"text": torch.randn(1, 512, HEADS * D, generator=g), "image": torch.randn(1, 257, HEADS * D, generator=g)}
    rec = Recorder(plan)
    rec.begin_pass([1.0, 0.0], info)
    tracker = CallTracker(rec, info, ("self", "cross_image", "cross_text"))
    tracker.begin_evaluation(Evaluation(0, True, 1.0, 1000.0, ("cond",), GRID))
    tracker.enter_block(0, ("cross_image", "cross_text"))
    for which in order:
        tracker.tap(x, ctx[which], HEADS, lambda: x)
    tracker.end_evaluation()
    rec.end_pass("out")
    take = rec.latest
    qd = heads_of(x).double()
    s_txt, s_img = naive_scores(qd, heads_of(ctx["text"]))[0], naive_scores(qd, heads_of(ctx["image"]))[0]
    lse_t, lse_i = torch.logsumexp(s_txt, -1), torch.logsumexp(s_img, -1)
    torch.testing.assert_close(take.image[(0, "cond")]["share"][:, 0].double(), torch.sigmoid(lse_i - lse_t),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(take.image[(0, "cond")]["received"][:, 0].double(), naive_probs(s_img).mean(2),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(take.cross[(0, "cond")][:, 0].double(), naive_probs(s_txt)[..., [3]],
                               rtol=1e-5, atol=1e-7)
    assert not take.skipped
    shares = image_share_maps(MemoryRecording(take))
    assert shares.shape == (1, *GRID.as_list()) and math.isfinite(float(shares.sum()))
