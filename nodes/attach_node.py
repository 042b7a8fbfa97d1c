"""Node: Attach Attention Recorder (MODEL -> MODEL + recorder handle)."""
from __future__ import annotations

from comfy_api.latest import io

from ..wan_capture import FrameWindow, PlanError, Recorder, RecordingPlan, parse_index_list
from .comfy_attach import attach_recorder

AttentionRecorder = io.Custom("ATTENTION_RECORDER")
TokenTracking = io.Custom("WAN_TOKEN_TRACKING")


def _frames(text: str, field_name: str):
    frames = parse_index_list(text, field_name)
    if frames is None:
        return None
    if frames != tuple(range(frames[0], frames[-1] + 1)):
        raise PlanError(f"RecordingPlan.{field_name}: frames must be one contiguous range like '3' or '2-4', got {text!r}")
    return frames[0], frames[-1] + 1


def build_plan(kw: dict, tracking=None) -> RecordingPlan:
    """The recording plan from the node's widgets (and a token-tracking spec, when connected)."""
    positions = tracking.positions if tracking is not None else parse_index_list(kw["text_positions"], "text_positions")
    window = None
    q = _frames(kw["window_query_frames"], "window_query_frames")
    if q is not None:
        k = _frames(kw["window_key_frames"], "window_key_frames") or (0, None)
        window = FrameWindow(q[0], q[1], k[0], k[1])
    steps = parse_index_list(kw["steps"], "steps")
    return RecordingPlan(
        text_positions=positions or (), record_cross=kw["record_cross_attention"],
        record_sink_stats=kw["record_sink_stats"], window=window,
        blocks=parse_index_list(kw["blocks"], "blocks"), heads=parse_index_list(kw["heads"], "heads"),
        steps=steps, storage_interval=1 if steps else kw["storage_interval"], branch=kw["branch"],
        store_per_block=kw["store_per_block"], store_per_head=kw["store_per_head"],
        storage_dtype=kw["storage_dtype"], spatial_downsample_factor=kw["spatial_downsample_factor"],
        memory_budget_mb=kw["memory_budget_mb"], chunk_budget_mb=kw["chunk_budget_mb"],
        extra={"tokens": tracking.to_json() if tracking is not None else None})


class AttachAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanAttachAttentionRecorder",
            display_name="Attach Attention Recorder",
            category="Wan Attention Capture",
            description="Records where a Wan video model attends while any sampler runs. Patches attention on a "
                        "clone of the model; what the model produces is unchanged.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("text_positions", default="0-7",
                                tooltip="Context positions (umt5 tokens) whose cross-attention maps are kept, e.g. "
                                        "'0-3,7'. Ignored when a token tracking spec is connected."),
                io.Boolean.Input("record_cross_attention", default=True),
                io.Boolean.Input("record_sink_stats", default=False,
                                 tooltip="Self-attention sink statistics: attention received and max score per key, "
                                         "frame x frame mass, entropy per query frame."),
                io.String.Input("window_query_frames", default="",
                                tooltip="Exact self-attention window: query latent frames, e.g. '0' or '2-3'. Empty: off."),
                io.String.Input("window_key_frames", default="", tooltip="Key latent frames of the window. Empty: all."),
                io.String.Input("blocks", default="all", tooltip="Blocks to record, e.g. 'all' or '0-9,20'."),
                io.String.Input("heads", default="all"),
                io.String.Input("steps", default="all", tooltip="Explicit steps ('all' uses storage_interval)."),
                io.Int.Input("storage_interval", default=1, min=1, max=1000),
                io.Combo.Input("branch", options=["cond", "uncond", "both"], default="cond"),
                io.Boolean.Input("store_per_block", default=True),
                io.Boolean.Input("store_per_head", default=False),
                io.Combo.Input("storage_dtype", options=["float16", "float32"], default="float16"),
                io.Int.Input("spatial_downsample_factor", default=1, min=1, max=64),
                io.Int.Input("memory_budget_mb", default=4096, min=1, max=1 << 20,
                             tooltip="Host memory the whole recording may use; checked before recording starts."),
                io.Int.Input("chunk_budget_mb", default=256, min=1, max=1 << 16,
                             tooltip="Attention scores held at once on the GPU while computing statistics."),
                TokenTracking.Input("token_tracking", optional=True),
                AttentionRecorder.Input("share_recorder", optional=True,
                                        tooltip="Record into this recorder (and its settings) instead: connect the "
                                                "first expert's recorder here so Wan 2.2 A14B's two samplers make one "
                                                "recording with steps numbered across both."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), AttentionRecorder.Output(display_name="recorder")],
        )

    @classmethod
    def execute(cls, model, token_tracking=None, share_recorder=None, **kw) -> io.NodeOutput:
        recorder = share_recorder if share_recorder is not None else Recorder(build_plan(kw, token_tracking))
        return io.NodeOutput(attach_recorder(model, recorder), recorder)


NODES = [AttachAttentionRecorder]
