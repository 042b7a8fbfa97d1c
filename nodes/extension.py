"""The pack's ComfyExtension: the list of its nodes."""
from comfy_api.latest import ComfyExtension, io

from .attach_node import NODES as _ATTACH
from .heatmap_node import NODES as _HEATMAP
from .mask_node import NODES as _MASK
from .save_node import NODES as _SAVE
from .tracker_node import NODES as _TRACKER


def _register_routes() -> None:
    from server import PromptServer  # only a running ComfyUI server has an instance
    if getattr(PromptServer, "instance", None) is not None:
        from .viewer_routes import register
        register(PromptServer.instance.routes)


class WanAttentionCaptureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*_ATTACH, *_TRACKER, *_SAVE, *_HEATMAP, *_MASK]


async def comfy_entrypoint() -> WanAttentionCaptureExtension:
    _register_routes()
    return WanAttentionCaptureExtension()
