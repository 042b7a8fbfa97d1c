"""The headless runner against a real ComfyUI: ids, resume after a kill without duplicates, failures reported."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from api_util import get, wait_idle
from devtools.tiny_workflow import to_tiny
from wan_capture.batch.runner import Job, plan_jobs, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = "a beautiful [(flower:2.5) near a tree|(tree:3) next to a flower]"
EXPECTED = ["prompt_000_vid001", "prompt_000_vid002", "prompt_001_vid001", "prompt_001_vid002"]


def tiny_workflow(tmp_path):
    api = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")))
    path = tmp_path / "tiny_t2v.api.json"
    path.write_text(json.dumps(to_tiny(api)))
    return str(path)


def runner(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "wan_capture", "run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_plan_and_prepare_are_stable():
    jobs = plan_jobs([TEMPLATE], [7, 9])
    assert [j.video_id for j in jobs] == EXPECTED and [j.seed for j in jobs] == [7, 9, 7, 9]
    api = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_t2v_attention.json")))
    g = prepare(api, jobs[3], "my batch")
    assert g["4"]["inputs"]["text"] == "a beautiful (tree:3) next to a flower" and g["9"]["inputs"]["seed"] == 9
    assert g["20"]["inputs"]["prompt_id"] == "prompt_001" and g["20"]["inputs"]["video_number"] == 2
    assert g["22"]["inputs"]["filename_prefix"] == "my_batch/prompt_001_vid002/token_overlay"
    with pytest.raises(ValueError, match="no 'Save Attention Maps' node"):
        prepare({"1": {"class_type": "KSampler", "inputs": {}}}, Job("p", "x", 1, 1), "b")
    # the negative prompt's tracker keeps its text: only the positive one gets the job's prompt
    sink = json.load(open(os.path.join(ROOT, "example_workflows", "api", "wan21_attention_sink_study.json")))
    negative = sink["7"]["inputs"]["negative_tracking"][0]
    g = prepare(sink, jobs[1], "b")
    assert g["4"]["inputs"]["text"] == jobs[1].prompt
    assert g[negative]["inputs"]["text"] == sink[negative]["inputs"]["text"] != jobs[1].prompt


def test_batch_of_four_resumes_after_kill_without_duplicates(comfy_server, tmp_path):
    wf = tiny_workflow(tmp_path)
    state = tmp_path / "state"
    args = ["--workflow", wf, "--template", TEMPLATE, "--seeds", "1,2", "--server", comfy_server.url,
            "--batch-name", "study", "--state-dir", str(state), "--output-dir", str(comfy_server.output)]
    before = len(get(comfy_server.url + "/history"))
    first = runner(args)
    manifest = state / "study.manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["videos"]) >= 1:
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = json.loads(manifest.read_text())["videos"]
    assert 1 <= len(done_before) < 4, "the kill should land mid-batch"
    wait_idle(comfy_server.url)  # a prompt in flight at the kill still finishes on the server
    second = runner(args)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    videos = json.loads(manifest.read_text())["videos"]
    assert sorted(videos) == EXPECTED and all(v["status"] == "done" for v in videos.values())
    folder = comfy_server.output / "study" / "attention_maps"
    assert sorted(os.listdir(folder)) == EXPECTED
    executed = len(get(comfy_server.url + "/history")) - before
    assert executed == 4, f"{executed} prompts ran for 4 videos"
    assert "already done" in out and "4 done, 0 failed" in out
    summary = json.load(open(folder / "prompt_001_vid002" / "summary.json"))
    assert summary["prompt_weighted"] == "a beautiful (tree:3) next to a flower" and summary["seed"] == 2
    assert summary["prompt"] == "a beautiful tree next to a flower"
    assert summary["status"] == "complete"


def test_failure_is_reported_and_batch_goes_on(comfy_server, tmp_path):
    api = json.loads(open(tiny_workflow(tmp_path)).read())
    api["4"]["inputs"]["mode"] = "listed"
    api["4"]["inputs"]["words"] = "flower"  # variation 1 has no flower -> fails; variation 0 has one
    wf = tmp_path / "listed.json"
    wf.write_text(json.dumps(api))
    out = runner(["--workflow", str(wf), "--template", "a [flower in a field|dog on a beach]", "--seeds", "3",
                  "--server", comfy_server.url, "--batch-name", "fails", "--state-dir", str(tmp_path),
                  "--download", str(tmp_path / "dl")])
    text, _ = out.communicate(timeout=300)
    assert out.returncode == 1, text
    videos = json.load(open(tmp_path / "fails.manifest.json"))["videos"]
    assert videos["prompt_000_vid001"]["status"] == "done"
    assert videos["prompt_001_vid001"]["status"] == "failed" and "'flower' is in neither the prompt 'a dog on a beach'" in videos["prompt_001_vid001"]["error"]
    got = tmp_path / "dl" / "fails" / "attention_maps" / "prompt_000_vid001" / "summary.json"
    assert json.load(open(got))["status"] == "complete"
