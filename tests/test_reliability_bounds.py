"""Tampered and planted files of a saved causal recording, through the surfaces the fault campaign used (the
sink-report command, the viewer's /slice route): refused with an error naming the file, before anything is sized
from them. Groups: tampered_sinks (M5, L2), report_bounds (M6, L3)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_sink_report import keys, planted_sink, run
from test_viewer import fetch
from wan_capture import SaveOptions, save_take

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAMPERED = {"strings and nulls": ["x", None, 1e30], "NaN": [float("nan")], "two million frames": list(range(2_000_000)),
            "a frame past the video": [8]}


def saved(root, batch="b") -> tuple:
    take, _ = run(planted_sink, keys)
    video = save_take(take, str(root), batch, SaveOptions(storage_dtype="float32"))[0].video_id
    return os.path.join(str(root), batch, "attention_maps"), video


def sink_report(maps: str, out: str):
    return subprocess.run([sys.executable, "-m", "wan_capture", "sink-report", maps, "--out", out], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def tamper_events(folder: str, sink_frames) -> None:
    path = os.path.join(folder, "kv_cache_events.json")
    with open(path) as f:
        events = json.load(f)
    events["events"][-1]["sink_frames"] = sink_frames
    with open(path, "w") as f:
        json.dump(events, f)  # NaN is written as NaN, as a tamperer could


@pytest.mark.parametrize("what", list(TAMPERED))
def test_tampered_sinks_refused_by_the_sink_report(tmp_path, what):
    maps, video = saved(tmp_path)
    assert sink_report(maps, str(tmp_path / "ok")).returncode == 0
    tamper_events(os.path.join(maps, video), TAMPERED[what])
    r = sink_report(maps, str(tmp_path / "rep"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "kv_cache_events.json" in r.stderr and "sink_frames" in r.stderr, r.stderr
    assert "sink mass" not in r.stdout


def test_tampered_sinks_refused_by_the_viewer(comfy_server):
    maps, video = saved(comfy_server.output, "tampered_view")
    path = "tampered_view/attention_maps"
    url = f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&kind=frame_mass&step=0"
    status, headers, _ = fetch(url)
    assert status == 200 and headers["X-Sinks"] == "0"
    for what, frames in TAMPERED.items():
        tamper_events(os.path.join(maps, video), frames)
        status, headers, body = fetch(url)
        assert status == 422 and json.loads(body) == {"error": "damaged file: kv_cache_events.json"}, (what, status)


def test_report_bounds_planted_latent_grid_is_refused_before_allocating(tmp_path):
    maps, video = saved(tmp_path)
    path = os.path.join(maps, video, "summary.json")
    with open(path) as f:
        summary = json.load(f)
    summary["latent_grid"] = [10 ** 9, 30, 52]
    with open(path, "w") as f:
        json.dump(summary, f)
    r = sink_report(maps, str(tmp_path / "rep"))
    assert r.returncode == 2 and "summary.json" in r.stderr and "latent_grid" in r.stderr, r.stderr


def test_report_bounds_a_step_array_of_another_shape_names_its_file(tmp_path):
    maps, video = saved(tmp_path)
    folder = os.path.join(maps, video, "self_attention")
    name = sorted(n for n in os.listdir(folder) if n.endswith("frame_mass.npy"))[0]
    np.save(os.path.join(folder, name), np.zeros((2, 2), dtype=np.float32))
    r = sink_report(maps, str(tmp_path / "rep"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert name[:-len(".npy")] in r.stderr and "IndexError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
