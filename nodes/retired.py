"""The 0.1.0 nodes that 0.2.0 replaced: a saved workflow that still has them loads, shows what to use instead, and
stops with that message when queued (their settings moved, so running them on guesses would record the wrong thing)."""
from __future__ import annotations

from comfy_api.latest import io

from .attach_node import AttentionRecorder

_RETIRED = {
    "WanAttachAttentionRecorder": (
        "Attach Attention Recorder (0.1.0)", [io.Model.Output(display_name="MODEL"),
                                              AttentionRecorder.Output(display_name="recorder")],
        "replaced in 0.2.0 by 'Attach Attention Recorder' (model, token_tracking, record, steps, blocks) plus the "
        "optional 'Attention Recording Options' node (text_positions, heads, branch, window frames, store_per_block/"
        "head, storage_dtype, spatial_downsample_factor, budgets). record_cross_attention/record_sink_stats became "
        "the 'record' choice; storage_interval N became steps 'every N'."),
    "WanSaveAttentionMaps": (
        "Save Attention Maps (0.1.0)", [io.String.Output(display_name="attention_maps_path")],
        "replaced in 0.2.0 by 'Save Attention Maps': storage_interval, storage_dtype and spatial_downsample_factor "
        "are now set once where recording is (Attach Attention Recorder 'steps', Attention Recording Options), and "
        "an existing video folder is kept unless overwrite is on."),
    "WanAttentionHeatmap": (
        "Attention Heatmap (0.1.0)", [io.Image.Output(display_name="IMAGE")],
        "replaced in 0.2.0 by one node per view: 'Attention Heatmap' (token overlay), 'Attention Statistic Overlay' "
        "(sink overlay), 'Attention Grid' (token grid, block grid), 'Attention Matrix' (self-attention window, frame x "
        "frame mass), with colours in 'Heatmap Style' and saved maps opened by 'Load Attention Maps'."),
}


def _retired(node_id: str, name: str, outputs: list, message: str) -> type[io.ComfyNode]:
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id=node_id, display_name=name, category="Wan Attention Capture/retired",
                         description=f"Retired: {message}", inputs=[], outputs=outputs, is_deprecated=True)

    def execute(cls, **_kw) -> io.NodeOutput:
        raise ValueError(f"'{name}' ({node_id}) was {message} Replace the node in the workflow (the example "
                         "workflows show the new graph).")
    return type(node_id, (io.ComfyNode,), {"define_schema": classmethod(define_schema),
                                           "execute": classmethod(execute)})


NODES = [_retired(nid, *spec) for nid, spec in _RETIRED.items()]
