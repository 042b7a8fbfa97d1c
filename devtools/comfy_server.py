"""Start and stop a real headless ComfyUI for tests and the demo, against a temporary base directory, with this
pack (and optionally the tiny-model helper nodes) in its custom_nodes folder."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACK_DIR_NAME = "wan_attention_capture"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(comfyui: str, base_dir: str, tiny_nodes: bool = True, port: int = 0, timeout: float = 180.0):
    """A running server: ``(process, url, log_path)``; raises with the log's tail if it does not come up."""
    nodes_dir = os.path.join(base_dir, "custom_nodes")
    os.makedirs(nodes_dir, exist_ok=True)
    links = {PACK_DIR_NAME: ROOT}
    if tiny_nodes:
        links["wan_capture_tiny_nodes"] = os.path.join(HERE, "tiny_nodes")
    for name, target in links.items():
        link = os.path.join(nodes_dir, name)
        if not os.path.lexists(link):
            os.symlink(target, link)
    port = port or free_port()
    log_path = os.path.join(base_dir, "comfyui.log")
    log = open(log_path, "w")
    args = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base_dir, "--disable-auto-launch"]
    if os.path.isdir(os.path.join(comfyui, "comfy_compatibility")):
        # hiddenswitch's ComfyUI loads custom nodes from the base directory only through its entry point
        cmd, cwd = [os.path.join(os.path.dirname(sys.executable), "comfyui")] + args, base_dir
    else:
        cmd, cwd = [sys.executable, os.path.join(comfyui, "main.py")] + args, comfyui
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/object_info/WanAttachRecorder", timeout=2) as r:
                if r.status == 200 and b"WanAttachRecorder" in r.read():
                    return proc, url, log_path
        except OSError:
            time.sleep(0.5)
    stop(proc)
    with open(log_path) as f:
        tail = f.read()[-4000:]
    raise RuntimeError(f"ComfyUI did not start at {url} (exit {proc.poll()}):\n{tail}")


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
