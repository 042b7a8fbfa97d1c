"""The Ray batch runner for real, in a network namespace with only loopback (Ray binds to the machine's address
otherwise): a two-node local Ray cluster, tiny Wan models on CPU, six videos. Prints one JSON line for
tests/test_ray_batch.py. Usage (as root): unshare -n sh -c 'ip link set lo up && python tests/ray_batch_case.py DIR'

1. the batch through --server (two ComfyUI servers this script starts) and through Ray (two actors, each starting
   its own server): both timed, every video saved once and complete, the arrays byte-identical;
2. one actor killed while it runs a video: the video runs again, nothing lost;
3. the driver (``python -m wan_capture batch --ray ADDRESS``) killed after its first video, then run again: what
   was done is not run twice.
Every server and the cluster are stopped by the ids started here.
"""
import asyncio
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["OMP_NUM_THREADS"] = "1"  # the same threads in every server: the same float sums, byte for byte
TEMPLATES = ["a (flower:2.5) near a tree", "[a|the] (tree:3) next to a flower"]
SEEDS = [1, 2]


def workflow() -> dict:
    from devtools.tiny_workflow import tiny_example
    return tiny_example("wan21_t2v_attention.json")


def base_directory(work: str) -> str:
    base = os.path.join(work, "base")
    nodes = os.path.join(base, "custom_nodes")
    os.makedirs(nodes, exist_ok=True)
    for name, target in (("wan_attention_capture", ROOT),
                         ("wan_capture_tiny_nodes", os.path.join(ROOT, "devtools", "tiny_nodes"))):
        if not os.path.lexists(os.path.join(nodes, name)):
            os.symlink(target, os.path.join(nodes, name))
    return base


def arrays(output: str, batch: str) -> dict:
    """sha256 of every array file of a batch, by its path under the video folder."""
    out = {}
    for path in sorted(glob.glob(os.path.join(output, batch, "attention_maps", "*", "**", "*.np*"), recursive=True)):
        rel = os.path.relpath(path, os.path.join(output, batch, "attention_maps"))
        with open(path, "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def summaries(output: str, batch: str) -> dict:
    out = {}
    for path in glob.glob(os.path.join(output, batch, "attention_maps", "*", "summary.json")):
        with open(path) as f:
            s = json.load(f)
        out[os.path.basename(os.path.dirname(path))] = {"status": s["status"], "saved_at": s.get("saved_at"),
                                                        "mtime": os.path.getmtime(path)}
    return out


def manifest(state: str, batch: str) -> dict:
    try:
        with open(os.path.join(state, f"{batch}.manifest.json")) as f:
            return json.load(f)["videos"]
    except (OSError, ValueError, KeyError):
        return {}


def main(work: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from devtools.tiny_comfy import COMFYUI
    from wan_capture.batch.local_server import LocalServer, ServerConfig
    from wan_capture.batch.ray_runner import RayBatchConfig, run_batch_ray
    from wan_capture.batch.runner import plan_jobs, run_batch
    wf, jobs = workflow(), plan_jobs(TEMPLATES, SEEDS)
    base = base_directory(work)
    state, out_url, out_ray = (os.path.join(work, n) for n in ("state", "out_url", "out_ray"))
    result = {"videos": len(jobs)}
    quiet = lambda *a: None  # noqa: E731

    # 1a. two servers by URL
    servers = [LocalServer(ServerConfig(COMFYUI, base, out_url, ["--cpu"]), os.path.join(work, f"url{i}.log"))
               for i in range(2)]
    try:
        t_start = time.monotonic()
        urls = [s.start() for s in servers]
        result["url_start_seconds"] = time.monotonic() - t_start
        t0 = time.monotonic()
        m = asyncio.run(run_batch(wf, jobs, urls, "study", state, output_dir=out_url, log=quiet))
        result["url_seconds"] = time.monotonic() - t0
        result["url_done"] = sorted(v for v, e in m.videos.items() if e["status"] == "done")
    finally:
        for s in servers:
            s.stop()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    server = ServerConfig(COMFYUI, base, None, ["--cpu"])
    try:
        # 1b. two actors, one a node
        config = RayBatchConfig(address=cluster.address, server=server, actors=2)
        t0 = time.monotonic()
        m = asyncio.run(run_batch_ray(wf, jobs, "study", os.path.join(work, "state_ray"), config, out_ray, log=quiet))
        result["ray_seconds"] = time.monotonic() - t0
        result["ray_done"] = sorted(v for v, e in m.videos.items() if e["status"] == "done")
        result["ray_actors"] = sorted({e["server"] for e in m.videos.values()})
        a, b = arrays(out_url, "study"), arrays(out_ray, "study")
        result["arrays"] = len(a)
        result["arrays_identical"] = a == b
        result["ray_summaries"] = summaries(out_ray, "study")

        # 1c. each node writing locally, the files sent back to the driver's output folder (checksums checked)
        copy = RayBatchConfig(address=cluster.address, server=server, actors=2, copy_back=True)
        out_copy = os.path.join(work, "out_copy")
        m = asyncio.run(run_batch_ray(wf, jobs, "study", os.path.join(work, "state_copy"), copy, out_copy, log=quiet))
        result["copy_done"] = sorted(v for v, e in m.videos.items() if e["status"] == "done")
        result["copy_arrays_identical"] = arrays(out_copy, "study") == a
        result["copy_summaries"] = summaries(out_copy, "study")

        # 2. an actor killed mid-video
        killed = {}

        def killer():
            while not ray.is_initialized():
                time.sleep(0.05)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    actor = ray.get_actor("wan-capture-fault-0")
                    status = ray.get(actor.status.remote(), timeout=5)
                except Exception:  # noqa: BLE001  not created yet
                    time.sleep(0.1)
                    continue
                if status["current"]:
                    time.sleep(0.5)  # well inside the video
                    killed.update(video=status["current"], actor_pid=status["pid"], server_pid=status["server_pid"])
                    ray.kill(actor, no_restart=False)  # Ray restarts it: a new server
                    return
                time.sleep(0.05)
        thread = threading.Thread(target=killer)
        thread.start()
        m = asyncio.run(run_batch_ray(wf, jobs, "fault", os.path.join(work, "state_fault"), config, out_ray, log=quiet))
        thread.join()
        result["killed"] = killed
        result["fault_done"] = sorted(v for v, e in m.videos.items() if e["status"] == "done")
        result["fault_summaries"] = summaries(out_ray, "fault")
        result["fault_arrays_identical"] = arrays(out_ray, "fault") == a
        result["fault_hidden_left"] = sorted(os.path.basename(p) for p in glob.glob(
            os.path.join(out_ray, "fault", "attention_maps", ".*")))
        time.sleep(2)
        result["killed_server_alive"] = bool(killed.get("server_pid")) and os.path.exists(f"/proc/{killed['server_pid']}")

        # 3. the driver killed after its first video, then run again
        wf_path = os.path.join(work, "workflow.json")
        with open(wf_path, "w") as f:
            json.dump(wf, f)
        cmd = [sys.executable, "-m", "wan_capture", "batch", "--workflow", wf_path, "--seeds", "1,2",
               "--batch-name", "driver", "--state-dir", os.path.join(work, "state_driver"), "--output-dir", out_ray,
               "--ray", cluster.address, "--comfyui", COMFYUI, "--base-directory", base, "--comfy-arg=--cpu",
               "--ray-actors", "2"] + [x for t in TEMPLATES for x in ("--template", t)]
        env = dict(os.environ, PYTHONPATH=ROOT)
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if any(e["status"] == "done" for e in manifest(os.path.join(work, "state_driver"), "driver").values()):
                break
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        before = manifest(os.path.join(work, "state_driver"), "driver")
        done_before = {v: summaries(out_ray, "driver").get(v) for v, e in before.items() if e["status"] == "done"}
        result["driver_done_before_kill"] = sorted(done_before)
        time.sleep(3)  # Ray ends the dead driver's actors (and their servers with them)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        result["driver_rerun_rc"] = second.returncode
        result["driver_rerun_said"] = second.stdout.strip().splitlines()[:1]
        after = summaries(out_ray, "driver")
        result["driver_done_after"] = sorted(v for v, e in manifest(os.path.join(work, "state_driver"),
                                                                    "driver").items() if e["status"] == "done")
        result["driver_not_rerun"] = all(after.get(v) == s for v, s in done_before.items())
        result["driver_summaries"] = after
        result["driver_arrays_identical"] = arrays(out_ray, "driver") == a
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":  # run with PYTHONPATH=<repository> (tests/test_ray_batch.py does)
    print(json.dumps(main(sys.argv[1])))
