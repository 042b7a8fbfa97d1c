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


def recorded_on(server, batch: str) -> str:
    """The t2v example at tiny size, recorded and saved on ``server`` as ``batch``; its video id."""
    from api_util import run_prompt
    from devtools.tiny_workflow import tiny_example
    api = tiny_example("wan21_t2v_attention.json")
    api["20"]["inputs"]["batch_name"] = batch
    entry = run_prompt(server.url, api)
    return [r for o in entry["outputs"].values() for r in o.get("attention_maps", [])][0]["video_id"]


def test_header_bounds_probe_refuses_a_header_of_other_dimensions(comfy_server):
    """M3: the probe's one-cell reader trusted the .npy header's dimensions (a planted [64, 64, cells, pieces] read
    4,096 runs per step); it now holds them to the summary's blocks, heads and cells, naming the file."""
    video = recorded_on(comfy_server, "header_bounds")
    url = f"{comfy_server.url}/wan_capture/probe?path=header_bounds/attention_maps&video={video}&frame=0&y=1&x=1"
    status, _, body = fetch(url)
    assert status == 200, body
    folder = comfy_server.output / "header_bounds" / "attention_maps" / video / "token_flower"
    step = np.load(folder / "step_001.npy")  # [blocks, heads, cells, pieces]
    planted = np.zeros((64, 64) + step.shape[2:], dtype=step.dtype)
    np.save(folder / "step_001.npy", planted)
    status, _, body = fetch(url)
    assert status == 422 and json.loads(body) == {"error": "damaged file: step_001.npy"}, (status, body)


def test_node_path_bounds_load_then_save_refuses_a_gzip_bomb(comfy_server):
    """M4: Load Attention Maps -> Save Attention Maps (a copy) and the views decompressed with no bound (600 KB planted
    -> 268 MB written). A step file that decompresses past what the recording's geometry allows is refused naming
    the file; nothing of it is written."""
    import gzip
    from api_util import execution_errors, run_prompt
    video = recorded_on(comfy_server, "node_bounds")
    folder = comfy_server.output / "node_bounds" / "attention_maps" / video / "token_flower"
    bomb = np.zeros((64, 64, 4096, 4), dtype=np.float32)  # 268 MB of zeros: 260 KB gzipped
    import io
    buf = io.BytesIO()
    np.save(buf, bomb)
    os.remove(folder / "step_001.npy")
    with open(folder / "step_001.npy.gz", "wb") as f:
        f.write(gzip.compress(buf.getvalue(), compresslevel=9))
    assert os.path.getsize(folder / "step_001.npy.gz") < 1 << 20
    graph = {"1": {"class_type": "WanLoadAttentionMaps", "inputs": {"attention_maps_path": "node_bounds/attention_maps",
                                                                     "video_id": video}},
             "2": {"class_type": "WanSaveAttention", "inputs": {"recorder": ["1", 0], "batch_name": "node_bounds_copy"}},
             "3": {"class_type": "WanAttentionOverlay", "inputs": {"recorder": ["1", 0], "token": "flower", "steps": "1"}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    for out in ("2", "4"):  # the copy, and a view
        entry = run_prompt(comfy_server.url, {k: v for k, v in graph.items() if k == "1" or k == out or
                                              (out == "4" and k == "3")})
        errors = execution_errors(entry)
        assert errors and "step_001.npy.gz" in errors[0]["exception_message"], (out, errors)
    written = sum(p.stat().st_size for p in (comfy_server.output / "node_bounds_copy").rglob("*") if p.is_file()) \
        if (comfy_server.output / "node_bounds_copy").exists() else 0
    assert written < 1 << 20
