"""Saves under faults on real ComfyUI servers (issue 34): a save killed with SIGKILL at random points, and two
servers saving the same names at once in every pair of modes. Prints what it finds and writes it as JSON.

    COMFYUI_PATH=<ComfyUI checkout> python -m bench.save_faults [--kills 10] [--rounds 20] [--json out.json]

* ``kill``: one server records and saves the tiny t2v example again and again (a new seed each time); the server is
  killed with SIGKILL at a random moment while its save is writing (between the hidden work folder appearing and the
  recording being in place, as timed on an undisturbed save), then restarted on the same folders. After the last
  kill one more save runs (its sweep tidies dead saves' folders). Checked: every recording complete or marked
  partial, every recording reported complete before a kill still complete, no hidden folder or lock left.
* ``pairs``: two servers whose output folders are one folder; for each pair of modes (``overwrite`` off/on on each
  server), ``rounds`` times both save the same name at once. Checked after each round: every folder reported is on
  disk, complete, and holds as many files as its summary says it wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import threading
import time

from devtools import comfy_server
from devtools.tiny_comfy import COMFYUI, NOT_FOUND
from devtools.tiny_workflow import tiny_example
from wan_capture import AttentionAnalyzer

MODES = {False: "new_name", True: "replace"}


def prompt(seed: int, overwrite: bool) -> dict:
    api = tiny_example("wan21_t2v_attention.json")
    api["9"]["inputs"]["seed"] = seed  # a new seed: ComfyUI's cache would otherwise skip the sampler and the save
    api["20"]["inputs"].update(batch_name="faults", prompt_id="race", overwrite=overwrite)
    return api


def run(url: str, api: dict, timeout: float = 300) -> dict:
    from tests.api_util import run_prompt
    return run_prompt(url, api, timeout)


def reports(entry: dict) -> list:
    return [r for o in entry.get("outputs", {}).values() for r in o.get("attention_maps", [])]


def hidden(root: str) -> list:
    return sorted(n for n in os.listdir(root) if n.startswith(".")) if os.path.isdir(root) else []


def files_ok(root: str, video: str) -> bool:
    path = os.path.join(root, video)
    s = AttentionAnalyzer(root).summary(video)
    return s.get("status") == "complete" and s.get("files_written") == sum(len(f) for _, _, f in os.walk(path))


def kill_bench(kills: int, rng: random.Random) -> dict:
    base = tempfile.mkdtemp(prefix="save_faults_kill_")
    root = os.path.join(base, "output", "faults", "attention_maps")
    proc, url, _ = comfy_server.start(COMFYUI, base)
    seed = 1000
    try:
        # an undisturbed save: how long its writing takes (hidden work folder seen -> recording in place)
        window = []
        for _ in range(2):
            seed += 1
            done = threading.Event()
            seen = {}

            def watch():
                while not done.is_set():
                    writing = any(".tmp-" in n for n in hidden(root))
                    if writing and "start" not in seen:
                        seen["start"] = time.monotonic()
                    if not writing and "start" in seen and "end" not in seen:
                        seen["end"] = time.monotonic()
                    time.sleep(0.0005)
            t = threading.Thread(target=watch)
            t.start()
            entry = run(url, prompt(seed, False))
            done.set()
            t.join()
            window.append(seen.get("end", 0.0) - seen.get("start", 0.0))
        complete_before = {r["video_id"] for r in reports(entry)} | set(os.listdir(root)) - set(hidden(root))
        write_s = max(window)
        killed = []
        for k in range(kills):
            seed += 1
            from tests.api_util import post
            status, body = post(url + "/prompt", {"prompt": prompt(seed, rng.random() < 0.5)})
            assert status == 200, body
            deadline = time.monotonic() + 300
            while not any(".tmp-" in n for n in hidden(root)) and time.monotonic() < deadline:
                time.sleep(0.001)
            delay = rng.uniform(0, write_s)
            time.sleep(delay)
            before = set(os.listdir(root))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            after = set(os.listdir(root))
            killed.append({"delay_s": delay, "writing_at_kill": any(".tmp-" in n for n in before),
                           "new_recordings": sorted(n for n in after - before if not n.startswith(".")),
                           "hidden_after_kill": sorted(n for n in after if n.startswith("."))})
            proc, url, _ = comfy_server.start(COMFYUI, base)
        seed += 1
        final = run(url, prompt(seed, False))  # a save after the restarts: its sweep tidies what dead saves left
        statuses = {}
        an = AttentionAnalyzer(root)
        for video in an.list_videos():
            try:
                statuses[video] = an.summary(video).get("status")
            except Exception as e:  # noqa: BLE001 - an unreadable recording is a finding, not a crash
                statuses[video] = f"unreadable: {type(e).__name__}"
        lost = sorted(v for v in complete_before if statuses.get(v) != "complete")
        return {"kills": killed, "write_seconds_undisturbed": window, "statuses": statuses,
                "complete_before_kills": sorted(complete_before), "lost": lost, "hidden_left": hidden(root),
                "final_save": [r["status"] for r in reports(final)],
                "ok": not lost and not hidden(root) and all(s in ("complete", "partial") for s in statuses.values())}
    finally:
        comfy_server.stop(proc)


def pairs_bench(rounds: int) -> dict:
    base_a = tempfile.mkdtemp(prefix="save_faults_a_")
    base_b = tempfile.mkdtemp(prefix="save_faults_b_")
    os.makedirs(os.path.join(base_a, "output"))
    os.symlink(os.path.join(base_a, "output"), os.path.join(base_b, "output"))  # one output folder, two servers
    root = os.path.join(base_a, "output", "faults", "attention_maps")
    servers = [comfy_server.start(COMFYUI, base_a), comfy_server.start(COMFYUI, base_b)]
    results, seed = {}, 0
    try:
        for mode_a in (False, True):
            for mode_b in (False, True):
                name = f"{MODES[mode_a]} + {MODES[mode_b]}"
                bad, reported = [], 0
                for r in range(rounds):
                    seed += 1
                    entries = [None, None]

                    def go(i, overwrite):
                        entries[i] = run(servers[i][1], prompt(seed * 2 + i, overwrite))
                    threads = [threading.Thread(target=go, args=(i, m)) for i, m in enumerate((mode_a, mode_b))]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    for entry in entries:
                        for rep in reports(entry):
                            reported += 1
                            ok = rep["status"] == "complete" and os.path.isdir(os.path.join(root, rep["video_id"])) \
                                and files_ok(root, rep["video_id"])
                            if not ok:
                                bad.append({"round": r, "report": rep})
                    if hidden(root):
                        bad.append({"round": r, "hidden": hidden(root)})
                results[name] = {"rounds": rounds, "reported": reported, "bad": bad}
                print(f"pairs {name}: {rounds} rounds, {reported} saves reported, {len(bad)} not on disk complete",
                      flush=True)
        return {"modes": results, "folders_at_end": len(AttentionAnalyzer(root).list_videos()),
                "ok": all(not v["bad"] for v in results.values())}
    finally:
        for proc, _, _ in servers:
            comfy_server.stop(proc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if COMFYUI is None:
        print(NOT_FOUND)
        return 0
    out = {}
    if args.kills:
        out["kill"] = kill_bench(args.kills, random.Random(args.seed))
        k = out["kill"]
        print(f"kill: {len(k['kills'])} saves killed with SIGKILL, {sum(x['writing_at_kill'] for x in k['kills'])} "
              f"of them with the work folder on disk (undisturbed writing "
              f"{max(k['write_seconds_undisturbed']) * 1000:.0f} ms); recordings: "
              f"{sorted(k['statuses'].values())}; lost {k['lost']}; hidden left {k['hidden_left']}", flush=True)
    if args.rounds:
        out["pairs"] = pairs_bench(args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print("ok" if all(v["ok"] for v in out.values()) else "FAILED")
    return 0 if all(v["ok"] for v in out.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
