"""The pack's ComfyExtension: the list of its nodes."""
from comfy_api.latest import ComfyExtension, io

from .attach_node import NODES as _ATTACH
from .mask_node import NODES as _MASK
from .retired import NODES as _RETIRED
from .save_node import NODES as _SAVE
from .source_node import NODES as _SOURCE
from .tracker_node import NODES as _TRACKER
from .view_nodes import NODES as _VIEWS


def _register_routes() -> None:
    from server import PromptServer  # only a running ComfyUI server has an instance
    if getattr(PromptServer, "instance", None) is not None:
        from .viewer_routes import register
        register(PromptServer.instance.routes)


class WanAttentionCaptureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*_ATTACH, *_TRACKER, *_SAVE, *_SOURCE, *_VIEWS, *_MASK, *_RETIRED]


async def comfy_entrypoint() -> WanAttentionCaptureExtension:
    _register_routes()
    return WanAttentionCaptureExtension()
