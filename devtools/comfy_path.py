"""The one place a folder is put on ``sys.path``: a ComfyUI tree, which is not an installed package (``comfy``,
``nodes``, ``folder_paths`` are top-level modules of the folder ComfyUI's ``main.py`` runs from, found first as there).
Everything else in this repository runs as a module (``python -m bench.cpu_recording``) and needs no path edit."""
from __future__ import annotations

import sys


def use_comfyui(path: str) -> None:
    """Make ComfyUI's top-level modules importable, ahead of anything of the same name, as its ``main.py`` has them."""
    if path not in sys.path:
        sys.path[:0] = [path]
