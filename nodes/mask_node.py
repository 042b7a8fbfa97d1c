"""Node: Attention Mask (a word's attention -> a MASK per decoded frame, and IoU/coverage against a reference MASK)."""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from ..wan_capture.views.select import parse_selection
from ..wan_capture.views.masks import METHODS, attention_masks, mask_scores, masks_on_video
from ..wan_capture.views.maps import token_maps
from .attach_node import AttentionRecorder
from .recording import open_source
from .view_nodes import steps_of
from .widgets import settings, steps_input


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
                AttentionRecorder.Input("recorder", tooltip="Attach Attention Recorder's recorder, or Load Attention "
                                                            "Maps for saved maps."),
                io.Latent.Input("samples", optional=True,
                                tooltip="The sampler's LATENT: picks the recording of a live recorder."),
                io.Image.Input("images", optional=True,
                               tooltip="The decoded frames: the mask takes their count and size."),
                io.String.Input("token", default="", optional=True,
                                tooltip="Tracked word label (e.g. flower); empty: the first."),
                io.Combo.Input("method", options=list(METHODS), default="otsu", optional=True,
                               tooltip="threshold: at or above a fraction of each frame's maximum; otsu: Otsu's cut "
                                       "per frame; top_percent: the given percent of each frame's area."),
                io.Float.Input("value", default=0.5, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="threshold: fraction 0..1 of the frame's maximum; top_percent: percent of "
                                       "the area; otsu: ignored (the cut is found per frame)."),
                steps_input("average"),
                io.String.Input("blocks", default="all", optional=True,
                                tooltip="Blocks to average, e.g. '15-29'."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="A MASK to score against (IoU and coverage), one per decoded frame."),
            ],
            outputs=[io.Mask.Output(display_name="MASK"), io.Float.Output(display_name="iou"),
                     io.Float.Output(display_name="coverage")],
        )

    @classmethod
    def execute(cls, recorder, samples=None, images=None, reference_mask=None, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        src = open_source(recorder, samples, 0)
        label = kw["token"].strip() or (src.labels[0] if src.labels else "")
        maps = token_maps(src, label, steps_of(kw["steps"], src), parse_selection(kw["blocks"], "blocks"))[0]
        frames, height, width = (None, None, None) if images is None else images.shape[:3]
        # decided per latent cell, where the data is, then laid on the decoded frames as the overlay aligns them
        mask = masks_on_video(attention_masks(maps, kw["method"], kw["value"]), src.meta, height, width, frames)
        iou = coverage = -1.0
        if reference_mask is not None:
            ref = reference_mask.float().cpu().numpy() > 0.5
            ref = ref if ref.ndim == 3 else ref[None]
            if ref.shape[1:] != mask.shape[1:] or ref.shape[0] not in (1, mask.shape[0]):
                raise ValueError(f"the reference MASK is {ref.shape[0]} frame(s) of {ref.shape[1]}x{ref.shape[2]}, "
                                 f"the attention mask {mask.shape[0]} frames of {mask.shape[1]}x{mask.shape[2]}: give "
                                 "a mask of the decoded video's size (one frame, or one per frame)")
            iou, coverage = mask_scores(mask, np.broadcast_to(ref, mask.shape) if ref.shape[0] == 1 else ref)
        return io.NodeOutput(torch.from_numpy(mask.astype(np.float32)), iou, coverage)


NODES = [AttentionMask]
