"""Wan Attention Capture: ComfyUI nodes that record and show where Wan video models attend."""
import importlib.util

# Outside ComfyUI (pytest collecting this folder as a package, a script importing wan_capture) there are no nodes;
# hiddenswitch's ComfyUI has comfy_api installed everywhere, and folder_paths only once it loads custom nodes.
if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes.extension import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"  # the interactive viewer (frontend extension)

# hiddenswitch's pip-installable ComfyUI logs an ERROR for a package without NODE_CLASS_MAPPINGS, then loads its V3
# entry point anyway; upstream ComfyUI loads the V3 entry point only where NODE_CLASS_MAPPINGS is absent
if importlib.util.find_spec("comfy_compatibility") is not None:
    NODE_CLASS_MAPPINGS: dict = {}
