"""Node: Attention Heatmap (a recording, or saved maps -> IMAGE batches with a preview)."""
from __future__ import annotations

import os

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..wan_capture import parse_index_list
from ..wan_capture.colormaps import COLORMAPS
from ..wan_capture.render import NORMALIZE, pad_to
from ..wan_capture.storage import inside
from ..wan_capture.views import (SavedSource, TakeSource, axis_index, frame_mass_images, grid_image, sink_maps,
                                 token_maps, video_frames, window_image)
from .attach_node import AttentionRecorder
from .recording import take_for_latent

VIEWS = ("token overlay", "token grid", "block grid", "sink overlay", "self-attention window", "frame x frame mass")


def open_source(recorder, samples, attention_maps_path: str, video_id: str, batch_index: int):
    """The recording to show: the recorder's take of ``samples``, else a saved folder under ComfyUI's output."""
    if recorder is not None:
        if samples is None:
            raise ValueError("connect the sampler's LATENT output too: it picks which recording to show")
        return TakeSource(take_for_latent(recorder, samples), batch_index)
    if not attention_maps_path:
        raise ValueError("connect a recorder and its sampler's LATENT, or give attention_maps_path "
                         "(e.g. 'wan_attention/attention_maps', inside ComfyUI's output folder) and a video_id")
    out = folder_paths.get_output_directory()
    path = inside(out, *attention_maps_path.replace("\\", "/").strip("/").split("/"), purpose="read")
    if not video_id:
        videos = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "summary.json")))
        if not videos:
            raise ValueError(f"no saved videos in {attention_maps_path!r}")
        video_id = videos[0]
    return SavedSource(path, video_id)


class AttentionHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanAttentionHeatmap",
            display_name="Attention Heatmap",
            category="Wan Attention Capture",
            description="Renders recorded attention as images: a word's attention over the decoded frames, "
                        "tokens x steps grids, attention sinks, exact self-attention windows, frame x frame mass.",
            inputs=[
                io.Combo.Input("view", options=list(VIEWS), default="token overlay"),
                AttentionRecorder.Input("recorder", optional=True),
                io.Latent.Input("samples", optional=True, tooltip="The sampler's LATENT: picks the recording."),
                io.Image.Input("images", optional=True, tooltip="The VAE-decoded frames to draw over."),
                io.String.Input("attention_maps_path", default="", optional=True,
                                tooltip="Saved maps instead of a recorder: '<batch_name>/attention_maps' in output/."),
                io.String.Input("video_id", default="", optional=True, tooltip="Saved video, e.g. prompt_000_vid001."),
                io.String.Input("tokens", default="", tooltip="Tracked word labels (comma-separated); empty: "
                                                             "the first (overlay) or all (grid)."),
                io.String.Input("steps", default="all"),
                io.Combo.Input("step_mode", options=["mean", "each"], default="mean",
                               tooltip="mean: one sequence averaged over the steps; each: one after another."),
                io.String.Input("blocks", default="all", tooltip="Blocks to average (or the grid's rows)."),
                io.String.Input("heads", default="all", tooltip="Heads to average."),
                io.Combo.Input("branch", options=["cond", "uncond"], default="cond"),
                io.Int.Input("frame", default=-1, min=-1, max=10000, tooltip="Grids: latent frame, -1 = mean."),
                io.Int.Input("batch_index", default=0, min=0, max=4096, tooltip="Which video of the batch."),
                io.Int.Input("window_block", default=0, min=0, max=1000),
                io.Combo.Input("window_values", options=["scores", "probs"], default="scores"),
                io.Combo.Input("colormap", options=list(COLORMAPS), default="inferno"),
                io.Combo.Input("normalize", options=list(NORMALIZE), default="per_video"),
                io.Float.Input("vmin", default=0.0, step=0.001),
                io.Float.Input("vmax", default=1.0, step=0.001),
                io.Float.Input("percentile_low", default=1.0, min=0.0, max=100.0),
                io.Float.Input("percentile_high", default=99.0, min=0.0, max=100.0),
                io.Float.Input("alpha", default=0.55, min=0.0, max=1.0, step=0.05),
                io.Boolean.Input("legend", default=True),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, view, tokens, steps, step_mode, blocks, heads, branch, frame, batch_index, window_block,
                window_values, colormap, normalize, vmin, vmax, percentile_low, percentile_high, alpha, legend,
                recorder=None, samples=None, images=None, attention_maps_path="", video_id="") -> io.NodeOutput:
        src = open_source(recorder, samples, attention_maps_path, video_id, batch_index)
        step_list = parse_index_list(steps, "steps")
        block_list, head_list = parse_index_list(blocks, "blocks"), parse_index_list(heads, "heads")
        labels = [t.strip() for t in tokens.split(",") if t.strip()]
        norm = dict(cmap=colormap, mode=normalize, vmin=vmin, vmax=vmax, p_low=percentile_low, p_high=percentile_high)
        frames_in = None if images is None else images[..., :3].float().cpu().numpy()
        mean_steps = step_mode == "mean"
        if view in ("token overlay", "sink overlay"):
            if view == "token overlay":
                label = labels[0] if labels else (src.labels[0] if src.labels else "")
                maps = token_maps(src, label, step_list, block_list, head_list, branch, mean_steps)
            else:
                maps = sink_maps(src, step_list, block_list, head_list, branch, mean_steps)
            out = video_frames(maps, src.meta, frames_in, alpha=alpha, show_legend=legend,
                               latent_grid_maps=view == "sink overlay", **norm)
        elif view == "token grid":
            chosen = labels or src.labels
            st = step_list or list(src.steps)
            rows = [token_maps(src, lb, st, block_list, head_list, branch, mean_steps=False) for lb in chosen]
            out = grid_image(rows, chosen, [f"step {s}" for s in st], frame, title="tokens x steps", **norm)[None]
        elif view == "block grid":
            label = labels[0] if labels else src.labels[0]
            st = step_list or list(src.steps)
            rows_idx = list(block_list) if block_list is not None else list(src.blocks)
            rows = [token_maps(src, label, st, None if b == -1 else [b], head_list, branch, mean_steps=False)
                    for b in rows_idx]
            out = grid_image(rows, ["mean" if b == -1 else f"block {b}" for b in rows_idx], [f"step {s}" for s in st],
                             frame, title=f"'{label}': blocks x steps", **norm)[None]
        elif view == "self-attention window":
            step = (step_list or [src.steps[0]])[0]
            win = src.window(step, window_block, branch)
            ft = src.meta["latent_grid"][1] * src.meta["latent_grid"][2]
            out = pad_to(window_image(win, window_values, head_list, ft, title=f"step {step}, block {window_block}:",
                                      **norm))
        else:
            step_sel = step_list or list(src.steps)
            bi = axis_index(src.blocks, block_list, "blocks")
            mass = np.mean([src.sink(s, "frame_mass", branch)[bi].mean(axis=0) for s in step_sel], axis=0)
            hi = axis_index(src.heads, head_list, "heads")
            out = pad_to(frame_mass_images(mass[hi], [src.heads[i] for i in hi], each_head=head_list is not None,
                                           cmap=colormap, title=f"steps {step_sel[0]}..{step_sel[-1]}:",
                                           sink_frames=getattr(src, "sink_frames", ())))
        image = torch.from_numpy(np.ascontiguousarray(out))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES = [AttentionHeatmap]
