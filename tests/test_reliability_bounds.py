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


def _copy_graph(path: str, video: str, batch: str) -> dict:
    return {"1": {"class_type": "WanLoadAttentionMaps", "inputs": {"attention_maps_path": path, "video_id": video}},
            "2": {"class_type": "WanSaveAttention", "inputs": {"recorder": ["1", 0], "batch_name": batch}}}


def _folders(root) -> list:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_partial_copy_of_a_partial_recording_copies_what_is_there(comfy_server):
    """L4: Load -> Save (a copy) of a recording marked partial, whose summary lists arrays its interrupted save never
    wrote, failed late with a raw ENOENT and left one more partial folder per attempt. The copy now holds exactly the
    arrays the source has, byte for byte, marked partial with the source's reason and the arrays it lacked."""
    from api_util import execution_errors, run_prompt
    video = recorded_on(comfy_server, "partial_src")
    src = comfy_server.output / "partial_src" / "attention_maps" / video
    summary = json.loads((src / "summary.json").read_text())
    summary.update(status="partial", partial_reason="writing failed: interrupted")
    (src / "summary.json").write_text(json.dumps(summary))
    lost = src / "token_flower" / "step_001.npy"
    os.remove(lost)  # listed in the summary, never written
    entry = run_prompt(comfy_server.url, _copy_graph("partial_src/attention_maps", video, "partial_copy"))
    assert not execution_errors(entry), execution_errors(entry)
    report = [r for o in entry["outputs"].values() for r in o.get("attention_maps", [])]
    assert len(report) == 1 and report[0]["status"] == "partial", report
    root = comfy_server.output / "partial_copy" / "attention_maps"
    assert _folders(root) == [report[0]["video_id"]], _folders(root)  # the copy's folder alone: no *_partial
    for name in _folders(root):
        copy = root / name
        got = json.loads((copy / "summary.json").read_text())
        assert got["status"] == "partial" and "interrupted" in got["partial_reason"], got
        assert "token_flower/step_001" in got["partial_reason"], got["partial_reason"]
        src_files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()} - {"summary.json"}
        copy_files = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} - {"summary.json"}
        # every file of the source, less the metadata of the step whose array was never written
        assert copy_files == src_files - {"token_flower/step_001_metadata.json"}, copy_files ^ src_files
        for rel in src_files:
            if rel.endswith(".npy"):
                assert (src / rel).read_bytes() == (copy / rel).read_bytes(), rel
        assert ["cross", "flower", 1, "cond"] not in [a[:4] for a in got["arrays"]], got["arrays"]


def test_partial_copy_refused_leaves_no_folder(comfy_server):
    """A copy refused for a damaged source (a step file that decompresses past the recording's geometry) claimed a
    name and left a partial folder per attempt; the source is unchanged and the copy adds nothing, so a refused
    copy now leaves nothing behind (no claimed name, no hidden work folder)."""
    import gzip
    import io
    from api_util import execution_errors, run_prompt
    video = recorded_on(comfy_server, "refused_src")
    folder = comfy_server.output / "refused_src" / "attention_maps" / video / "token_flower"
    buf = io.BytesIO()
    np.save(buf, np.zeros((64, 64, 4096, 4), dtype=np.float32))
    os.remove(folder / "step_001.npy")
    (folder / "step_001.npy.gz").write_bytes(gzip.compress(buf.getvalue(), compresslevel=9))
    for attempt in range(3):
        entry = run_prompt(comfy_server.url, _copy_graph("refused_src/attention_maps", video, "refused_copy"))
        errors = execution_errors(entry)
        assert errors and "step_001.npy.gz" in errors[0]["exception_message"], errors
        assert "unchanged" in errors[0]["exception_message"], errors[0]["exception_message"]
    root = comfy_server.output / "refused_copy" / "attention_maps"
    assert _folders(root) == [], _folders(root)


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_probe_bounds_reads_each_file_once(comfy_server):
    """M2: /probe read one array per word and step even where words share a token folder: a 2.6 MB planted folder
    gave 4,096 reads (25 minutes of one worker). Each file is now read once per probe, whatever names it (counted
    by the bytes the server process reads), and a probe whose reads could pass MAX_PROBE_BYTES is refused first."""
    import gzip
    video = recorded_on(comfy_server, "probe_bounds")
    src = comfy_server.output / "probe_bounds" / "attention_maps" / video
    url = f"{comfy_server.url}/wan_capture/probe?path=probe_bounds/attention_maps&video={video}&frame=0&y=1&x=1"
    status, _, body = fetch(url)
    assert status == 200, body
    honest = json.loads(body)["words"]["flower"]
    for path in (src / "token_flower").glob("step_*.npy"):  # compressed files are read whole
        path.with_suffix(".npy.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    summary = json.loads((src / "summary.json").read_text())
    flower = next(t for t in summary["tokens"] if t["label"] == "flower")
    summary["tokens"] += [{**flower, "label": f"word{n}"} for n in range(300)]  # 300 more words, one folder
    summary["arrays"] += [["cross", f"word{n}", *a[2:]] for n in range(300) for a in summary["arrays"]
                          if a[:2] == ["cross", "flower"]]
    (src / "summary.json").write_text(json.dumps(summary))
    size = sum(p.stat().st_size for p in (src / "token_flower").glob("step_*.npy.gz"))
    before = _rchar(comfy_server.pid)
    status, _, body = fetch(url)
    read = _rchar(comfy_server.pid) - before
    assert status == 200, body
    got = json.loads(body)["words"]
    assert got["word299"] == got["flower"] and np.allclose(got["flower"]["mean"], honest["mean"], rtol=1e-6)
    # each step file once (not 301 times), the summary once, a little metadata
    assert read < 2 * size + (src / "summary.json").stat().st_size + (64 << 10), (read, size)
    summary.update(map_grid=[21, 2048, 1536], blocks=list(range(40)))  # planted geometry: each file may be 1 GiB
    (src / "summary.json").write_text(json.dumps(summary))
    before = _rchar(comfy_server.pid)
    status, _, body = fetch(url)
    assert status == 413 and json.loads(body) == {"error": "array too large"}, (status, body)
    assert _rchar(comfy_server.pid) - before < 1 << 20  # refused before reading any array
    from wan_capture.views.slices import MAX_PROBE_BYTES
    assert len(list((src / "token_flower").glob("step_*.npy.gz"))) * (1 << 30) > MAX_PROBE_BYTES


def _planted_npy_gz(path, shape, payload_bytes: int) -> None:
    """A compressed .npy whose header says ``shape`` (float32) followed by ``payload_bytes`` zero bytes."""
    import gzip
    import io
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(head.getvalue())
        zeros = bytes(1 << 20)
        for _ in range(payload_bytes >> 20):
            f.write(zeros)


@pytest.mark.parametrize("planted", ["header larger than the bound", "stream longer than its header"])
def test_header_bounds_compressed_npy_decompressed_only_to_its_header(tmp_path, planted):
    """M1: a compressed step file was decompressed up to the bound before anything was known of it (a bomb cost the
    whole bound: up to 1 GiB and seconds of a worker). Its header is read first now: a shape over the bound is refused
    after NPY_HEAD_BYTES, and a stream past its header's shape is damaged once it passes that shape."""
    import tracemalloc
    from wan_capture.recording.reader import ArrayTooLarge, DamagedFileError, load_array
    path = str(tmp_path / "step_001.npy.gz")
    bound = 32 << 20
    if planted == "header larger than the bound":
        _planted_npy_gz(path, (64, 64, 4096, 8), 64 << 20)
        expected = ArrayTooLarge
    else:
        _planted_npy_gz(path, (1, 1, 16, 1), 64 << 20)
        expected = DamagedFileError
    tracemalloc.start()
    try:
        with pytest.raises(expected, match="step_001.npy.gz|header"):
            load_array(path, bound)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20) + os.path.getsize(path), peak  # the compressed file and a few KB: never the bound


def test_bounded_replies_planted_summary_refused_before_parsing(comfy_server):
    """A 68 MB planted summary.json was parsed and re-sent on the event loop. Metadata files over MAX_JSON_BYTES are
    refused before they are read (422 naming the file), by /summary and every other reader."""
    from wan_capture.recording.reader import MAX_JSON_BYTES
    video = recorded_on(comfy_server, "big_summary")
    src = comfy_server.output / "big_summary" / "attention_maps" / video
    url = f"{comfy_server.url}/wan_capture/summary?path=big_summary/attention_maps&video={video}"
    status, _, body = fetch(url)
    assert status == 200 and json.loads(body)["video_id"] == video
    summary = json.loads((src / "summary.json").read_text())
    summary["padding"] = "x" * (MAX_JSON_BYTES + 1)
    (src / "summary.json").write_text(json.dumps(summary))
    status, _, body = fetch(url)
    assert status == 422 and json.loads(body) == {"error": "damaged file: summary.json"}, (status, body[:200])


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_bounded_replies_never_reading_clients_do_not_grow_the_server(comfy_server):
    """H1: heavy /slice replies were built whole and held until a client read them: each never-reading client added
    its replies to the server (six took it from 1.9 to 8.9 GiB). Now a reply holds one of the two heavy slots until it
    has left, so 8 clients pipelining 4 requests each for 66 MB maps (2.1 GB if every reply were held) grow the server
    by at most two replies and their workspace, and ComfyUI keeps answering meanwhile."""
    import socket
    import time
    from urllib.parse import urlparse
    video = recorded_on(comfy_server, "big_replies")
    src = comfy_server.output / "big_replies" / "attention_maps" / video
    grid = [21, 1024, 768]  # 16.5 M cells: one float32 map of a word is 66 MB
    summary = json.loads((src / "summary.json").read_text())
    summary["map_grid"] = grid
    (src / "summary.json").write_text(json.dumps(summary))
    meta_path = src / "token_flower" / "step_001_metadata.json"
    meta = json.loads(meta_path.read_text())
    cells = grid[0] * grid[1] * grid[2]
    blocks, heads = meta["attention_shape"][:2]
    meta.update(map_grid=grid, attention_shape=[blocks, heads, cells, 1], spatial_resolution=[cells, 1])
    meta_path.write_text(json.dumps(meta))
    np.save(src / "token_flower" / "step_001.npy", np.full((blocks, heads, cells, 1), 0.25, dtype=np.float16))
    path = f"/wan_capture/slice?path=big_replies/attention_maps&video={video}&token=flower&step=1"
    status, headers, body = fetch(comfy_server.url + path)
    assert status == 200 and len(body) == cells * 4, (status, len(body))
    del body
    url = urlparse(comfy_server.url)
    time.sleep(1.0)
    base = _rss(comfy_server.pid)
    held = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((url.hostname, url.port))
            for _ in range(4):  # pipelined, never read
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {url.hostname}\r\n\r\n".encode())
            held.append(s)
        peak, answered = base, 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, _rss(comfy_server.pid))
            status, _, _ = fetch(comfy_server.url + "/system_stats")
            answered += status == 200
            time.sleep(0.2)
    finally:
        for s in held:
            s.close()
    assert answered >= 10, answered
    assert peak - base < 800 << 20, (base >> 20, peak >> 20)  # two replies and their workspace, not 32 replies
