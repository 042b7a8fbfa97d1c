"""Wan Attention Capture core: plan what to record, tap attention calls, reduce them to exact statistics.

This package never imports ComfyUI; ``nodes/`` holds the ComfyUI glue.
"""
from .adapters import CausalRecorder, record
from .recording.analyzer import AttentionAnalyzer, load_array
from .capture.call import CROSS_IMAGE, CROSS_TEXT, SELF, AttentionCall, branch_rows
from .grid import Grid, pool_spatial
from .model_info import ModelInfo, describe_model
from .plan import FrameWindow, PlanError, RecordingPlan, parse_index_list
from .capture.recorder import BudgetError, Recorder, Take, fingerprint
from .stats.statistics import KeyLayout, SinkStats, cross_attention_probs, score_window, sink_statistics, split_heads
from .recording.save import SaveOptions, StorageError, save_take
from .prompts.templates import TemplateError, expand_template
from .prompts.tokens import TokenTracking, TrackedWord, TrackingError
from .capture.tracker import CallTracker

__version__ = "0.2.0"

__all__ = [
    "AttentionAnalyzer", "CausalRecorder", "record", "SaveOptions", "StorageError", "TemplateError", "TokenTracking", "TrackedWord",
    "TrackingError", "expand_template", "load_array", "save_take", "AttentionCall", "BudgetError", "CROSS_IMAGE", "CROSS_TEXT", "FrameWindow", "Grid", "KeyLayout", "PlanError",
    "Recorder", "RecordingPlan", "SELF", "SinkStats", "Take", "branch_rows", "cross_attention_probs", "fingerprint",
    "parse_index_list", "pool_spatial", "ModelInfo", "describe_model", "CallTracker", "score_window", "sink_statistics", "split_heads", "__version__",
]
