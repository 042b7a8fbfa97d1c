"""A ComfyUI server process this program starts and owns (the Ray runner's actors start one each on their node): on
a free loopback port, with the output folder it is given, ended with its owner.

The server is the user's ComfyUI (its ``main.py``, or the ``comfyui`` entry point of a pip-installed one) with this
pack in its ``custom_nodes``; nothing of ComfyUI is imported here.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import List, Optional

READY_ROUTE = "/object_info/WanAttachRecorder"  # up, and with this pack loaded


@dataclass
class ServerConfig:
    """How to start one ComfyUI server.

    Args:
        comfyui: the ComfyUI checkout (holding ``main.py``; a pip-installed one holds ``comfy_compatibility``).
        base_directory: ComfyUI's ``--base-directory`` (its ``custom_nodes`` and ``models``); None: ComfyUI's own.
        output_directory: where it writes outputs (the recordings); None: the base directory's ``output``.
        args: further arguments (e.g. ``["--cpu"]``).
        python: the Python that runs it (default: this one).
        start_timeout: seconds to wait for it to answer with this pack loaded.
    """

    comfyui: str
    base_directory: Optional[str] = None
    output_directory: Optional[str] = None
    args: List[str] = field(default_factory=list)
    python: str = sys.executable
    start_timeout: float = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: end when the process that started it ends, even by SIGKILL (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalServer:
    """One ComfyUI server process: ``start()``, ``url``, ``alive()``, ``stop()``; ``log`` is its console output."""

    def __init__(self, config: ServerConfig, log_path: str):
        self.config, self.log_path = config, log_path
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self) -> str:
        """Start it and wait until it answers with this pack loaded; returns its URL (raises with its log's tail)."""
        c = self.config
        port = free_port()
        args = ["--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", *c.args]
        if c.base_directory:
            args += ["--base-directory", c.base_directory]
        if c.output_directory:
            os.makedirs(c.output_directory, exist_ok=True)
            args += ["--output-directory", c.output_directory]
        if os.path.isdir(os.path.join(c.comfyui, "comfy_compatibility")):  # hiddenswitch's pip-installable ComfyUI
            cmd, cwd = [os.path.join(os.path.dirname(c.python), "comfyui"), *args], c.base_directory or c.comfyui
        else:
            cmd, cwd = [c.python, os.path.join(c.comfyui, "main.py"), *args], c.comfyui
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + c.start_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + READY_ROUTE, timeout=2) as r:
                    if r.status == 200 and b"WanAttachRecorder" in r.read():
                        return self.url
            except OSError:
                time.sleep(0.5)
        self.stop()
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log_path) - 4000))
            tail = f.read().decode("utf-8", "replace")
        raise RuntimeError(f"ComfyUI at {c.comfyui} did not start with the pack loaded (exit {self.proc.poll()}); "
                           f"its log {self.log_path} ends:\n{tail}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
