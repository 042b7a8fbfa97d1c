"""Defects of the second fault campaign found through ComfyUI's HTTP API and the viewer's routes, reproduced the same
way (files planted with ComfyUI's own POST /upload/image, type=output) and fixed. Memory bounds are the server
process's peak resident memory (VmHWM), not a count of the recorder's arrays."""
import gzip
import io
import json
import os
import threading
import time
import urllib.parse
import uuid

import numpy as np
import pytest

from api_util import execution_errors, get, run_prompt
from devtools.tiny_workflow import to_tiny
from test_viewer import fetch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def upload(url: str, subfolder: str, name: str, data: bytes) -> int:
    """ComfyUI's own upload route, type=output: how the campaign planted files under the output folder."""
    boundary = uuid.uuid4().hex
    parts = []
    for field, value in (("type", "output"), ("subfolder", subfolder), ("overwrite", "true")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


import urllib.request  # noqa: E402


def t2v(batch_name: str, text: str = None) -> dict:
    api = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")))
    api["20"]["inputs"]["batch_name"] = batch_name
    if text is not None:
        api["4"]["inputs"]["text"] = text
    return to_tiny(api)


@pytest.fixture(scope="module")
def saved(comfy_server):
    entry = run_prompt(comfy_server.url, t2v("campaign"))
    video = [r for o in entry["outputs"].values() for r in o.get("attention_maps", [])][0]["video_id"]
    return "campaign/attention_maps", video


@pytest.fixture(scope="module")
def causal(comfy_server):
    import torch
    from devtools.tiny_causal import CausalWanModel, causal_generate
    from wan_capture import RecordingPlan, SaveOptions, record, save_take
    torch.manual_seed(0)
    model = CausalWanModel(dim=256, num_heads=2, num_layers=2, local_attn_size=4, sink_size=1, frame_tokens=4).eval()
    with record(model, RecordingPlan(record_cross=False, record_sink_stats=True)) as rec:
        causal_generate(model, torch.randn(1, 16, 6, 4, 4), torch.randn(1, 8, 4096), 2, cache_frames=4)
    video = save_take(rec.latest, str(comfy_server.output), "planted", SaveOptions())[0].video_id
    return "planted/attention_maps", video


def test_template_bound_forty_groups_through_a_real_prompt(comfy_server):
    """40 [a|b] groups (2^40 variations) grew ComfyUI to 16 GB; the tracker now picks its variation by arithmetic."""
    run_prompt(comfy_server.url, t2v("template_warm"))  # the same workflow without the groups: the baseline
    before = peak_rss(comfy_server.pid)
    text = " ".join(f"[a{i}|b{i}]" for i in range(40)) + " a (flower:2.5) near a (tree:1.5)"
    entry = run_prompt(comfy_server.url, t2v("template_bound", text))
    assert entry["status"]["status_str"] == "success", entry["status"]
    shown = [t for o in entry["outputs"].values() for t in o.get("text", [])]
    assert any(f"(variation 0 of {2 ** 40})" in t for t in shown), shown
    assert peak_rss(comfy_server.pid) - before < 300 * MIB


def test_frame_mass_bound_planted_summary_is_refused_before_allocating(comfy_server, causal):
    path, video = causal
    url = comfy_server.url
    summary = json.loads(fetch(f"{url}/wan_capture/summary?path={path}&video={video}")[2])
    assert fetch(f"{url}/wan_capture/slice?path={path}&video={video}&kind=frame_mass&step=1")[0] == 200
    original = (comfy_server.output / path / video / "summary.json").read_bytes()
    before = peak_rss(comfy_server.pid)
    summary["latent_grid"][0] = 12000  # F x F would be 576 MB per block and head
    try:
        assert upload(url, f"{path}/{video}", "summary.json", json.dumps(summary).encode()) == 200
        status, _, body = fetch(f"{url}/wan_capture/slice?path={path}&video={video}&kind=frame_mass&step=1")
        assert status == 413 and len(body) < 200
        status, _, _ = fetch(f"{url}/wan_capture/slice?path={path}&video={video}&kind=sink&step=1")
        assert status in (400, 413)  # the received map's grid does not fit the planted summary either
        assert peak_rss(comfy_server.pid) - before < 100 * MIB
        assert fetch(f"{url}/wan_capture/videos?path={path}")[0] == 200
    finally:
        upload(url, f"{path}/{video}", "summary.json", original)


def test_bomb_stream_refused_at_the_bound_with_413_and_the_server_keeps_answering(comfy_server, saved):
    path, video = saved
    url = comfy_server.url
    bomb = gzip.compress(b"\0" * (512 * MIB), compresslevel=9)  # 0.5 GiB of zeros in about 0.5 MB
    folder = comfy_server.output / path / video / "token_flower"
    meta = json.loads((folder / "step_001_metadata.json").read_text())
    original_meta, keep = dict(meta), (folder / "step_001.npy").read_bytes()
    meta["attention_shape"] = [64, 64, 4096, 16]  # the campaign's metadata claimed a size that allowed 1 GiB
    assert upload(url, f"{path}/{video}/token_flower", "step_001_metadata.json", json.dumps(meta).encode()) == 200
    os.unlink(folder / "step_001.npy")
    assert upload(url, f"{path}/{video}/token_flower", "step_001.npy.gz", bomb) == 200
    before = peak_rss(comfy_server.pid)
    replies, t0 = [], time.monotonic()

    def hit():
        replies.append(fetch(f"{url}/wan_capture/slice?path={path}&video={video}&token=flower&step=1")[0])
    threads = [threading.Thread(target=hit) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        status, _, _ = fetch(f"{url}/wan_capture/videos?path={path}")  # an ordinary request meanwhile
        ordinary = time.monotonic() - t0
        for t in threads:
            t.join()
        assert replies == [413] * 8 and status == 200 and ordinary < 5
        assert peak_rss(comfy_server.pid) - before < 100 * MIB  # streamed: stopped at the recording's own size
    finally:
        (folder / "step_001.npy.gz").unlink()
        (folder / "step_001.npy").write_bytes(keep)
        (folder / "step_001_metadata.json").write_text(json.dumps(original_meta))


@pytest.mark.parametrize("name,content", [
    ("summary.json", b"[1, 2, 3]"),
    ("summary.json", b'{"latent_grid": [1e999999, 3, 4], "steps": [0]}'),
    ("summary.json", b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    ("summary.json", None),  # map_grid null
    ("kv_cache_events.json", b'{"events": "not a list"}'),
])
def test_tampered_json_is_a_4xx_naming_the_file_never_a_500(comfy_server, causal, name, content):
    path, video = causal
    url = comfy_server.url
    original = (comfy_server.output / path / video / name).read_bytes()
    if content is None:
        data = json.loads(original)
        data["map_grid"] = None
        content = json.dumps(data).encode()
    try:
        assert upload(url, f"{path}/{video}", name, content) == 200
        routes = ("summary", "slice?kind=frame_mass&step=1&", "slice?kind=sink&step=0&", "probe?frame=0&y=0&x=0&")
        for kind in routes if name == "summary.json" else routes[1:2]:  # the routes that read the file
            route = kind if "?" in kind else kind + "?"
            status, _, body = fetch(f"{url}/wan_capture/{route}path={path}&video={video}")
            assert 400 <= status < 500 and b"Traceback" not in body, (route, status, body[:200])
            if name == "summary.json" and status == 422:
                assert json.loads(body)["error"] == "damaged file: summary.json"
    finally:
        upload(url, f"{path}/{video}", name, original)


def test_tampered_json_read_by_the_analyzer_names_the_file(tmp_path):
    from test_storage import recorded
    from wan_capture import AttentionAnalyzer, SaveOptions, save_take
    from wan_capture.recording.analyzer import DamagedFileError
    save_take(recorded(steps=1), str(tmp_path), "b", SaveOptions())
    path = tmp_path / "b" / "attention_maps" / "prompt_000_vid001" / "summary.json"
    summary = json.loads(path.read_text())
    for field, bad in (("map_grid", None), ("blocks", "all"), ("tokens", [1, 2]), ("steps", [0.5])):
        path.write_text(json.dumps({**summary, field: bad}))
        with pytest.raises(DamagedFileError, match=rf"summary.json: '{field}' is not"):
            AttentionAnalyzer(str(tmp_path / "b" / "attention_maps")).summary("prompt_000_vid001")


def test_missing_and_outside_answer_alike_and_a_missing_video_is_a_400(comfy_server, saved, tmp_path):
    path, video = saved
    url = comfy_server.url + "/wan_capture"
    outside = tmp_path / "exists_outside"
    outside.mkdir()
    rel = os.path.relpath(outside, comfy_server.output)
    assert fetch(f"{url}/videos?path={urllib.parse.quote(rel)}")[0] == 404
    assert fetch(f"{url}/videos?path={urllib.parse.quote(rel + '_not_there')}")[0] == 404
    assert fetch(f"{url}/summary?path={path}")[0] == 400
    assert fetch(f"{url}/slice?path={path}&token=flower&step=0")[0] == 400


def test_probe_amplification_bounded_each_array_read_once(comfy_server, saved):
    path, video = saved
    url = comfy_server.url
    folder = comfy_server.output / path / video
    original = (folder / "summary.json").read_bytes()
    summary = json.loads(original)
    steps = summary["steps"]
    try:
        summary["arrays"] = [["cross", "flower", s, "cond", None, None] for s in range(6000)]
        summary["steps"] = list(range(6000))
        assert upload(url, f"{path}/{video}", "summary.json", json.dumps(summary).encode()) == 200
        t0 = time.monotonic()
        status, _, _ = fetch(f"{url}/wan_capture/probe?path={path}&video={video}&frame=0&y=0&x=0")
        assert status in (404, 413) and time.monotonic() - t0 < 5
        summary["arrays"] = [["cross", w["label"], s, "cond", None, None] for w in summary["tokens"] for s in steps] * 50
        assert upload(url, f"{path}/{video}", "summary.json", json.dumps(summary).encode()) == 200
        status, _, body = fetch(f"{url}/wan_capture/probe?path={path}&video={video}&frame=0&y=0&x=0")
        assert status == 200 and json.loads(body)["steps"] == steps  # the same array listed 50 times: read once
    finally:
        upload(url, f"{path}/{video}", "summary.json", original)


def test_load_confined_views_never_read_outside_the_output_folder(comfy_server, saved, tmp_path):
    """Load Attention Maps -> a view: an absolute tokens[].folder, a symlinked token folder or step file pointing
    outside are errors in the prompt, and nothing outside is read."""
    path, video = saved
    url = comfy_server.url
    folder = comfy_server.output / path / video
    secret = tmp_path / "secret"
    (secret / "token_flower").mkdir(parents=True)
    for f in (folder / "token_flower").iterdir():
        (secret / "token_flower" / f.name).write_bytes(f.read_bytes())
    original = (folder / "summary.json").read_bytes()
    view = {"1": {"class_type": "WanLoadAttentionMaps", "inputs": {"attention_maps_path": path, "video_id": video}},
            "2": {"class_type": "WanAttentionOverlay", "inputs": {"recorder": ["1", 0], "token": "flower",
                                                                   "steps": "0"}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}

    runs = []

    def error_of():
        runs.append(1)
        view["2"]["inputs"]["alpha"] = 0.5 + len(runs) / 100  # a new input each time: ComfyUI runs the view again
        entry = run_prompt(url, view)
        errors = execution_errors(entry)
        return errors[0]["exception_message"] if errors else None
    assert error_of() is None  # the untouched recording views fine
    try:
        summary = json.loads(original)
        summary["tokens"][0]["folder"] = str(secret / "token_flower")  # absolute
        (folder / "summary.json").write_text(json.dumps(summary))
        assert "no valid token folder" in error_of()
        (folder / "summary.json").write_bytes(original)
        os.rename(folder / "token_flower", folder / "token_flower_real")
        os.symlink(secret / "token_flower", folder / "token_flower")  # a symlinked token folder
        assert "outside the output folder" in error_of()
        os.unlink(folder / "token_flower")
        os.rename(folder / "token_flower_real", folder / "token_flower")
        step = folder / "token_flower" / "step_000.npy"
        keep = step.read_bytes()
        step.unlink()
        os.symlink(secret / "token_flower" / "step_000.npy", step)  # a symlinked step file
        assert "outside the output folder" in error_of()
        step.unlink()
        step.write_bytes(keep)
    finally:
        (folder / "summary.json").write_bytes(original)
    assert error_of() is None
