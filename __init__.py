"""Wan Attention Capture: ComfyUI nodes that record and show where Wan video models attend."""
import importlib.util

# Outside ComfyUI (pytest collecting this folder as a package, a script importing wan_capture) there are no nodes.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes.extension import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"  # the interactive viewer (frontend extension)
