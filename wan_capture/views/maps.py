"""What the heatmap shows: maps gathered from a :class:`~wan_capture.recording.Recording` (a take in memory or a
saved folder: one read interface, so every view answers the same on either) and laid out as pictures."""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import numpy as np

from ..recording.analyzer import AttentionAnalyzer, align_to_video
from .colormaps import apply_colormap
from ..capture.recorder import Take
from ..recording import FolderRecording, MemoryRecording, Recording
from ..recording.recording import MAX_ASSEMBLED_BYTES
from .render import blend, fmt, labelled_grid, matrix_plot, normalize, value_ranges, with_legend
from .select import axis_positions, chosen_steps


def recording_of(source) -> Recording:
    """A :class:`Recording` for a view: a Recording as it is, a take's first video, or the first loaded video."""
    if isinstance(source, Recording):
        return source
    if isinstance(source, Take):
        return MemoryRecording(source)
    if isinstance(source, SavedRecording):
        return source.source(0)
    raise TypeError(f"a view reads a Recording, a Take or saved maps, got {type(source).__name__}")


def token_maps(source, label: str, steps: Optional[Sequence[int]] = None, blocks=None, heads=None,
               branch: str = "cond", mean_steps: bool = True) -> np.ndarray:
    """``[N, F, h, w]`` maps of a word on the map grid: mean over the chosen blocks, heads and the word's pieces;
    N = 1 (mean over steps) or one per step."""
    source = recording_of(source)
    labels = source.labels_of(branch)
    if label not in labels:
        whose = "" if branch == "cond" else " of the negative prompt (uncond rows)"
        raise ValueError(f"no tracked word {label!r}{whose}; tracked: {labels}")
    bi, hi = axis_positions(source.blocks, blocks, "blocks"), axis_positions(source.heads, heads, "heads")
    f, h, w = source.meta["map_grid"]
    maps = np.stack([source.cross(label, s, branch)[bi][:, hi].mean(axis=(0, 1, 3)).reshape(f, h, w)
                     for s in chosen_steps(source.steps, steps)])
    # causal frames a step did not reach (NaN: absent) show as 0; a mean over steps uses the steps that have them
    return _nan_mean(maps) if mean_steps else np.nan_to_num(maps)


def _nan_mean(maps: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nan_to_num(np.nanmean(maps, axis=0, keepdims=True))


def selection_mean(source, blocks, heads):
    """``[blocks, heads, ...] -> [...]``: the mean over the chosen blocks and heads of ``source``'s axes."""
    bi, hi = axis_positions(source.blocks, blocks, "blocks"), axis_positions(source.heads, heads, "heads")
    return lambda a: a[bi][:, hi].mean(axis=(0, 1))


def _latent_grid_maps(source, statistic, steps, blocks, heads, mean_steps: bool) -> np.ndarray:
    """``[N, F, H, W]``: a per-token statistic ``statistic(step, pick) -> [tokens]`` (``pick`` the mean over the chosen
    blocks and heads) on the latent grid; N = 1 (mean over steps) or one per step."""
    pick = selection_mean(source, blocks, heads)
    f, h, w = source.meta["latent_grid"]
    maps = np.stack([statistic(s, pick).reshape(f, h, w) for s in chosen_steps(source.steps, steps)])
    return maps.mean(axis=0, keepdims=True) if mean_steps else maps


def sink_maps(source, steps=None, blocks=None, heads=None, branch: str = "cond", mean_steps: bool = True) -> np.ndarray:
    """``[N, F, H, W]`` attention received per key, laid back on the latent grid (where the sinks are)."""
    # nan: a causal key no chunk attended to (shown as 0, the attention it received)
    source = recording_of(source)
    return np.nan_to_num(_latent_grid_maps(source, lambda s, pick: source.sink(s, "received", branch, pick), steps,
                                           blocks, heads, mean_steps))


def image_share_maps(source, steps=None, blocks=None, heads=None, branch: str = "cond",
                     mean_steps: bool = True) -> np.ndarray:
    """``[N, F, H, W]`` i2v: the image tokens' share of each latent token's attention, on the latent grid."""
    source = recording_of(source)
    return _latent_grid_maps(source, lambda s, pick: pick(source.image(s, "share", branch)), steps, blocks, heads,
                             mean_steps)


def video_frames(maps: np.ndarray, meta: dict, images: Optional[np.ndarray], cmap: str, mode: str, alpha: float,
                 vmin: float = 0.0, vmax: float = 1.0, p_low: float = 0.0, p_high: float = 100.0,
                 show_legend: bool = False, latent_grid_maps: bool = False) -> np.ndarray:
    """Maps ``[N, F, h, w]`` -> IMAGE ``[N * frames, H, W, 3]`` aligned in time and space with the decoded video.

    With ``images`` (the VAE-decoded frames) their count and size are used and the heat is blended over them;
    without, plain heatmaps at the pixel size the latent stands for. Each frame gets a legend with its range.
    """
    meta = dict(meta, map_grid=meta["latent_grid"]) if latent_grid_maps else meta
    if images is not None:
        frames, height, width = images.shape[0], images.shape[1], images.shape[2]
    else:  # the video as decoded (reference frames trimmed)
        frames, height, width = None, None, None
    video = align_to_video(maps, meta, height, width, frames)  # [N, frames, H, W]
    ranges = value_ranges(video, mode, vmin, vmax, p_low, p_high)
    heat = apply_colormap(normalize(video, ranges), cmap)
    out = []
    for n in range(video.shape[0]):
        for t in range(video.shape[1]):
            frame = blend(heat[n, t], None if images is None else images[t], alpha)
            out.append(with_legend(frame, *ranges[n, t], cmap) if show_legend else frame)
    return np.stack(out)


def grid_image(rows: List[np.ndarray], row_labels: List[str], col_labels: List[str], frame: int, cmap: str,
               mode: str, title: str, vmin=0.0, vmax=1.0, p_low=0.0, p_high=100.0, cell: int = 160) -> np.ndarray:
    """Rows of ``[cols, F, h, w]`` maps -> one labelled image (frame ``frame``, or the mean over frames if -1)."""
    stack = np.stack(rows)  # [R, C, F, h, w]
    if frame >= stack.shape[2]:
        raise ValueError(f"frame {frame} does not exist: the maps have {stack.shape[2]} latent frames")
    pick = stack.mean(axis=2) if frame < 0 else stack[:, :, frame]  # [R, C, h, w]
    r, c, h, w = pick.shape
    flat = pick.reshape(r * c, 1, h, w)
    mode = "shared" if mode == "per_video" else mode  # one grid is one picture: per-video means shared here
    ranges = value_ranges(flat, mode, vmin, vmax, p_low, p_high)
    heat = apply_colormap(normalize(flat, ranges), cmap)[:, 0]
    scale = max(1, cell // max(h, w))
    heat = np.repeat(np.repeat(heat, scale, axis=1), scale, axis=2)
    cells = [[heat[i * c + j] for j in range(c)] for i in range(r)]
    lo, hi = ranges[..., 0].min(), ranges[..., 1].max()
    shown = "per-cell ranges" if mode == "per_frame" else f"range {fmt(lo)}..{fmt(hi)}"
    img = labelled_grid(cells, row_labels, col_labels, title=f"{title} ({shown})")
    return with_legend(img, lo, hi, cmap) if mode != "per_frame" else img


def window_image(window: dict, which: str, heads: Optional[Sequence[int]], frame_tokens: int, cmap: str, mode: str,
                 vmin=0.0, vmax=1.0, p_low=0.0, p_high=100.0, title: str = "") -> List[np.ndarray]:
    """An exact window (query x key) as labelled heatmaps: one per head, or the mean over ``heads``."""
    data = window["scores" if which == "scores" else "probs"]  # [heads, nq, nk]
    q0, k0 = window["q_range"][0], window["k_range"][0]
    mats = [data[list(heads)].mean(axis=0)] if heads is not None else [data.mean(axis=0)]
    names = [f"mean of heads {list(heads)}" if heads is not None else "mean over heads"]
    ticks = lambda start, n: [(p - start, f"f{p // frame_tokens}") for p in range(start, start + n)  # noqa: E731
                              if p % frame_tokens == 0] or [(0, str(start))]
    if "k_frames" in window:  # causal: columns are cached keys in cache order; label them by absolute frame
        kf, qf = list(window["k_frames"]), list(window["q_frames"])
        k_ticks = [(i * frame_tokens, f"f{f}") for i, f in enumerate(kf)]
        q_ticks = [(i * frame_tokens, f"f{f}") for i, f in enumerate(qf)]
    else:
        k_ticks, q_ticks = None, None
    out = []
    for m, name in zip(mats, names):
        ranges = value_ranges(m[None, None], "shared" if mode in ("per_video", "per_frame") else mode,
                              vmin, vmax, p_low, p_high)
        label = "pre-softmax QK^T/sqrt(d)" if which == "scores" else "probability"
        if k_ticks is not None:
            out.append(matrix_plot(m, cmap, *ranges[0, 0], "cached key frame (cache order)", "query frame",
                                   f"{title} {label}, {name}", k_ticks, q_ticks))
            continue
        out.append(matrix_plot(m, cmap, *ranges[0, 0], f"key token ({k0}..{k0 + m.shape[1] - 1})",
                               f"query token ({q0}..{q0 + m.shape[0] - 1})", f"{title} {label}, {name}",
                               ticks(k0, m.shape[1]), ticks(q0, m.shape[0])))
    return out


def frame_mass_images(mass: np.ndarray, heads_axis: Sequence[int], each_head: bool, cmap: str,
                      title: str, sink_frames: Sequence[int] = (), vrange: Optional[Sequence[float]] = None
                      ) -> List[np.ndarray]:
    """``[heads, Fq, Fk]`` query-frame x key-frame probability mass: one plot per head, or their mean.

    ``sink_frames`` (causal Wan): key frames kept as attention sinks, marked ``S`` on the key axis. ``vrange``:
    the colour range (default 0 to the largest mass).
    """
    mats = [(f"head {h}", mass[i]) for i, h in enumerate(heads_axis)] if each_head else [("mean over heads", mass.mean(0))]
    sinks = set(sink_frames)
    out = []
    for name, m in mats:
        ticks_q = [(i, str(i)) for i in range(m.shape[0])]
        ticks_k = [(i, f"{i}S" if i in sinks else str(i)) for i in range(m.shape[1])]
        lo, hi = vrange if vrange is not None else (0.0, float(max(m.max(), 1e-12)))
        out.append(matrix_plot(m, cmap, lo, hi, "key frame", "query frame",
                               f"{title} frame x frame mass, {name}", ticks_k, ticks_q))
    return out


class SavedRecording:
    """Saved attention maps opened for viewing: the videos of one ``attention_maps`` folder, in order.

    It plays the part of a recorder for the view nodes (one type for live and saved recordings); ``batch_index``
    picks a video as it picks a batch item of a live recording. ``confine_to``: every read stays inside it.
    """

    def __init__(self, attention_maps: str, videos: Sequence[str], confine_to: Optional[str] = None):
        if not videos:
            raise ValueError(f"no saved videos in {attention_maps!r}")
        self.path, self.videos, self.root = attention_maps, list(videos), confine_to

    def source(self, batch_index: int = 0) -> FolderRecording:
        if not 0 <= batch_index < len(self.videos):
            raise ValueError(f"batch_index {batch_index} is outside the {len(self.videos)} loaded videos "
                             f"({', '.join(self.videos[:5])}{'...' if len(self.videos) > 5 else ''})")
        rec = FolderRecording(AttentionAnalyzer(self.path, confine_to=self.root), self.videos[batch_index])
        rec.assembly_limit = MAX_ASSEMBLED_BYTES  # files anyone could have written under the output folder
        return rec


def mean_window(source, steps=None, blocks=None, branch: str = "cond") -> dict:
    """The exact window averaged over the chosen steps and blocks (each must have been recorded)."""
    source = recording_of(source)
    steps = chosen_steps(source.steps, steps)
    blocks = list(blocks) if blocks is not None else [b for b in source.blocks if b >= 0] or [0]
    wins = [source.window(s, b, branch) for s in steps for b in blocks]
    first = wins[0]
    for w in wins[1:]:
        if (w["q_range"], w["k_range"]) != (first["q_range"], first["k_range"]):
            raise ValueError("the chosen steps/blocks hold windows over different tokens (a causal video's chunks): "
                             "choose one step and block")
    return {**first, "scores": np.mean([w["scores"] for w in wins], axis=0),
            "probs": np.mean([w["probs"] for w in wins], axis=0)}


def frame_mass(source, steps=None, blocks=None, heads=None, branch: str = "cond") -> np.ndarray:
    """``[Fq, Fk]`` query-frame x key-frame probability mass, mean over the chosen steps, blocks and heads."""
    source = recording_of(source)
    pick = selection_mean(source, blocks, heads)
    return np.mean([source.sink(s, "frame_mass", branch, pick) for s in chosen_steps(source.steps, steps)], axis=0)
