"""The interactive viewer at Wan 2.1 1.3B's real size, in Chromium against a real ComfyUI (a benchmark, not a test).

Writes a recording of the 1.3B shape with the pack's own save path (``devtools.real_size``: 81 frames at 480x832,
21 x 30 x 52 map cells, 30 blocks, 30 steps, 4 words, sink statistics, the decoded frames; synthetic values), serves
it from a headless ComfyUI, opens the standalone viewer in Debian's chromium through playwright-core and reports the
time to the first picture, per step / frame / block / word / colormap / alpha change (median and worst), the point
probe, and the playback rate. The goals: first picture under 0.5 s, every change under 50 ms, the probe under 50 ms,
playback at Wan's 16 frames per second.

    python -m bench.viewer_real_size [--json bench/results_viewer_real_size.json]

Needs ComfyUI (``COMFYUI_PATH``), node, npm and /usr/bin/chromium.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from devtools import comfy_server, real_size
from devtools.tiny_comfy import COMFYUI, NOT_FOUND

NODE_DIR = os.path.join(ROOT, ".cache", "node")
SCRIPT = "browser_real_size.mjs"


def run_browser(url: str, timeout: int = 600) -> dict:
    """The page script's JSON (``tests/browser_real_size.mjs``), run beside playwright-core in ``.cache/node``."""
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "playwright-core")):
        subprocess.run(["npm", "install", "--prefix", NODE_DIR, "--no-audit", "--no-fund", "playwright-core@1"],
                       check=True, capture_output=True, timeout=300)
    for name in (SCRIPT, "browser_launch.mjs"):  # the script imports the shared launch from beside it
        shutil.copy(os.path.join(ROOT, "tests", name), os.path.join(NODE_DIR, name))
    out = subprocess.run(["node", os.path.join(NODE_DIR, SCRIPT), url], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode:
        raise RuntimeError(out.stdout + out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    if COMFYUI is None:
        print(NOT_FOUND, file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="wan_capture_viewer_bench_")
    try:
        video = real_size.write(os.path.join(base, "output"))
        proc, url, _ = comfy_server.start(COMFYUI, base, tiny_nodes=False)
        try:
            page = (f"{url}/extensions/{comfy_server.PACK_DIR_NAME}/viewer.html"
                    f"?path=real_size/attention_maps&video={video}")
            r = run_browser(page)
        finally:
            comfy_server.stop(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if r["errors"]:
        raise RuntimeError(f"page errors: {r['errors']}")
    rows = [("first picture", r["firstPicture"], r["firstPicture"], 500)]
    for name, values in r["times"].items():
        rows.append((name.replace("_", " ") + " change", statistics.median(values), max(values), 50))
    rows.append(("point probe (table + marker)", statistics.median(r["probe"]["ms"]), max(r["probe"]["ms"]), 50))
    rows.append(("  of which the probe route", statistics.median(r["probe"]["route"]), max(r["probe"]["route"]), 50))
    print(f"{'what':34s} {'median ms':>10s} {'worst ms':>9s} {'goal ms':>8s}")
    for name, med, worst, goal in rows:
        print(f"{name:34s} {med:10.1f} {worst:9.1f} {goal:8d}")
    print(f"{'playback':34s} {r['playback']['fps']:10.1f} fps (goal 16)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [dict(zip(("what", "median_ms", "worst_ms", "goal_ms"), row)) for row in rows],
                       "playback_fps": r["playback"]["fps"], "raw": r["times"]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
