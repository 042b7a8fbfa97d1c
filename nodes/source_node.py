"""Node: Load Attention Maps (a saved attention_maps folder -> the recorder input of the view nodes)."""
from __future__ import annotations

import itertools
import os

import folder_paths
from comfy_api.latest import io

from ..wan_capture import AttentionAnalyzer
from ..wan_capture.recording.confine import confined
from ..wan_capture.views.maps import SavedRecording
from .attach_node import AttentionRecorder
from .widgets import settings


FINGERPRINT_ENTRIES = 4096  # entries of the folder the cache fingerprint stats (a real one holds a video each)


class LoadAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanLoadAttentionMaps",
            display_name="Load Attention Maps",
            category="Wan Attention Capture",
            description="Opens attention maps saved earlier (inside ComfyUI's output folder) for the view and mask "
                        "nodes, in place of a live recorder.",
            inputs=[
                io.String.Input("attention_maps_path", default="wan_attention/attention_maps",
                                tooltip="'<batch_name>/attention_maps' inside ComfyUI's output folder (what Save "
                                        "Attention Maps reports)."),
                io.String.Input("video_id", default="", optional=True,
                                tooltip="One saved video, e.g. prompt_000_vid001. Empty: every video of the folder, "
                                        "in order; the view nodes' batch_index picks one."),
            ],
            outputs=[AttentionRecorder.Output(display_name="recorder")],
        )

    @classmethod
    def fingerprint_inputs(cls, attention_maps_path: str, **kw):
        """Re-read when a save changed the folder (a video swapped in changes its parent's listing). Only a folder in
        the output folder is looked at (a path outside it is refused by ``execute``), and at most
        FINGERPRINT_ENTRIES of its entries."""
        try:
            path = confined(folder_paths.get_output_directory(), attention_maps_path.replace("\\", "/").strip("/"),
                            must_exist=True)
            with os.scandir(path) as entries:
                names = sorted(itertools.islice(entries, FINGERPRINT_ENTRIES + 1), key=lambda e: e.name)
            return (attention_maps_path, kw.get("video_id", ""), os.stat(path).st_mtime_ns,
                    tuple(e.stat().st_mtime_ns for e in names[:FINGERPRINT_ENTRIES]), len(names))
        except (OSError, ValueError):
            return (attention_maps_path, kw.get("video_id", ""))

    @classmethod
    def execute(cls, attention_maps_path: str, **kw) -> io.NodeOutput:
        video_id = settings(cls, kw)["video_id"].strip()
        out = folder_paths.get_output_directory()
        path = confined(out, attention_maps_path.replace("\\", "/").strip("/"))
        an = AttentionAnalyzer(path, confine_to=out)
        videos = an.list_videos()
        if video_id and video_id not in videos:
            raise ValueError(f"no saved video {video_id!r} in {attention_maps_path!r}; videos: {videos[:20]}")
        return io.NodeOutput(SavedRecording(path, [video_id] if video_id else videos, confine_to=out))


NODES = [LoadAttentionMaps]
