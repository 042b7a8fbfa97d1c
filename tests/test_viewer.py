"""The interactive viewer: its server routes (byte-exact slices, refused paths) and the page in a real browser."""
import io
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from api_util import execution_errors, run_prompt
from devtools.tiny_workflow import to_tiny
from wan_capture import AttentionAnalyzer
from wan_capture.views.colormaps import apply_colormap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_DIR = os.path.join(ROOT, ".cache", "node")


@pytest.fixture(scope="module")
def recording(comfy_server):
    api = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")))
    api["7"]["inputs"].update(record="cross attention + sink statistics", options=["opts", 0])
    api["opts"] = {"class_type": "WanRecordingOptions", "inputs": {"store_per_head": True}}
    api["20"]["inputs"]["batch_name"] = "viewer"
    entry = run_prompt(comfy_server.url, to_tiny(api))
    report = [r for o in entry["outputs"].values() for r in o.get("attention_maps", [])][0]
    return "viewer/attention_maps", report["video_id"]


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_slices_are_byte_exact(comfy_server, recording):
    path, video = recording
    an = AttentionAnalyzer(str(comfy_server.output / path))
    status, headers, body = fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&token=flower&step=2&block=1&head=0")
    assert status == 200 and headers["X-Shape"] == "3,4,4"
    want = an.load_step(video, "flower", 2)[1, 0].mean(axis=-1).reshape(3, 4, 4).astype("<f4")
    assert body == want.tobytes()
    status, headers, body = fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&kind=sink&step=0")
    want = an.load_self_attention(video, 0, "received").mean(axis=(0, 1)).reshape(3, 4, 4).astype("<f4")
    assert status == 200 and body == want.tobytes()
    status, _, body = fetch(f"{comfy_server.url}/wan_capture/summary?path={path}&video={video}")
    summary = json.loads(body)
    assert status == 200 and len(summary["frames_saved"]) == 9 and summary["frames"] == 9
    status, headers, body = fetch(f"{comfy_server.url}/wan_capture/frame?path={path}&video={video}&index=4")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"


def test_paths_outside_the_output_folder_are_refused(comfy_server, recording, tmp_path):
    path, video = recording
    secret = tmp_path / "secret_dir"
    (secret / video).mkdir(parents=True)
    (secret / video / "summary.json").write_text("{}")
    os.symlink(secret, comfy_server.output / "escape_link")
    url = comfy_server.url + "/wan_capture"
    for bad in ["../../etc", "/etc", "viewer/../../x", "escape_link", "viewer\\..\\..", ""]:
        status, _, _ = fetch(f"{url}/videos?path={urllib.parse.quote(bad)}")
        assert status in (404, 400), (bad, status)  # outside answers as missing does
    assert fetch(f"{url}/summary?path={path}&video=..%2F..%2F..%2Fetc")[0] == 404
    assert fetch(f"{url}/summary?path={path}&video=nope_vid001")[0] == 404
    assert fetch(f"{url}/slice?path={path}&video={video}&token=rose&step=0")[0] == 404
    assert fetch(f"{url}/frame?path={path}&video={video}&index=99")[0] == 404
    log = open(comfy_server.log).read()
    assert "secret_dir" not in log and "escape_link" not in log


def playwright_ready():
    if not shutil.which("node") or not os.path.exists("/usr/bin/chromium"):
        return False
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "playwright-core")):
        if not shutil.which("npm"):
            return False
        subprocess.run(["npm", "install", "--prefix", NODE_DIR, "--no-audit", "--no-fund", "playwright-core@1"],
                       capture_output=True, timeout=300)
    return os.path.isdir(os.path.join(NODE_DIR, "node_modules", "playwright-core"))


def browser(script_name: str, *args: str, timeout: int = 240) -> dict:
    """Run one of tests/browser_*.mjs in Debian's chromium (copied beside playwright-core in .cache/node): its JSON
    line, after checking it exited cleanly and saw no page errors."""
    script = os.path.join(NODE_DIR, script_name)
    for name in (script_name, "browser_launch.mjs"):  # the scripts import the shared launch from beside them
        shutil.copy(os.path.join(ROOT, "tests", name), os.path.join(NODE_DIR, name))
    out = subprocess.run(["node", script, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["errors"], result["errors"]
    return result


def test_viewer_in_chromium_draws_the_array(comfy_server, recording, tmp_path):
    if not playwright_ready():
        pytest.skip("BROWSER TEST SKIPPED: needs Debian's chromium (/usr/bin/chromium), node and npm "
                    "(playwright-core is installed into .cache/node)")
    path, video = recording
    shot = os.path.join(ROOT, ".cache", "viewer_screenshot.png")  # kept as a test artefact
    page = f"{comfy_server.url}/extensions/wan_attention_capture/viewer.html?path={path}&video={video}"
    result = browser("browser_viewer.mjs", page, shot)
    an = AttentionAnalyzer(str(comfy_server.output / path))
    steps = an.list_steps(video, "flower")
    for key, step, frame in (("before", steps[0], 0), ("after", steps[-1], 1)):
        r = result[key]
        assert r["step"] == step and r["frame"] == frame and r["shape"] == [3, 4, 4]
        maps = an.load_step(video, "flower", step).mean(axis=(0, 1, 3)).reshape(3, 4, 4)[frame]
        lo, hi = maps.min(), maps.max()
        np.testing.assert_allclose(r["range"], [lo, hi], rtol=1e-5)
        want = np.round(apply_colormap((maps - lo) / (hi - lo), "viridis") * 255).reshape(-1, 3)
        got = np.array(r["cells"])
        assert np.abs(got - want).max() <= 2, (got, want)
    assert result["before"]["cells"] != result["after"]["cells"]
    assert os.path.getsize(shot) > 1000




def test_frontend_loads_an_example_and_the_save_node_has_the_viewer(comfy_server):
    """The real ComfyUI frontend: our extension registers, a UI example loads whole, the Save node carries the viewer."""
    if not playwright_ready():
        pytest.skip("BROWSER TEST SKIPPED: needs Debian's chromium (/usr/bin/chromium), node and npm")
    example = os.path.join(ROOT, "example_workflows", "wan21_t2v_attention.json")
    shot = os.path.join(ROOT, ".cache", "frontend_screenshot.png")
    result = browser("browser_frontend.mjs", comfy_server.url, example, shot)
    # frontend 1.27 raises one error of its own while it registers its core settings (the canvas navigation mode's
    # onChange sets Comfy.Canvas.LeftMouseClickBehavior before that setting exists): no frame of it is the pack's
    assert not any("wan" in e.lower() or "viewer" in e.lower() for e in result["frontend"]), result["frontend"]
    wf = json.load(open(example))
    assert result["types"] == sorted(n["type"] for n in wf["nodes"])
    assert result["links"] == len(wf["links"])
    assert result["hasViewer"] and "attention_viewer" in result["saveWidgets"]


def test_causal_recording_slices_frame_mass_and_sinks(comfy_server):
    """A causal Wan recording saved under the output folder: the viewer's received map and the causal frame x frame
    matrix are the analyzer's assembled arrays, byte for byte, with the sink frames in X-Sinks."""
    import torch
    from wan_capture import RecordingPlan, SaveOptions, record, save_take
    from devtools.tiny_causal import CausalWanModel, causal_generate
    torch.manual_seed(0)
    model = CausalWanModel(dim=256, num_heads=2, num_layers=2, local_attn_size=4, sink_size=1, frame_tokens=4).eval()
    with record(model, RecordingPlan(record_cross=False, record_sink_stats=True)) as rec:
        causal_generate(model, torch.randn(1, 16, 6, 4, 4), torch.randn(1, 8, 4096), 2, cache_frames=4)
    video = save_take(rec.latest, str(comfy_server.output), "causal_view", SaveOptions())[0].video_id
    path = "causal_view/attention_maps"
    an = AttentionAnalyzer(str(comfy_server.output / path))
    status, headers, body = fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&kind=frame_mass&step=1")
    want = an.get_causal_self_attention(video, 1, "frame_mass").mean(axis=0).mean(axis=0).astype("<f4")
    assert status == 200 and headers["X-Shape"] == "1,6,6" and headers["X-Sinks"] == "0"
    assert body == want.tobytes() and want[4, 1] == 0 and want[4, 0] > 0  # frame 1 evicted, the sink kept
    status, headers, body = fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&kind=sink&step=1")
    want = np.nan_to_num(an.get_causal_self_attention(video, 1, "received")).mean(axis=0).mean(axis=0).reshape(6, 2, 2)
    # the route averages each chunk's blocks and heads before assembling (so a real 14B video assembles one map,
    # not 1600): the same mean in another order, equal to float32 rounding
    assert status == 200 and len(body) == want.size * 4
    np.testing.assert_allclose(np.frombuffer(body, "<f4").reshape(6, 2, 2), want, rtol=1e-6, atol=0)


def test_bad_viewer_parameters_are_refused_not_defaulted(comfy_server, recording):
    path, video = recording
    base = f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&token=flower"
    for bad in ("&branch=sideways", "&kind=everything", "&head=abc", "&block=-1", "&step=x", "&step=99999999"):
        status, _, _ = fetch(base + bad)
        assert status == 400, bad
    assert fetch(base + "&branch=cond&head=0&step=0")[0] == 200


def copy_recording(comfy_server, recording, name):
    """A private copy of the module's recording under the output folder, for tests that damage files."""
    path, video = recording
    dest = comfy_server.output / name / "attention_maps"
    shutil.copytree(comfy_server.output / path / video, dest / video)
    return f"{name}/attention_maps", video, dest / video


def test_symlink_inside_a_video_folder_is_not_followed_out(comfy_server, recording, tmp_path):
    path, video, folder = copy_recording(comfy_server, recording, "symlinked")
    secret = tmp_path / "secret_outside"
    secret.mkdir()
    (secret / "summary.json").write_text('{"status": "complete", "secret": "TOPSECRET"}')
    shutil.copytree(folder / "token_flower", secret / "token_flower")
    (folder / "summary.json").unlink()
    os.symlink(secret / "summary.json", folder / "summary.json")
    status, _, body = fetch(f"{comfy_server.url}/wan_capture/summary?path={path}&video={video}")
    assert status == 404 and b"TOPSECRET" not in body
    shutil.rmtree(folder / "token_flower")
    os.symlink(secret / "token_flower", folder / "token_flower")
    status, _, _ = fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&token=flower&step=0")
    assert status == 404
    assert "secret_outside" not in open(comfy_server.log).read()


def plant_bomb(step):
    """``step``.gz: a 1 GiB float32 array of zeros, gzipped to about a megabyte, in place of ``step``."""
    import gzip as gz
    n = 1 << 28
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
    with gz.open(str(step) + ".gz", "wb", compresslevel=1) as f:
        f.write(header.getvalue())
        zeros = bytes(1 << 24)
        for _ in range(n * 4 // len(zeros)):
            f.write(zeros)
    step.unlink()
    assert os.path.getsize(str(step) + ".gz") < 8 << 20


def test_bomb_slice_refused_with_413_and_the_server_keeps_answering(comfy_server, recording):
    """A 1 GiB array gzipped to about a megabyte, planted as a step file: refused before it is decompressed, off the
    event loop, while /system_stats answers within a second."""
    import threading
    import time
    path, video, folder = copy_recording(comfy_server, recording, "bombed")
    step = folder / "token_flower" / "step_000.npy"
    plant_bomb(step)
    received = folder / "self_attention" / "step_000_received.npy"
    os.link(str(step) + ".gz", str(received) + ".gz")
    received.unlink()
    assert fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&kind=sink&step=0")[0] == 413
    result = {}
    t = threading.Thread(target=lambda: result.update(
        hostile=fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&token=flower&step=0")))
    t.start()
    t0 = time.perf_counter()
    status, _, _ = fetch(f"{comfy_server.url}/system_stats")
    answered = time.perf_counter() - t0
    t.join(60)
    assert status == 200 and answered < 1.0
    assert result["hostile"][0] == 413


def test_damaged_viewer_files_give_4xx_without_paths(comfy_server, recording):
    path, video, folder = copy_recording(comfy_server, recording, "damaged_view")
    step = folder / "token_flower" / "step_001.npy"
    step.write_bytes(step.read_bytes()[:50])
    status, _, body = fetch(f"{comfy_server.url}/wan_capture/slice?path={path}&video={video}&token=flower&step=1")
    assert status == 422 and b"damaged" in body and b"/" not in body.replace(b"application/json", b"")
    assert "damaged_view" not in open(comfy_server.log).read()


def test_stale_files_never_mix_through_the_server(comfy_server):
    """The campaign's reproduction: two UI-style runs into the same Save folder, the second with another seed, one
    step and one word. Nothing of the first run is left in the video, and the reader sees only the second."""
    api = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")))
    api["20"]["inputs"]["batch_name"] = "stale_server"
    first = to_tiny(json.loads(json.dumps(api)))
    run_prompt(comfy_server.url, first)
    second = to_tiny(json.loads(json.dumps(api)))
    second["9"]["inputs"]["seed"] = 7
    second["7"]["inputs"]["steps"] = "0"
    second["4"]["inputs"]["text"] = "a beautiful (flower:2.5) near a tree, gentle wind, sunny garden"
    second["20"]["inputs"]["overwrite"] = True  # the same folder, replaced (the default would write <video>_2)
    entry = run_prompt(comfy_server.url, second)
    video = [r for o in entry["outputs"].values() for r in o.get("attention_maps", [])][0]["video_id"]
    assert video == "prompt_000_vid001"
    an = AttentionAnalyzer(str(comfy_server.output / "stale_server" / "attention_maps"))
    assert an.summary(video)["seed"] == 7 and an.list_tokens(video) == ["flower"]
    assert an.list_steps(video, "flower") == [0] and an.get_temporal_evolution(video, "flower").shape[0] == 1
    folder = comfy_server.output / "stale_server" / "attention_maps" / video
    assert not (folder / "token_tree").exists() and sorted(p.name for p in (folder / "token_flower").iterdir()) == \
        ["step_000.npy", "step_000_metadata.json"]


def test_point_probe_playback_side_by_side_legend_and_png_export_in_chromium(comfy_server, recording):
    """A click on a frame cell shows each tracked word's value there over the steps, equal to the saved arrays at that
    cell; playback advances the frames and pauses; words side by side; the legend bar; the PNG export."""
    if not playwright_ready():
        pytest.skip("BROWSER TEST SKIPPED: needs Debian's chromium (/usr/bin/chromium), node and npm")
    import base64
    import io

    from PIL import Image
    from wan_capture.views.colormaps import apply_colormap
    path, video = recording
    shot = os.path.join(ROOT, ".cache", "viewer_probe_screenshot.png")
    page = f"{comfy_server.url}/extensions/wan_attention_capture/viewer.html?path={path}&video={video}"
    r = browser("browser_probe.mjs", page, shot)
    an = AttentionAnalyzer(str(comfy_server.output / path))
    steps = an.list_steps(video, "flower")
    probe = r["probe"]["data"]
    assert probe["cell"] == [1, 2, 3] and probe["steps"] == steps
    assert sorted(probe["words"]) == an.list_tokens(video) == ["flower", "tree"]
    cell = (1 * 4 + 2) * 4 + 3
    for word in ("flower", "tree"):
        arrays = [an.load_step(video, word, s) for s in steps]  # [blocks, heads, spatial, pieces]
        per_block = np.array([a[:, :, cell, :].mean(axis=(1, 2)) for a in arrays]).T
        np.testing.assert_allclose(probe["words"][word]["blocks"], per_block, rtol=1e-6)
        np.testing.assert_allclose(probe["words"][word]["mean"], per_block.mean(axis=0), rtol=1e-6)
        shown = dict(r["probe"]["table"])[word]  # the table, as printed (4 significant digits)
        np.testing.assert_allclose(shown, per_block.mean(axis=0), rtol=1e-3)
    assert r["probe"]["lines"] == 2
    assert len(r["seen"]) >= 3 and "\u275a" in r["playLabel"]  # frames advanced, the button shows pause
    assert r["pausedAt"] == r["stillAt"]
    assert r["compare"] == ["flower", "tree"]
    lo_rgb, hi_rgb = (np.round(apply_colormap(np.array([x]), r["cmap"])[0] * 255) for x in (0.0, 1.0))
    assert np.abs(np.array(r["barEnds"]) - np.array([lo_rgb, hi_rgb])).max() <= 2
    assert r["legendText"].strip().startswith("per_video:")
    assert r["png"].startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(r["png"].split(",", 1)[1])))
    assert img.size == (r["width"], r["height"]) and np.asarray(img.convert("RGB")).std() > 0
    assert fetch(f"{comfy_server.url}/wan_capture/probe?path={path}&video={video}&frame=9&y=0&x=0")[0] == 400
    assert fetch(f"{comfy_server.url}/wan_capture/probe?path=../x&video={video}&frame=0&y=0&x=0")[0] == 404


def test_screenshot_every_node_fully_on_screen_at_default_zoom(comfy_server):
    """Each node of the pack, created in the real frontend at zoom 1, fits the screen with all its inputs."""
    if not playwright_ready():
        pytest.skip("BROWSER TEST SKIPPED: needs Debian's chromium (/usr/bin/chromium), node and npm")
    shot = os.path.join(ROOT, ".cache", "nodes_screenshot.png")
    r = browser("browser_nodes.mjs", comfy_server.url, shot)
    width, height = r["viewport"]
    types = {n["type"] for n in r["nodes"]}
    assert {"WanAttachRecorder", "WanRecordingOptions", "WanAttentionOverlay", "WanAttentionMatrix",
            "WanSaveAttention", "WanAttentionMask"} <= types
    assert not r["domOutside"], r["domOutside"]  # the Save node's viewer stays inside the node
    for n in r["nodes"]:
        x0, y0, x1, y1 = n["box"]
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height, n  # whole, on screen
    from PIL import Image
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[0] >= height and img.shape[1] >= width and img.std() > 5  # the page holds the canvas


def test_a_0_1_0_workflow_loads_with_retired_nodes_that_say_what_replaced_them(comfy_server):
    """A UI workflow saved with 0.1.0 (tests/data) loads in the real frontend without errors; its old nodes are
    there, marked retired, with descriptions naming the nodes that replace them (queued, they stop with that)."""
    if not playwright_ready():
        pytest.skip("BROWSER TEST SKIPPED: needs Debian's chromium (/usr/bin/chromium), node and npm")
    old = os.path.join(ROOT, "tests", "data", "workflow_0.1.0_t2v.json")
    shot = os.path.join(ROOT, ".cache", "frontend_0.1.0_screenshot.png")
    result = browser("browser_frontend.mjs", comfy_server.url, old, shot)
    assert {"WanAttachAttentionRecorder", "WanSaveAttentionMaps", "WanAttentionHeatmap"} <= set(result["types"])
    info = json.loads(fetch(f"{comfy_server.url}/object_info/WanAttentionHeatmap")[2])["WanAttentionHeatmap"]
    assert info["deprecated"] and "Attention Heatmap" in info["description"]


def test_recording_model_head_mean_only_recording_same_error_from_node_and_route(comfy_server):
    """One meaning of "mean": a per-head request on a recording that kept only the heads' mean is the same clear
    error from the viewer's route (400, its message) and from a view node in a real prompt; never the mean."""
    api = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")))
    api["20"]["inputs"]["batch_name"] = "mean_only"
    entry = run_prompt(comfy_server.url, to_tiny(api))
    video = [r for o in entry["outputs"].values() for r in o.get("attention_maps", [])][0]["video_id"]
    summary = json.loads(fetch(f"{comfy_server.url}/wan_capture/summary?path=mean_only/attention_maps&video={video}")[2])
    assert summary["heads"] == [-1]
    status, _, body = fetch(f"{comfy_server.url}/wan_capture/slice?path=mean_only/attention_maps&video={video}"
                            f"&token=flower&step=0&head=1")
    route_error = json.loads(body)["error"]
    assert status == 400 and "heads were recorded as their mean" in route_error
    view = {"1": {"class_type": "WanLoadAttentionMaps", "inputs": {"attention_maps_path": "mean_only/attention_maps"}},
            "2": {"class_type": "WanAttentionOverlay", "inputs": {"recorder": ["1", 0], "token": "flower",
                                                                   "heads": "1", "steps": "0"}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    entry = run_prompt(comfy_server.url, view)
    errors = execution_errors(entry)
    assert errors and errors[0]["exception_message"].strip() == route_error


def test_recording_model_save_node_copies_loaded_maps_in_a_real_prompt(comfy_server, recording):
    """Load Attention Maps -> Save Attention Maps writes a copy into another batch: every array byte for byte."""
    path, video = recording
    prompt = {"1": {"class_type": "WanLoadAttentionMaps", "inputs": {"attention_maps_path": path, "video_id": video}},
              "2": {"class_type": "WanSaveAttention", "inputs": {"recorder": ["1", 0], "batch_name": "copied"}}}
    entry = run_prompt(comfy_server.url, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"]["2"]["attention_maps"][0]
    assert report["status"] == "complete" and report["video_id"] == video
    source = comfy_server.output / path / video
    copied = comfy_server.output / "copied" / "attention_maps" / video
    arrays = sorted(str(p.relative_to(source)) for p in source.rglob("*.npy"))
    assert len(arrays) > 10 and arrays == sorted(str(p.relative_to(copied)) for p in copied.rglob("*.npy"))
    for rel in arrays:
        assert (source / rel).read_bytes() == (copied / rel).read_bytes(), rel
    assert len(list((copied / "frames").glob("*.png"))) == 9


def real_size_video(server) -> str:
    """The real-size recording (written once per server: it is 457 MB)."""
    from devtools import real_size
    folder = server.output / "real_size" / "attention_maps"
    if folder.is_dir() and AttentionAnalyzer(str(folder)).list_videos():
        return AttentionAnalyzer(str(folder)).list_videos()[0]
    return real_size.write(str(server.output), batch="real_size")


def test_viewer_under_preload_the_users_step_change_goes_first(comfy_server):
    """At the real size, step changes made while the decoded frames still preload: no frame request starts between
    the input and the drawn picture (the preload waits for it), and every frame still arrives. The times are printed
    (the figure is a bench's, bench/viewer_real_size.py, not asserted here)."""
    if not playwright_ready():
        pytest.skip("BROWSER TEST SKIPPED: needs Debian's chromium (/usr/bin/chromium), node and npm")
    video = real_size_video(comfy_server)
    page = f"{comfy_server.url}/extensions/wan_attention_capture/viewer.html?path=real_size/attention_maps&video={video}"
    r = browser("browser_preload.mjs", page, timeout=600)
    print("\nstep changes during preload (ms):", [round(c["ms"], 1) for c in r["changes"]],
          "frames loaded at each:", [c["framesLoaded"] for c in r["changes"]], "of", r["total"])
    assert r["total"] == 81 and r["framesAtEnd"] == 81
    assert any(c["framesLoaded"] < r["total"] for c in r["changes"]), "the preload ended before the changes"
    assert all(c["framesStartedMeanwhile"] == 0 for c in r["changes"]), r["changes"]


def test_viewer_real_size_recording_in_chromium(comfy_server):
    """The viewer on a recording of Wan 2.1 1.3B's real size (21 x 30 x 52 cells, 81 frames at 480x832, 30 blocks, 30
    steps, 4 words, sink statistics), written by the pack's save path: every control answers, the picture's cells are
    the saved maps in the colormap, the probe equals the arrays, playback advances. (Its speed is measured by
    bench/viewer_real_size.py, never asserted here.)"""
    if not playwright_ready():
        pytest.skip("BROWSER TEST SKIPPED: needs Debian's chromium (/usr/bin/chromium), node and npm")
    video = real_size_video(comfy_server)
    path = "real_size/attention_maps"
    page = f"{comfy_server.url}/extensions/wan_attention_capture/viewer.html?path={path}&video={video}"
    r = browser("browser_real_size.mjs", page, timeout=600)
    assert r["firstPicture"] > 0 and all(len(v) >= 5 for v in r["times"].values())
    an = AttentionAnalyzer(str(comfy_server.output / path))
    pic = r["picture"]
    assert pic["shape"] == [21, 30, 52] and (pic["width"], pic["height"]) == (832, 480)
    maps = an.load_step(video, pic["token"], pic["step"]).astype(np.float64).mean(axis=(0, 1, 3))  # [cells]
    frame = maps.reshape(21, 30, 52)[pic["frame"]]
    lo, hi = frame.min(), frame.max()
    np.testing.assert_allclose(pic["range"], [lo, hi], rtol=1e-4)
    want = np.round(apply_colormap((frame - lo) / (hi - lo), "viridis") * 255).reshape(-1, 3)
    assert np.abs(np.array(pic["cells"]) - want).max() <= 2
    probe = r["probe"]
    cell = (probe["cell"][0] * 30 + probe["cell"][1]) * 52 + probe["cell"][2]
    steps = an.list_steps(video, probe["words"][0])
    want = [an.load_step(video, probe["words"][0], s)[:, :, cell, :].mean() for s in steps]
    np.testing.assert_allclose(probe["mean"], want, rtol=1e-5)
    assert r["playback"]["drawn"] >= 5  # frames advanced while playing
