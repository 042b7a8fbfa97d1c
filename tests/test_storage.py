"""Write then read back: arrays, metadata, the seed's own usage script, failures and hostile names."""
import gzip
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fake_sampling import run
from wan_capture import AttentionAnalyzer, FrameWindow, Grid, RecordingPlan, SaveOptions, StorageError, save_take
from wan_capture.recording import save as storage_mod
from wan_capture.prompts.tokens import TokenTracking, TrackedWord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_FIELDS = ["video_id", "step", "timestep", "total_steps", "token_word", "token_ids", "token_texts",
               "aggregation_method", "attention_shape", "spatial_resolution", "num_blocks", "num_heads",
               "threshold_applied", "block_idx", "head_idx", "dtype", "prompt", "seed", "cfg_scale"]
TRACKING = TokenTracking("a beautiful (flower:2.5) near a (big tree:1.2)", (
    TrackedWord("flower", "flower", (93643,), ("\u2581flower",), (2,), 2.5),
    TrackedWord("big", "big", (7, 8), ("\u2581b", "ig"), (5, 6), 1.2),
    TrackedWord("tree", "tree", (9,), ("\u2581tree",), (7,), 1.2)), 512)


def recorded(grid=Grid(2, 3, 4), steps=3, batch=1, blocks=3, **plan):
    kw = dict(text_positions=TRACKING.positions, negative_positions=TRACKING.positions, storage_dtype="float32",
              store_per_head=True, extra={"tokens": TRACKING.to_json(), "negative_tokens": TRACKING.to_json()})
    kw.update(plan)
    rec, _ = run(RecordingPlan(**kw), steps=steps, grid=grid, batch=batch, blocks=blocks)
    return rec.latest


@pytest.mark.parametrize("per_block,per_head,fmt,gz", list(itertools.product([True, False], [True, False],
                                                                             ["numpy", "torch"], [False, True])))
def test_write_read_back_every_combination(tmp_path, per_block, per_head, fmt, gz):
    take = recorded(store_per_block=per_block, store_per_head=per_head, batch=2, branch="both")
    opts = SaveOptions(storage_format=fmt, compress=gz, storage_dtype="float32", prompt_id="prompt_007", video_number=3)
    videos = save_take(take, str(tmp_path), "batch_x", opts, version="9.9")
    assert [v.video_id for v in videos] == ["prompt_007_vid003", "prompt_007_vid004"]
    an = AttentionAnalyzer(str(tmp_path / "batch_x" / "attention_maps"))
    assert an.list_videos() == ["prompt_007_vid003", "prompt_007_vid004"] and an.list_tokens("prompt_007_vid004") == ["big", "flower", "tree"]
    ext = {"numpy": ".npy", "torch": ".pt"}[fmt] + (".gz" if gz else "")
    for b, video in enumerate(["prompt_007_vid003", "prompt_007_vid004"]):
        summary = an.summary(video)
        assert summary["status"] == "complete" and summary["steps"] == [0, 1, 2] and summary["seed"] == 999
        for word in TRACKING.words:
            assert os.path.isfile(tmp_path / "batch_x" / "attention_maps" / video / f"token_{word.label}" / f"step_001{ext}")
            for branch in ("", "uncond"):
                got = an.load_step(video, word.label, 1, branch=branch)
                want = take.cross[(1, branch or "cond")][b][..., TRACKING.columns(word)].numpy()
                np.testing.assert_array_equal(got, want)
                assert got.shape == ((3 if per_block else 1), (3 if per_head else 1), 24, len(word.positions))
            meta = an.load_metadata(video, word.label, 1)
            assert set(SEED_FIELDS) <= set(meta)
            assert meta["token_word"] == word.word and meta["token_ids"] == list(word.token_ids)
            assert meta["token_weight"] == word.weight and meta["attention_shape"] == list(got.shape)
            assert meta["spatial_resolution"] == [24, len(word.positions)] and meta["latent_grid"] == [2, 3, 4]
            assert meta["num_blocks"] == got.shape[0] and meta["num_heads"] == got.shape[1]
            assert meta["aggregation_method"] == "per_step_full" and meta["dtype"] == "torch.float32"
            assert meta["timestep"] == pytest.approx(take.step_timesteps[1]) and meta["cfg_scale"] == 6.5
            assert meta["branch"] == "cond" and meta["pack_version"] == "9.9" and meta["video_id"] == video


def test_float16_storage_and_interval_and_downsample(tmp_path):
    take = recorded(grid=Grid(2, 4, 4))
    opts = SaveOptions(storage_interval=2, spatial_downsample_factor=2)
    save_take(take, str(tmp_path), "b", opts)
    an = AttentionAnalyzer(str(tmp_path / "b" / "attention_maps"))
    assert an.list_steps("prompt_000_vid001", "flower") == [0, 2]
    got = an.load_step("prompt_000_vid001", "flower", 2)
    full = take.cross[(2, "cond")][0][..., [0]].view(3, 3, 2, 2, 2, 2, 2, 1)  # blocks, heads, f, h/2, 2, w/2, 2, T
    want = full.mean(dim=(4, 6)).reshape(3, 3, 8, 1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)
    assert an.load_metadata("prompt_000_vid001", "flower", 2)["map_grid"] == [2, 2, 2]
    raw = np.load(tmp_path / "b" / "attention_maps" / "prompt_000_vid001" / "token_flower" / "step_000.npy")
    assert raw.dtype == np.float16


def test_seed_usage_examples_run_unchanged(tmp_path):
    take = recorded(grid=Grid(3, 15, 26), steps=3, blocks=2)
    save_take(take, str(tmp_path / "outputs"), "batch_name", SaveOptions())
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "seed_usage.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "Shape: (2, 3, 1170, 1)" and lines[1] == "Shape: (3, 2, 3, 1170, 1)"
    assert lines[2] == "(3, 3, 1170, 1) (3, 1170, 1) (3, 1170, 1) (1, 3, 240, 416)"


def test_spatial_map_alignment_hot_spot(tmp_path):
    take = recorded(grid=Grid(3, 15, 26), steps=1, blocks=1)
    hot = take.cross[(0, "cond")].zero_()  # the take's own array, in place
    hot.view(1, 1, 3, 3, 15, 26, 4)[:, :, :, 2, 7, 20, TRACKING.columns(TRACKING.word("flower"))[0]] = 1.0
    save_take(take, str(tmp_path), "b", SaveOptions(storage_dtype="float32"))
    an = AttentionAnalyzer(str(tmp_path / "b" / "attention_maps"))
    maps = an.get_spatial_attention_map("prompt_000_vid001", "flower", step=0, height=240, width=416, frames=9)
    assert maps.shape == (1, 9, 240, 416)
    # latent frame 2 covers pixel frames 5..8; cell (7, 20) covers pixels y 112..127, x 320..335
    assert [int(f) for f in np.nonzero(maps[0].max(axis=(1, 2)) > 0.5)[0]] == [5, 6, 7, 8]
    y, x = np.unravel_index(maps[0, 6].argmax(), maps[0, 6].shape)
    assert 112 <= y < 128 and 320 <= x < 336
    latent = an.get_spatial_attention_map("prompt_000_vid001", "flower", step=0, frames=3)
    assert latent.shape == (1, 3, 240, 416) and latent[0, 2].max() > 0.5 and latent[0, 1].max() == 0


def test_self_attention_and_window_files(tmp_path):
    take = recorded(record_cross=False, record_sink_stats=True, window=FrameWindow(1, 2), text_positions=())
    save_take(take, str(tmp_path), "b", SaveOptions(storage_dtype="float32"))
    video = tmp_path / "b" / "attention_maps" / "prompt_000_vid001"
    got = np.load(video / "self_attention" / "step_001_frame_mass.npy")
    np.testing.assert_array_equal(got, take.sink[(1, "cond")]["frame_mass"][0].numpy())
    assert got.shape == (3, 3, 2, 2)
    scores = np.load(video / "windows" / "step_002_block_01_scores.npy")
    np.testing.assert_array_equal(scores, take.windows[(2, 1, "cond")]["scores"][0].numpy())
    meta = json.loads((video / "windows" / "step_002_block_01_metadata.json").read_text())
    assert meta["q_frames"] == [1, 2] and meta["q_range"] == [12, 24] and meta["dtype"] == "torch.float32"
    an = AttentionAnalyzer(str(tmp_path / "b" / "attention_maps"))
    assert an.load_self_attention("prompt_000_vid001", 1, "received").shape == (3, 3, 24)
    assert an.load_all_self_attention("prompt_000_vid001", "entropy").shape == (3, 3, 3, 2)
    w = an.load_window("prompt_000_vid001", 2, 1)
    np.testing.assert_array_equal(w["probs"], take.windows[(2, 1, "cond")]["probs"][0].numpy())


def test_write_failure_keeps_earlier_files_and_marks_partial(tmp_path, monkeypatch):
    take = recorded()
    real, calls = storage_mod.atomic_write, {"n": 0}

    def failing(path, data):
        calls["n"] += 1
        if calls["n"] >= 6:
            raise OSError(28, "No space left on device")
        real(path, data)
    monkeypatch.setattr(storage_mod, "atomic_write", failing)
    with pytest.raises(StorageError, match=r"could not write .*No space left on device.*intact.*partial"):
        save_take(take, str(tmp_path), "b", SaveOptions())
    monkeypatch.setattr(storage_mod, "atomic_write", real)
    video = tmp_path / "b" / "attention_maps" / "prompt_000_vid001"
    summary = json.loads((video / "summary.json").read_text())
    assert summary["status"] == "partial"
    written = sorted(p for p in video.rglob("*") if p.is_file() and p.name != "summary.json")
    assert len(written) == 4 and not [p for p in video.rglob(".tmp-*")]
    for p in written:
        if p.suffix == ".npy":
            np.load(p)
        else:
            json.loads(p.read_text())


def test_interrupted_recording_is_saved_as_partial(tmp_path):
    take = recorded()
    take.status, take.error = "partial", "KeyboardInterrupt: cancelled"
    save_take(take, str(tmp_path), "b", SaveOptions())
    summary = AttentionAnalyzer(str(tmp_path / "b" / "attention_maps")).summary("prompt_000_vid001")
    assert summary["status"] == "partial" and "cancelled" in summary["partial_reason"]


def test_hostile_names_stay_inside_the_output_folder(tmp_path):
    words = (TrackedWord("../../evil", "evil", (1,), ("x",), (2,), 2.0), TrackedWord("a/b\\c:d*?", "x", (1,), ("x",), (5,), 2.0))
    take = recorded()
    take.plan.extra["tokens"] = TokenTracking("p", words, 512, prompt_id="../../up").to_json()
    out = tmp_path / "out"
    save_take(take, str(out), "../../../etc/..", SaveOptions())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(str(p.resolve()).startswith(str(out.resolve())) for p in files)
    names = {p.parent.name for p in files}
    assert "token_evil" in names and "token_a_b_c_d" in names


def test_symlink_out_of_the_output_folder_is_refused(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "linked")
    with pytest.raises(StorageError, match="outside the output folder"):
        save_take(recorded(), str(out), "linked", SaveOptions())
    assert not list(elsewhere.rglob("*"))


def test_gzip_files_are_gzip(tmp_path):
    save_take(recorded(), str(tmp_path), "b", SaveOptions(compress=True))
    path = tmp_path / "b" / "attention_maps" / "prompt_000_vid001" / "token_tree" / "step_000.npy.gz"
    np.load(io.BytesIO(gzip.decompress(path.read_bytes())))


def test_analyzer_reads_the_nested_layout_of_the_origin_project(tmp_path):
    """``attention_maps/prompt_000/vid001/token_flower/step_000.npy`` (no summary.json): listed, read and aggregated
    like the seed's flat ``prompt_000_vid001`` folders, side by side with them."""
    rng = np.random.default_rng(0)
    root = tmp_path / "attention_maps"
    arrays = {}
    for prompt, vid, word in (("prompt_000", "vid001", "flower"), ("prompt_000", "vid002", "flower"),
                              ("prompt_001", "vid001", "tree")):
        folder = root / prompt / vid / f"token_{word}"
        folder.mkdir(parents=True)
        for step in range(3):
            a = rng.random((2, 3, 12, 2)).astype(np.float16)
            np.save(folder / f"step_{step:03d}.npy", a)
            arrays[(f"{prompt}_{vid}", word, step)] = a
            meta = {"video_id": f"{prompt}_{vid}", "step": step, "token_word": word, "total_steps": 3,
                    "attention_shape": [2, 3, 12, 2], "prompt": f"a {word}", "seed": 7}
            (folder / f"step_{step:03d}_metadata.json").write_text(json.dumps(meta))
    flat = root / "prompt_002_vid001" / "token_sun"
    flat.mkdir(parents=True)
    np.save(flat / "step_000.npy", np.ones((1, 1, 12, 1), np.float16))
    (root / "prompt_002_vid001" / "summary.json").write_text(json.dumps(
        {"status": "complete", "steps": [0], "tokens": [{"label": "sun", "folder": "token_sun"}]}))
    an = AttentionAnalyzer(str(root))
    assert an.list_videos() == ["prompt_000_vid001", "prompt_000_vid002", "prompt_001_vid001", "prompt_002_vid001"]
    assert an.list_tokens("prompt_001_vid001") == ["tree"] and an.list_steps("prompt_001_vid001", "tree") == [0, 1, 2]
    np.testing.assert_array_equal(an.load_step("prompt_000_vid002", "flower", 1),
                                  arrays[("prompt_000_vid002", "flower", 1)].astype(np.float32))
    np.testing.assert_array_equal(an.load_step("prompt_000/vid002", "flower", 2),  # the nested name works too
                                  arrays[("prompt_000_vid002", "flower", 2)].astype(np.float32))
    evo = an.get_temporal_evolution("prompt_000_vid001", "flower")
    want = np.stack([arrays[("prompt_000_vid001", "flower", s)].astype(np.float32) for s in range(3)]).mean(axis=(1, 2))
    np.testing.assert_allclose(evo, want, rtol=1e-6)
    summary = an.summary("prompt_001_vid001")
    assert summary["summary_from_files"] and summary["prompt"] == "a tree" and summary["seed"] == 7
    assert an.load_metadata("prompt_000_vid001", "flower", 0)["token_word"] == "flower"
    with pytest.raises(FileNotFoundError, match="no video 'prompt_000_vid009'"):
        an.load_step("prompt_000_vid009", "flower", 0)
