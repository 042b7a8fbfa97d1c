"""The viewer's routes under load on a real ComfyUI server: 64 concurrent clients against a real-size recording
(Wan 2.1 1.3B's 21x30x52 grid, 30 blocks, 30 steps, 4 words, sink statistics), half of them never reading their
replies. Measures the server's resident memory as the clients come and after they go, ComfyUI's own /system_stats
latency, and the legitimate clients' /slice latency.

    COMFYUI_PATH=<ComfyUI checkout> python -m bench.viewer_load [--clients 64] [--seconds 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from urllib.parse import urlencode, urlparse

from devtools import comfy_server, real_size
from devtools.tiny_comfy import COMFYUI, NOT_FOUND

MIB = 1 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if COMFYUI is None:
        print(NOT_FOUND)
        return 1
    base = tempfile.mkdtemp(prefix="viewer_load_")
    video = real_size.write(os.path.join(base, "output"), batch="real_size")
    proc, url, log = comfy_server.start(COMFYUI, base)
    host, port = urlparse(url).hostname, urlparse(url).port
    summary = json.load(urllib.request.urlopen(f"{url}/wan_capture/summary?path=real_size/attention_maps&video={video}"))
    words = [t["label"] for t in summary["tokens"]]
    steps = len(summary["steps"])

    def query():
        kind = random.choice(["token", "token", "sink"])
        q = {"path": "real_size/attention_maps", "video": video, "step": random.randrange(steps),
             "block": random.choice(["mean", str(random.randrange(30))]), "head": "mean"}
        if kind == "sink":
            q["kind"] = "sink"
        else:
            q["token"] = random.choice(words)
        return "/wan_capture/slice?" + urlencode(q)

    stop = threading.Event()
    slice_ms, stats_ms, samples = [], [], []
    errors = []

    def reader():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(url + query(), timeout=120) as r:
                    r.read()
                slice_ms.append((time.perf_counter() - t0) * 1000)
            except OSError as e:
                errors.append(f"slice: {e}")

    held = []

    def never_reads():  # sends its requests and never reads a byte of the replies
        while not stop.is_set():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            s.connect((host, port))
            for _ in range(8):  # pipelined: the server has a reply waiting behind each
                s.sendall(f"GET {query()} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            held.append(s)
            stop.wait(2.0)

    def monitor():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=30) as r:
                    r.read()
                stats_ms.append((time.perf_counter() - t0) * 1000)
            except OSError as e:
                errors.append(f"system_stats: {e}")
            samples.append(rss(proc.pid))
            stop.wait(0.05)
    try:
        for _ in range(3):  # warm: the arrays in the page cache, the routes imported
            urllib.request.urlopen(url + query(), timeout=120).read()
        baseline = rss(proc.pid)
        threads = [threading.Thread(target=monitor)]
        threads += [threading.Thread(target=reader) for _ in range(args.clients // 2)]
        threads += [threading.Thread(target=never_reads) for _ in range(args.clients - args.clients // 2)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        peak = max(samples)
        for s in held:
            s.close()
        time.sleep(5)
        after = rss(proc.pid)
    finally:
        comfy_server.stop(proc)
    out = {"clients": args.clients, "never_reading": args.clients - args.clients // 2, "seconds": args.seconds,
           "never_read_connections": len(held),
           "rss_mib": {"baseline": baseline / MIB, "peak": peak / MIB, "after_clients_left": after / MIB,
                       "peak_over_baseline": (peak - baseline) / MIB},
           "system_stats_ms": {"p50": percentile(stats_ms, 50), "p99": percentile(stats_ms, 99), "n": len(stats_ms)},
           "slice_ms": {"p50": percentile(slice_ms, 50), "p99": percentile(slice_ms, 99), "n": len(slice_ms),
                        "mean": statistics.mean(slice_ms) if slice_ms else float("nan")},
           "errors": errors[:10], "error_count": len(errors)}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
