"""Nodes: Attach Attention Recorder (MODEL -> MODEL + recorder) and Attention Recording Options (the advanced plan)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from comfy_api.latest import io

from ..wan_capture import FrameWindow, PlanError, Recorder, RecordingPlan, parse_index_list
from ..wan_capture.plan import parse_steps
from .comfy_attach import attach_recorder, model_info
from .widgets import settings, steps_input

AttentionRecorder = io.Custom("ATTENTION_RECORDER")
TokenTracking = io.Custom("WAN_TOKEN_TRACKING")
RecordingOptions = io.Custom("WAN_RECORDING_OPTIONS")

# record -> (cross maps, sink statistics, the max score per key with them)
RECORD = {"cross attention": (True, False, True), "sink statistics": (False, True, True),
          "cross attention + sink statistics": (True, True, True),
          "sink statistics, no key max": (False, True, False)}
RECORD_ALIASES = {"both": "cross attention + sink statistics", "cross": "cross attention", "sinks": "sink statistics"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RecordingPlan)}


def _frames(text: str, field_name: str):
    frames = parse_index_list(text, field_name)
    if frames is None:
        return None
    if frames != tuple(range(frames[0], frames[-1] + 1)):
        raise PlanError(f"RecordingPlan.{field_name}: frames must be one contiguous range like '3' or '2-4', got {text!r}")
    return frames[0], frames[-1] + 1


def options_from(kw: dict) -> dict:
    """RecordingPlan fields from the options node's widgets."""
    window = None
    q = _frames(kw["window_query_frames"], "window_query_frames")
    if q is not None:
        k = _frames(kw["window_key_frames"], "window_key_frames") or (0, None)
        window = FrameWindow(q[0], q[1], k[0], k[1])
    elif kw["window_key_frames"].strip():
        raise PlanError("RecordingPlan.window: window_key_frames is set but window_query_frames is empty; give the "
                        "query frames of the window too")
    return dict(text_positions=parse_index_list(kw["text_positions"], "text_positions") or (),
                heads=parse_index_list(kw["heads"], "heads"), branch=kw["branch"], window=window,
                store_per_block=kw["store_per_block"], store_per_head=kw["store_per_head"],
                storage_dtype=kw["storage_dtype"], spatial_downsample_factor=kw["spatial_downsample_factor"],
                memory_budget_mb=kw["memory_budget_mb"], chunk_budget_mb=kw["chunk_budget_mb"],
                record_image_context=kw["image_context"], image_context_set=True)


def build_plan(record: str, steps: str, blocks: str, tracking=None, negative=None,
               options: Optional[dict] = None) -> RecordingPlan:
    """The recording plan from the Attach node's inputs, its token tracking specs and the options node's fields."""
    opts = dict(options or {})
    opts.pop("image_context_set", None)  # the Options node's own mark (see with_image_context)
    if tracking is not None and opts.get("text_positions"):
        raise PlanError("RecordingPlan.text_positions: both a token tracking spec and text_positions are given; "
                        "clear text_positions in Attention Recording Options or disconnect the tracker")
    record = RECORD_ALIASES.get(record, record)
    if record not in RECORD:
        raise PlanError(f"record must be one of {list(RECORD)} (or 'both'), got {record!r}")
    cross, sink, key_max = RECORD[record]
    if cross and tracking is None and not opts.get("text_positions") and opts.get("branch", "cond") != "uncond":
        raise PlanError("RecordingPlan.text_positions: record is 'cross attention' but no words are tracked: connect "
                        "a Weighted Token Tracker to token_tracking (or give text_positions in Attention Recording "
                        "Options), or set record to 'sink statistics'")
    step_list, interval = parse_steps(steps)
    positions = tracking.positions if tracking is not None else opts.pop("text_positions", ())
    opts.pop("text_positions", None)
    extra = {"tokens": tracking.to_json() if tracking is not None else None,
             "negative_tokens": negative.to_json() if negative is not None else None,
             # what each branch's rows must attend to, where a tracker encoded it (checked when sampling starts)
             "encoded": {b: t.encoded for b, t in (("cond", tracking), ("uncond", negative))
                         if t is not None and getattr(t, "encoded", None) is not None}}
    return RecordingPlan(text_positions=positions, negative_positions=negative.positions if negative else None,
                         text_sums=tracking.summed if tracking is not None else (),
                         negative_sums=negative.summed if negative is not None else (),
                         record_cross=cross, record_sink_stats=sink, record_key_max=key_max, steps=step_list,
                         storage_interval=interval,
                         blocks=parse_index_list(blocks, "blocks"), extra=extra, **opts)


def with_image_context(plan: RecordingPlan, model, options: Optional[dict]) -> RecordingPlan:
    """Image context recorded where the model has it (i2v, FLF2V, Fun camera), silently left out where it has none
    (the Options node's default is on: a t2v graph is not told of what it never had); the Options node's
    ``image_context`` off turns it off."""
    has = model_info(model)[0].cross_attention == "i2v"
    off = (options or {}).get("image_context_set") and not (options or {}).get("record_image_context")
    return dataclasses.replace(plan, record_image_context=has and not off)


class AttachAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanAttachRecorder",
            display_name="Attach Attention Recorder",
            category="Wan Attention Capture",
            description="Records where a Wan video model attends while any sampler runs. Patches attention on a "
                        "clone of the model; what the model produces is unchanged. More settings: connect "
                        "Attention Recording Options.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 / 2.2 model (after LoRAs and ModelSampling nodes)."),
                TokenTracking.Input("token_tracking", optional=True,
                                    tooltip="Which words to record: connect the Weighted Token Tracker whose "
                                            "'positive' (and 'negative') outputs feed the sampler. With its "
                                            "negative_text set, the negative prompt's words are recorded too."),
                TokenTracking.Input("negative_tracking", optional=True,
                                    tooltip="Older wiring only: a second tracker of the negative prompt. Leave empty "
                                            "when the tracker above has negative_text."),
                io.Combo.Input("record", options=list(RECORD), default="cross attention", optional=True,
                               tooltip="cross attention: each tracked word's map over the video. sink statistics: "
                                       "self-attention received and max score per key, frame x frame mass, entropy "
                                       "('no key max': without the max score, 10-11% less GPU time for them)."),
                steps_input("record"),
                io.String.Input("blocks", default="all", optional=True,
                                tooltip="Transformer blocks to record: 'all' or a list like '0-9,20'."),
                RecordingOptions.Input("options", optional=True,
                                       tooltip="Advanced settings (heads, branch, exact windows, storage, budgets): "
                                               "connect Attention Recording Options."),
                AttentionRecorder.Input("share_recorder", optional=True,
                                        tooltip="Record into this recorder (and its settings) instead: connect the "
                                                "first expert's recorder here so Wan 2.2 A14B's two samplers make one "
                                                "recording with steps numbered across both."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), AttentionRecorder.Output(display_name="recorder")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],  # which Attach nodes share this one's recorder
        )

    @classmethod
    def execute(cls, model, token_tracking=None, negative_tracking=None, options=None, share_recorder=None,
                **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        if share_recorder is not None:
            if not isinstance(share_recorder, Recorder):
                raise TypeError("share_recorder needs the live recorder of another Attach Attention Recorder (the "
                                "first expert's): saved maps from Load Attention Maps cannot record. Connect the "
                                "other Attach node's recorder output, or leave share_recorder empty")
            recorder = share_recorder
        else:
            if negative_tracking is None and getattr(token_tracking, "negative", None) is not None:
                negative_tracking = token_tracking.negative  # one tracker tracked both prompts: record both branches
                if (options or {}).get("branch", "cond") == "cond":
                    options = {**(options or {}), "branch": "both"}
            plan = with_image_context(build_plan(kw["record"], kw["steps"], kw["blocks"], token_tracking,
                                                 negative_tracking, options), model, options)
            recorder = Recorder(plan)
            recorder.attach(None, expected=1 + len(_sharing(cls)))
        return io.NodeOutput(attach_recorder(model, recorder), recorder)


def _sharing(cls) -> list:
    """The Attach nodes of the prompt being run whose ``share_recorder`` is this node's recorder (Wan 2.2 A14B's
    second expert), known before they run."""
    hidden = getattr(cls, "hidden", None)
    prompt, me = getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)
    if not isinstance(prompt, dict) or me is None:
        return []
    return [nid for nid, n in prompt.items() if isinstance(n, dict) and n.get("class_type") == "WanAttachRecorder"
            and (n.get("inputs") or {}).get("share_recorder") == [str(me), 1]]


class AttentionRecordingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = _DEFAULTS
        return io.Schema(
            node_id="WanRecordingOptions",
            display_name="Attention Recording Options",
            category="Wan Attention Capture",
            description="Advanced recording settings for Attach Attention Recorder (its 'options' input).",
            inputs=[
                io.String.Input("text_positions", default="", optional=True,
                                tooltip="Record these umt5 context positions (e.g. '0-3,7') instead of a token "
                                        "tracker's words. Empty: use the tracker."),
                io.String.Input("heads", default="all", optional=True,
                                tooltip="Attention heads to record: 'all' or a list like '0-3'."),
                io.Combo.Input("branch", options=["cond", "uncond", "both"], default=d["branch"], optional=True,
                               tooltip="Which CFG rows to record: the positive prompt's (cond), the negative's "
                                       "(uncond) or both. Uncond cross maps need the tracker's negative_text "
                                       "(a tracker with it records both by default)."),
                io.String.Input("window_query_frames", default="", optional=True,
                                tooltip="Exact self-attention window (pre-softmax scores and probabilities): query "
                                        "latent frames, e.g. '0' or '2-3'. Empty: no window."),
                io.String.Input("window_key_frames", default="", optional=True,
                                tooltip="Key latent frames of the exact window, e.g. '0-4'. Empty: all keys."),
                io.Boolean.Input("store_per_block", default=d["store_per_block"], optional=True,
                                 tooltip="Keep each block's maps (off: the mean over the recorded blocks)."),
                io.Boolean.Input("store_per_head", default=d["store_per_head"], optional=True,
                                 tooltip="Keep each head's maps (off: the mean over the recorded heads)."),
                io.Combo.Input("storage_dtype", options=["float16", "float32"], default=d["storage_dtype"],
                               optional=True, tooltip="Precision the maps are kept and saved in."),
                io.Int.Input("spatial_downsample_factor", default=d["spatial_downsample_factor"], min=1, max=64,
                             optional=True, tooltip="Average the maps over NxN latent cells (smaller recordings)."),
                io.Int.Input("memory_budget_mb", default=int(d["memory_budget_mb"]), min=1, max=1 << 20,
                             optional=True,
                             tooltip="Host memory the whole recording may use; checked before recording starts."),
                io.Int.Input("chunk_budget_mb", default=int(d["chunk_budget_mb"]), min=1, max=1 << 16,
                             optional=True,
                             tooltip="Attention scores held at once on the GPU while computing statistics."),
                io.Boolean.Input("image_context", default=True, optional=True,
                                 tooltip="i2v / FLF2V / Fun camera models: also record each query's attention mass "
                                         "on the CLIP-vision image tokens, per step and block. On: where the model "
                                         "has image context (other models have none to record); off: never."),
            ],
            outputs=[RecordingOptions.Output(display_name="options")],
        )

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        opts = options_from(settings(cls, kw))
        checked = {k: v for k, v in opts.items() if k != "image_context_set"}
        RecordingPlan(**{**checked, "record_cross": False, "record_sink_stats": True})  # every field checked here
        return io.NodeOutput(opts)


NODES = [AttachAttentionRecorder, AttentionRecordingOptions]
