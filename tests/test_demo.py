"""``make demo``'s script on a machine without ComfyUI (the Python API path) and with it (the HTTP API path)."""
import os
import subprocess
import sys

import pytest

from attention_analyzer import AttentionAnalyzer
from devtools.tiny_comfy import COMFYUI, NOT_FOUND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_anywhere_without_comfyui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["HOME"] = str(tmp_path / "home")  # no ~/ComfyUI
    os.makedirs(env["HOME"])
    out = tmp_path / "out"
    env["PYTHONPATH"] = ROOT  # as `python -m scripts.demo` from the repository has it, run from another folder
    done = subprocess.run([sys.executable, "-m", "scripts.demo", "--out", str(out)], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ComfyUI not found" in done.stdout and "custom_nodes/" in done.stdout.splitlines()[-1]
    an = AttentionAnalyzer(str(out / "demo" / "attention_maps"))
    video = an.list_videos()[0]
    assert an.list_tokens(video) == ["pos001", "pos004", "pos007"]
    assert an.load_all_steps(video, "pos004").shape[0] == 3  # [steps, blocks, heads, spatial, pieces]
    assert an.list_self_attention_steps(video) == [0, 1, 2]
    pngs = list((out / "demo" / "heatmaps").rglob("*.png"))
    assert len(pngs) == 4 * 9 and all(p.stat().st_size > 0 for p in pngs)  # 3 positions + received, 9 frames each
    assert (out / "sink_report" / "series.csv").stat().st_size > 0
    # the bidirectional recording's sink table: one chunk (0), the whole video, every key frame a window frame
    from wan_capture.views.sink_report import sink_table
    table = sink_table(an.recording(video))
    frames = an.summary(video)["latent_grid"][0]
    assert {r["chunk"] for r in table.rows} == {0} and {r["step"] for r in table.rows} == {0, 1, 2}
    for r in table.rows:
        assert r["key_frames"] == list(range(frames)) and set(r["key_classes"]) == {"window"}
        assert r["mass_window"] == pytest.approx(1.0, abs=1e-3) and r["mass_sink"] is None
        assert r["uniform_window"] == 1.0 and r["sink_ratio"] is None
        assert r["frame_tokens"] == (64 // 8 // 2) ** 2  # the demo's 64 px frames: VAE 8x, then 2x2 patches
    assert all(f["per_token_mean"] == pytest.approx(f["mass"] / 16) for f in table.frame_rows())


@pytest.mark.skipif(COMFYUI is None, reason=NOT_FOUND)
def test_demo_anywhere_with_comfyui_names_what_progress_counts(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=COMFYUI)
    done = subprocess.run([sys.executable, "-m", "scripts.demo", "--base-directory", str(tmp_path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "KSampler: sampling steps 3/3" in done.stderr
    assert "Save Attention Maps: files written" in done.stderr and "step 1/" not in done.stderr
    assert AttentionAnalyzer(str(tmp_path / "output" / "demo" / "attention_maps")).list_videos()
