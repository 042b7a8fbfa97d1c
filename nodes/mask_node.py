"""Node: Attention Mask (a word's attention -> a MASK per decoded frame, and IoU/coverage against a reference MASK)."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from ..wan_capture import parse_index_list
from ..wan_capture.masks import METHODS, attention_masks, mask_scores, masks_on_video
from ..wan_capture.views import token_maps
from .attach_node import AttentionRecorder
from .heatmap_node import open_source


class AttentionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanAttentionMask",
            display_name="Attention Mask",
            category="Wan Attention Capture",
            description="Where a tracked word is: a MASK per decoded frame from its attention (aligned in time like "
                        "the overlay), and its IoU and coverage against a reference MASK.",
            inputs=[
                AttentionRecorder.Input("recorder", optional=True, tooltip="The Attach node's recorder."),
                io.Latent.Input("samples", optional=True, tooltip="The sampler's LATENT: picks the recording."),
                io.String.Input("token", default="", tooltip="Tracked word label (e.g. flower); empty: the first."),
                io.Combo.Input("method", options=list(METHODS), default="otsu",
                               tooltip="threshold: at or above a fraction of each frame's maximum; otsu: Otsu's cut "
                                       "per frame; top_percent: the given percent of each frame's area."),
                io.Float.Input("value", default=0.5, min=0.0, max=100.0, step=0.01,
                               tooltip="threshold: fraction 0..1 of the frame's maximum; top_percent: percent of "
                                       "the area; unused by otsu."),
                io.String.Input("steps", default="all", tooltip="Steps to average, e.g. '10-20'."),
                io.String.Input("blocks", default="all", tooltip="Blocks to average, e.g. '15-29'."),
                io.Image.Input("images", optional=True,
                               tooltip="The decoded frames: the mask takes their count and size."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="A MASK to score against (IoU and coverage), one per decoded frame."),
                io.String.Input("attention_maps_path", default="", optional=True,
                                tooltip="Saved maps instead of a recorder: '<batch_name>/attention_maps' in output/."),
                io.String.Input("video_id", default="", optional=True, tooltip="Saved video, e.g. prompt_000_vid001."),
            ],
            outputs=[io.Mask.Output(display_name="MASK"), io.Float.Output(display_name="iou"),
                     io.Float.Output(display_name="coverage")],
        )

    @classmethod
    def execute(cls, token, method, value, steps, blocks, recorder=None, samples=None, images=None,
                reference_mask=None, attention_maps_path="", video_id="") -> io.NodeOutput:
        src = open_source(recorder, samples, attention_maps_path, video_id, 0)
        label = token.strip() or (src.labels[0] if src.labels else "")
        maps = token_maps(src, label, parse_index_list(steps, "steps"), parse_index_list(blocks, "blocks"))[0]
        frames, height, width = (None, None, None) if images is None else images.shape[:3]
        # decided per latent cell, where the data is, then laid on the decoded frames as the overlay aligns them
        mask = masks_on_video(attention_masks(maps, method, value), src.meta, height, width, frames)
        iou = coverage = -1.0
        if reference_mask is not None:
            ref = reference_mask.float().cpu().numpy() > 0.5
            ref = ref if ref.ndim == 3 else ref[None]
            iou, coverage = mask_scores(mask, np.broadcast_to(ref, mask.shape) if ref.shape[0] == 1 else ref)
        return io.NodeOutput(torch.from_numpy(mask.astype(np.float32)), iou, coverage)


NODES = [AttentionMask]
