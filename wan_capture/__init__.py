"""Wan Attention Capture core: plan what to record, tap attention calls, reduce them to exact statistics.

The stages, one subpackage each: ``capture`` (calls, the tracker, the recorder, takes), ``stats`` (the statistics and
their kernels), ``recording`` (keys, the Recording read interface over memory and folders, saving, the analyzer),
``views`` (selections, maps, pictures, the viewer's slices), ``adapters`` (the official Wan code, diffusers, causal
Wan), ``prompts`` (token tracking, templates), ``batch`` (the headless runner). This package never imports ComfyUI;
``nodes/`` holds the ComfyUI glue.
"""
from .adapters import CausalRecorder, record
from .capture.budget import BudgetError
from .capture.call import CROSS_IMAGE, CROSS_TEXT, SELF, AttentionCall, branch_rows
from .capture.recorder import Recorder, fingerprint
from .capture.take import Take
from .capture.tracker import CallTracker
from .grid import Grid, pool_spatial
from .model_info import ModelInfo, describe_model
from .plan import FrameWindow, PlanError, RecordingPlan, parse_index_list
from .prompts.templates import TemplateError, expand_template
from .prompts.tokens import TokenTracking, TrackedWord, TrackingError
from .recording import ArrayKey, FolderRecording, MemoryRecording, Recording
from .recording.analyzer import AttentionAnalyzer, load_array
from .recording.confine import OutsideRoot, StorageError
from .recording.recording import NotRecorded
from .recording.save import SaveOptions, save_recording, save_take
from .stats.statistics import KeyLayout, SinkStats, cross_attention_probs, score_window, sink_statistics, split_heads
from .views.select import SelectionError

__version__ = "0.2.0"

__all__ = [
    "ArrayKey", "AttentionAnalyzer", "AttentionCall", "BudgetError", "CROSS_IMAGE", "CROSS_TEXT", "CallTracker",
    "CausalRecorder", "FolderRecording", "FrameWindow", "Grid", "KeyLayout", "MemoryRecording", "ModelInfo",
    "NotRecorded", "OutsideRoot", "PlanError", "Recorder", "Recording", "RecordingPlan", "SELF", "SaveOptions",
    "SelectionError", "SinkStats", "StorageError", "Take", "TemplateError", "TokenTracking", "TrackedWord",
    "TrackingError", "__version__", "branch_rows", "cross_attention_probs", "describe_model", "expand_template",
    "fingerprint", "load_array", "parse_index_list", "pool_spatial", "record", "save_recording", "save_take",
    "score_window", "sink_statistics", "split_heads",
]
