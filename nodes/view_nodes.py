"""Nodes that draw a recording (live, or saved through Load Attention Maps) as IMAGE batches with a preview.

One node per view family, each with only the inputs that apply to it: Attention Heatmap (a word over the video),
Attention Statistic Overlay (sinks, i2v image share over the video), Attention Grid (words or blocks x steps),
Attention Matrix (exact windows, frame x frame mass); Heatmap Style sets colours and ranges for all of them.
"""
from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..wan_capture.views.select import parse_selection
from ..wan_capture.views.colormaps import COLORMAPS
from ..wan_capture.plan import parse_steps
from ..wan_capture.views.render import HeatmapStyle, pad_to, value_ranges
from ..wan_capture.views.maps import (frame_mass, frame_mass_images, grid_image, image_share_maps, mean_window, sink_maps,
                                 token_maps, video_frames, window_image)
from .attach_node import AttentionRecorder
from .recording import open_source
from .widgets import settings, steps_input

Style = io.Custom("WAN_HEATMAP_STYLE")
STATISTICS = {"attention received (sinks)": sink_maps, "image share (i2v)": image_share_maps}
GRID_ROWS = ("words", "blocks")
MATRICES = ("window scores", "window probabilities", "frame x frame mass")


def _recording_inputs() -> list:
    return [AttentionRecorder.Input("recorder", tooltip="Attach Attention Recorder's recorder, or Load Attention "
                                                        "Maps for saved maps."),
            io.Latent.Input("samples", optional=True,
                            tooltip="The sampler's LATENT: picks the recording of a live recorder (not needed "
                                    "for saved maps).")]


def _selection_inputs(steps_what: str = "average") -> list:
    return [steps_input(steps_what),
            io.String.Input("blocks", default="all", optional=True,
                            tooltip="Blocks to average: 'all' or a list like '15-29'."),
            io.String.Input("heads", default="all", optional=True,
                            tooltip="Heads to average: 'all' or a list like '0-3' (needs per-head storage)."),
            io.Combo.Input("branch", options=["cond", "uncond"], default="cond", optional=True,
                           tooltip="cond: the positive prompt's rows; uncond: the negative prompt's."),
            io.Int.Input("batch_index", default=0, min=0, max=4096, optional=True,
                         tooltip="Which video: the batch item of a live recording, or the video of saved maps.")]


def _style_input() -> io.Input:
    return Style.Input("style", optional=True, tooltip="Colours and value range: connect Heatmap Style "
                                                       "(default: inferno, one range per video, min to max).")


def steps_of(text: str, source) -> list:
    """The recorded steps a selection names ('all', a list, 'every N')."""
    steps, every = parse_steps(text)
    if steps is None:
        chosen = [s for s in source.steps if s % every == 0]
        if not chosen:
            raise ValueError(f"no recorded step is a multiple of {every}; recorded steps: {list(source.steps)}")
        return chosen
    return list(steps)


def _open(kw: dict):
    src = open_source(kw["recorder"], kw.get("samples"), kw["batch_index"])
    sel = dict(steps=steps_of(kw["steps"], src), blocks=parse_selection(kw["blocks"], "blocks"),
               heads=parse_selection(kw["heads"], "heads"), branch=kw["branch"])
    return src, sel, kw.get("style") or HeatmapStyle()


def _frames(images):
    return None if images is None else images[..., :3].float().cpu().numpy()


def _out(cls, out: np.ndarray) -> io.NodeOutput:
    image = torch.from_numpy(np.ascontiguousarray(out))
    return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


def _schema(node_id: str, name: str, description: str, inputs: list) -> io.Schema:
    return io.Schema(node_id=node_id, display_name=name, category="Wan Attention Capture", description=description,
                     inputs=inputs, outputs=[io.Image.Output(display_name="IMAGE")])


_STEP_MODE = io.Combo.Input("step_mode", options=["mean", "each"], default="mean", optional=True,
                            tooltip="mean: one video averaged over the steps; each: one video per step, in order.")
_ALPHA = io.Float.Input("alpha", default=0.55, min=0.0, max=1.0, step=0.05, optional=True,
                        tooltip="Opacity of the heat over the decoded frames.")
_IMAGES = io.Image.Input("images", optional=True, tooltip="The VAE-decoded frames to draw over (their count and size "
                                                          "are used; after TrimVideoLatent for VACE references).")


class AttentionOverlay(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("WanAttentionOverlay", "Attention Heatmap",
                       "A tracked word's cross-attention over the decoded video, frame by frame, aligned in time.",
                       [*_recording_inputs(), _IMAGES,
                        io.String.Input("token", default="", optional=True,
                                        tooltip="Tracked word label (e.g. flower). Empty: the first tracked word."),
                        _STEP_MODE, *_selection_inputs(), _ALPHA, _style_input()])

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        src, sel, style = _open(kw)
        labels = src.labels_of(sel["branch"])
        label = kw["token"].strip() or (labels[0] if labels else "")
        maps = token_maps(src, label, mean_steps=kw["step_mode"] == "mean", **sel)
        return _out(cls, video_frames(maps, src.meta, _frames(kw.get("images")), alpha=kw["alpha"],
                                      show_legend=style.legend, **style.norm()))


class AttentionStatisticOverlay(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("WanAttentionStatisticOverlay", "Attention Statistic Overlay",
                       "A per-token statistic over the decoded video: the self-attention each token receives "
                       "(where the sinks are), or for i2v the share of attention that goes to the image.",
                       [*_recording_inputs(), _IMAGES,
                        io.Combo.Input("statistic", options=list(STATISTICS), default=list(STATISTICS)[0],
                                       optional=True,
                                       tooltip="attention received: recorded with sink statistics; image share: "
                                               "recorded with image_context (i2v models)."),
                        _STEP_MODE, *_selection_inputs(), _ALPHA, _style_input()])

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        src, sel, style = _open(kw)
        maps = STATISTICS[kw["statistic"]](src, mean_steps=kw["step_mode"] == "mean", **sel)
        return _out(cls, video_frames(maps, src.meta, _frames(kw.get("images")), alpha=kw["alpha"],
                                      show_legend=style.legend, latent_grid_maps=True, **style.norm()))


class AttentionGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("WanAttentionGrid", "Attention Grid",
                       "One picture of maps: tracked words x steps, or blocks x steps for the chosen words.",
                       [*_recording_inputs(),
                        io.Combo.Input("rows", options=list(GRID_ROWS), default="words", optional=True,
                                       tooltip="words: a row per word; blocks: a row per block (the words averaged)."),
                        io.String.Input("tokens", default="", optional=True,
                                        tooltip="Tracked word labels, comma-separated. Empty: every tracked word."),
                        *_selection_inputs("show as columns"),
                        io.Int.Input("frame", default=-1, min=-1, max=10000, optional=True,
                                     tooltip="Latent frame to show; -1: the mean over frames."),
                        _style_input()])

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        src, sel, style = _open(kw)
        chosen = [t.strip() for t in kw["tokens"].split(",") if t.strip()] or src.labels_of(sel["branch"])
        cols = [f"step {s}" for s in sel["steps"]]
        norm = style.norm()
        if kw["rows"] == "words":
            rows = [token_maps(src, lb, mean_steps=False, **sel) for lb in chosen]
            out = grid_image(rows, chosen, cols, kw["frame"], title="words x steps", **norm)
        else:
            blocks = list(sel["blocks"]) if sel["blocks"] is not None else list(src.blocks)
            rows = [np.mean([token_maps(src, lb, mean_steps=False, **{**sel, "blocks": None if b == -1 else [b]})
                             for lb in chosen], axis=0) for b in blocks]
            out = grid_image(rows, ["mean" if b == -1 else f"block {b}" for b in blocks], cols, kw["frame"],
                             title=f"{', '.join(chosen)}: blocks x steps", **norm)
        return _out(cls, out[None])


class AttentionMatrix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("WanAttentionMatrix", "Attention Matrix",
                       "Self-attention as a matrix: the exact window (pre-softmax QK^T/sqrt(d) or probabilities, "
                       "query x key tokens) or the frame x frame attention mass.",
                       [*_recording_inputs(),
                        io.Combo.Input("matrix", options=list(MATRICES), default="frame x frame mass", optional=True,
                                       tooltip="window scores/probabilities: recorded with a window (Attention "
                                               "Recording Options); frame x frame mass: with sink statistics."),
                        *_selection_inputs(), _style_input()])

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        src, sel, style = _open(kw)
        title = f"steps {sel['steps'][0]}..{sel['steps'][-1]}:"
        if kw["matrix"] == "frame x frame mass":
            mass = frame_mass(src, **sel)
            n = style.norm()  # one matrix: its range is shared (or fixed)
            mode = "fixed" if style.normalize == "fixed" else "shared"
            lo, hi = value_ranges(mass[None, None], mode, n["vmin"], n["vmax"], n["p_low"], n["p_high"])[0, 0]
            if src.causal:  # key frames no chosen step had in its cache: absent (grey), not a mass of 0
                cached = np.any([src.cached(s, sel["branch"]) for s in sel["steps"]], axis=0)
                mass = np.where(cached, mass, np.nan)
                title += " grey: not in the cache;"
            out = frame_mass_images(mass[None], [0], False, style.colormap, title,
                                    getattr(src, "sink_frames", ()), vrange=(lo, hi))
        else:
            win = mean_window(src, sel["steps"], sel["blocks"], sel["branch"])
            ft = src.meta["latent_grid"][1] * src.meta["latent_grid"][2]
            out = window_image(win, "scores" if kw["matrix"] == "window scores" else "probs", sel["heads"], ft,
                               title=title, **style.norm())
        return _out(cls, pad_to(out))


class HeatmapStyleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = HeatmapStyle()
        return io.Schema(
            node_id="WanHeatmapStyle", display_name="Heatmap Style", category="Wan Attention Capture",
            description="Colours and value range of the attention views (their 'style' input).",
            inputs=[
                io.Combo.Input("colormap", options=list(COLORMAPS), default=d.colormap, optional=True,
                               tooltip="Colour scale from low to high values."),
                io.Combo.Input("normalize", options=["per_video", "per_frame", "shared", "fixed"],
                               default=d.normalize, optional=True,
                               tooltip="Which values share one range: each video, each frame, everything drawn "
                                       "together (steps and words compare), or a fixed range given by low/high."),
                io.Float.Input("low", default=d.low, min=-1e6, max=1e6, step=0.001, optional=True,
                               tooltip="Lower end of the range: a percentile of the values (0 = minimum), or the "
                                       "value itself when normalize is fixed."),
                io.Float.Input("high", default=d.high, min=-1e6, max=1e6, step=0.001, optional=True,
                               tooltip="Upper end: a percentile (100 = maximum), or the value itself when fixed."),
                io.Boolean.Input("legend", default=d.legend, optional=True,
                                 tooltip="Draw a colour bar with the value range under each frame (adds rows below "
                                         "it; off keeps the pictures the size of the video)."),
            ],
            outputs=[Style.Output(display_name="style")],
        )

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        return io.NodeOutput(HeatmapStyle(kw["colormap"], kw["normalize"], kw["low"], kw["high"], kw["legend"]))


NODES = [AttentionOverlay, AttentionStatisticOverlay, AttentionGrid, AttentionMatrix, HeatmapStyleNode]
