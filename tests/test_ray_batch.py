"""The batch runner on Ray, for real: a two-node local Ray cluster in a network namespace with only loopback, tiny
models on CPU, six videos (tests/ray_batch_case.py does the work and reports; this file asserts)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from devtools.tiny_comfy import COMFYUI, NOT_FOUND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_RAY = "RAY NOT INSTALLED: pip install .[ray] to run the Ray batch tests"
NO_NAMESPACE = "RAY BATCH TESTS NEED A NETWORK NAMESPACE: unshare -n (root) and ip, to keep Ray on loopback"


def namespace_ready() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    if COMFYUI is None:
        pytest.skip(NOT_FOUND)
    if importlib.util.find_spec("ray") is None:
        pytest.skip(NO_RAY)
    if not namespace_ready():
        pytest.skip(NO_NAMESPACE)
    work = tmp_path_factory.mktemp("ray_batch")
    script = os.path.join(ROOT, "tests", "ray_batch_case.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" "{script}" '
                          f'"{work}"'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("\nRay batch:", json.dumps({k: result[k] for k in ("url_start_seconds", "url_seconds", "ray_seconds", "killed",
                                                            "driver_done_before_kill")}))
    return result


def test_ray_batch_same_folders_and_arrays_as_the_url_runner(ray_run):
    r = ray_run
    assert r["videos"] == 6 and len(r["url_done"]) == 6 and r["ray_done"] == r["url_done"]
    assert len(r["ray_actors"]) == 2  # both actors ran videos
    assert sorted(r["ray_summaries"]) == r["ray_done"]  # every video saved once (no _2 folders)
    assert all(s["status"] == "complete" for s in r["ray_summaries"].values())
    assert r["arrays"] >= 6 * 3 and r["arrays_identical"]


def test_ray_batch_copy_back_brings_each_video_to_the_driver(ray_run):
    r = ray_run
    assert r["copy_done"] == r["url_done"] and r["copy_arrays_identical"]
    assert sorted(r["copy_summaries"]) == r["url_done"]
    assert all(s["status"] == "complete" for s in r["copy_summaries"].values())


def test_ray_batch_an_actor_lost_mid_video_reruns_it(ray_run):
    r = ray_run
    assert r["killed"].get("video"), "the actor was never seen on a video"
    assert r["fault_done"] == r["url_done"] and r["fault_arrays_identical"]
    assert sorted(r["fault_summaries"]) == r["url_done"]
    assert all(s["status"] == "complete" for s in r["fault_summaries"].values())
    assert r["fault_hidden_left"] == []  # no half-written folder left behind
    assert not r["killed_server_alive"]  # the lost actor's server ended with it


def test_ray_batch_the_driver_killed_then_resumed_runs_nothing_twice(ray_run):
    r = ray_run
    assert r["driver_done_before_kill"], "the driver was killed before any video was done"
    assert r["driver_rerun_rc"] == 0 and r["driver_done_after"] == r["url_done"]
    assert r["driver_not_rerun"]  # the videos done before the kill were not saved again
    assert all(s["status"] == "complete" for s in r["driver_summaries"].values())
    assert r["driver_arrays_identical"]
