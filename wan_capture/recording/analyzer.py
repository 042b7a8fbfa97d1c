"""The storage contract's ``AttentionAnalyzer``: ``load_step``, ``load_all_steps``, aggregations and video-aligned
maps, plus the self-attention, window and causal readers, over one ``attention_maps`` folder (file reading:
:mod:`wan_capture.recording.reader`; the statistics through the video's
:class:`~wan_capture.recording.FolderRecording`). Works without ComfyUI.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import numpy as np

from ..capture.time_layout import video_maps
from ..grid import latent_frame_of, pixel_frame_count
from ..keys import ArrayKey
from ..stats.causal import sink_frames_of
from . import FolderRecording
from .reader import (ArrayTooLarge, AttentionFolder, DamagedFileError, OutsideRoot, _branch,  # noqa: F401
                     load_array, load_cells)  # the names scripts import from here


class AttentionAnalyzer(AttentionFolder):
    """Reads ``<batch>/attention_maps``: ``load_step``, ``load_all_steps``, aggregations and video-aligned maps.

    ``confine_to``: a folder every file read must resolve inside (symlinks included), else OutsideRoot; the viewer's
    routes confine reads to ComfyUI's output folder. ``max_bytes``: the largest array it loads (ArrayTooLarge).
    """

    # -- the storage contract's API -----------------------------------------------------------------------
    def load_step(self, video_id: str, token: str, step: int, branch: str = "") -> np.ndarray:
        """``[blocks, heads, spatial, tokens]`` of one step."""
        return self._array(self._find(os.path.join(self._token_dir(video_id, token, branch), f"step_{step:03d}")))

    def load_metadata(self, video_id: str, token: str, step: int, branch: str = "") -> dict:
        return self._json(os.path.join(self._token_dir(video_id, token, branch), f"step_{step:03d}_metadata.json"))

    def load_all_steps(self, video_id: str, token: str, branch: str = "") -> np.ndarray:
        """``[steps, blocks, heads, spatial, tokens]`` over every saved step, in step order."""
        steps = self.list_steps(video_id, token, branch)
        if not steps:
            raise FileNotFoundError(f"no steps saved for token {token!r} of {video_id!r}")
        return np.stack([self.load_step(video_id, token, s, branch) for s in steps])

    @staticmethod
    def aggregate_blocks(attention: np.ndarray) -> np.ndarray:
        """Mean over blocks: ``[steps, blocks, heads, S, T]`` -> ``[steps, heads, S, T]`` (one step: axis 0)."""
        return attention.mean(axis=1 if attention.ndim == 5 else 0)

    @staticmethod
    def aggregate_heads(attention: np.ndarray) -> np.ndarray:
        """Mean over heads: ``[steps, heads, S, T]`` -> ``[steps, S, T]``; on ``[steps, blocks, heads, S, T]`` axis 2."""
        return attention.mean(axis=2 if attention.ndim == 5 else 1)

    def get_temporal_evolution(self, video_id: str, token: str, branch: str = "") -> np.ndarray:
        """``[steps, spatial, tokens]``: the mean over blocks and heads at every saved step."""
        return self.aggregate_heads(self.aggregate_blocks(self.load_all_steps(video_id, token, branch)))

    # -- self-attention statistics and windows (docs/FORMAT.md): read through the video's Recording -----------
    def recording(self, video_id: str):
        """The video as a :class:`~wan_capture.recording.FolderRecording`: the read interface views, the viewer and
        ``save_recording`` use (the same answers as the live recording it was saved from)."""
        return FolderRecording(self, video_id)

    def _steps_of(self, video_id: str, stat: str, branch: str) -> List[int]:
        """Saved steps of a statistic, as ``summary.json`` lists them (a stray file of another step never counts)."""
        return sorted({k.step for k in self.recording(video_id).keys_of(stat, _branch(branch))})

    def _get(self, video_id: str, key) -> np.ndarray:
        return np.asarray(self.recording(video_id).get(key), dtype=np.float32)

    def list_self_attention_steps(self, video_id: str, branch: str = "") -> List[int]:
        return self._steps_of(video_id, "sink", branch)

    def load_self_attention(self, video_id: str, step: int, name: str, branch: str = "") -> np.ndarray:
        """One sink statistic of one step: ``received``/``key_max`` ``[blocks, heads, keys]``, ``frame_mass``
        ``[blocks, heads, Fq, Fk]``, ``entropy`` ``[blocks, heads, Fq]``."""
        return self._get(video_id, ArrayKey("sink", name, step, _branch(branch)))

    def load_all_self_attention(self, video_id: str, name: str, branch: str = "") -> np.ndarray:
        """``[steps, ...]`` of one sink statistic over every saved step."""
        steps = self.list_self_attention_steps(video_id, branch)
        if not steps:
            raise FileNotFoundError(f"no self-attention statistics saved for {video_id!r}")
        return np.stack([self.load_self_attention(video_id, s, name, branch) for s in steps])

    def load_image_context(self, video_id: str, step: int, name: str = "share", branch: str = "") -> np.ndarray:
        """Image-context statistics of i2v models: ``share`` ``[blocks, heads, latent tokens]`` (the image tokens'
        share of each query's attention, were image and text keys one softmax) or ``received``
        ``[blocks, heads, image tokens]`` (each CLIP-vision token's attention, mean over queries)."""
        if name not in ("share", "received"):
            raise ValueError(f"image-context statistic must be 'share' or 'received', got {name!r}")
        return self._get(video_id, ArrayKey("image", name, step, _branch(branch)))

    def list_image_context_steps(self, video_id: str, branch: str = "") -> List[int]:
        return self._steps_of(video_id, "image", branch)

    def load_window(self, video_id: str, step: int, block: int, branch: str = "", chunk: Optional[int] = None) -> dict:
        """An exact window: ``scores`` and ``probs`` ``[heads, queries, keys]`` and its metadata (token ranges);
        causal recordings keep one per chunk (``chunk``: the chunk's first frame)."""
        rec = self.recording(video_id)
        key = ArrayKey("window", "scores", step, _branch(branch), block, chunk)
        return {"scores": self._get(video_id, key), "probs": self._get(video_id, ArrayKey(
                "window", "probs", step, key.branch, block, chunk)), "metadata": rec.metadata(key)}

    # -- causal Wan: chunks, the KV-cache log, statistics in absolute frames (docs/FORMAT.md) -------------
    def is_causal(self, video_id: str) -> bool:
        """True for a recording of causal Wan (chunks against a KV cache)."""
        return "causal" in self.summary(video_id)

    def list_chunks(self, video_id: str) -> List[int]:
        """First latent frame of each chunk of a causal recording."""
        return self.recording(video_id).chunks() if self.is_causal(video_id) else []

    def chunk_steps(self, video_id: str, branch: str = "") -> dict:
        """Causal Wan: the steps each chunk's statistics hold (an ``initial_latent`` chunk has only its context
        pass)."""
        return self.recording(video_id).chunk_steps(_branch(branch))

    def load_kv_cache_events(self, video_id: str) -> List[dict]:
        """The KV-cache log: per chunk, step and block the absolute ``key_frames`` attended to (cache order, the
        chunk last), what ``wrote`` each of them, the frames ``evicted`` since the block's previous call, the
        ``sink_frames``, and ``unknown_key_frames`` (cached keys the log could not place)."""
        return self.recording(video_id).kv_events()

    def sink_frames(self, video_id: str) -> List[int]:
        """Frames the causal model kept at the front of its cache as attention sinks."""
        return sink_frames_of(self.load_kv_cache_events(video_id))

    def load_chunk_self_attention(self, video_id: str, step: int, chunk: int, name: str, branch: str = "") -> np.ndarray:
        """One chunk's sink statistic: ``received``/``key_max`` ``[blocks, heads, keys]`` over the keys the chunk
        attended to (cache order; their frames are the metadata's ``key_frames``), ``frame_mass``
        ``[blocks, heads, Fq, Fk]``, ``entropy`` ``[blocks, heads, Fq]``."""
        return self._get(video_id, ArrayKey("sink", name, step, _branch(branch), chunk=chunk))

    def load_chunk_metadata(self, video_id: str, step: int, chunk: int, branch: str = "") -> dict:
        return self.recording(video_id).metadata(ArrayKey("sink", "received", step, _branch(branch), chunk=chunk))

    def load_chunk_window(self, video_id: str, step: int, block: int, chunk: int, branch: str = "") -> dict:
        """A causal exact window: ``scores``/``probs`` ``[heads, queries, keys]``; ``q_frames``/``k_frames`` in the
        metadata are the absolute frames of its rows and columns."""
        return self.load_window(video_id, step, block, branch, chunk)

    def get_causal_self_attention(self, video_id: str, step: int, name: str, branch: str = "") -> np.ndarray:
        """A sink statistic of one step over the whole video in absolute frames, from the chunks that have the step
        (see :mod:`wan_capture.causal_stats`): ``frame_mass`` ``[blocks, heads, F, F]`` (the causal frame x frame
        matrix), ``received``/``key_max`` ``[blocks, heads, F * frame_tokens]``, ``entropy`` ``[blocks, heads, F]``."""
        if not self.is_causal(video_id):
            raise ValueError(f"{video_id!r} is not a causal recording; use load_self_attention")
        return self.recording(video_id).sink(step, name, _branch(branch))

    def get_spatial_attention_map(self, video_id: str, token: str, step: Union[int, Sequence[int], None] = None,
                                  height: Optional[int] = None, width: Optional[int] = None,
                                  frames: Optional[int] = None, branch: str = "") -> np.ndarray:
        """``[steps, frames, height, width]`` maps of a word (mean over blocks, heads and the word's pieces).

        ``step``: one step, a list, or None for all saved steps. ``height``/``width``: the decoded video's pixel size
        (default: the map grid). ``frames``: the recording's latent frame count gives one map per latent frame;
        any other count is taken as decoded frames and aligned in time (latent frame 0 is pixel frame 0, latent
        frame t >= 1 covers pixel frames 4t-3..4t); default: the decoded frame count.
        """
        steps = self.list_steps(video_id, token, branch) if step is None else (
            [step] if isinstance(step, int) else list(step))
        meta = self.load_metadata(video_id, token, steps[0], branch)
        f, h, w = meta["map_grid"]
        maps = np.stack([self.load_step(video_id, token, s, branch).mean(axis=(0, 1, 3)) for s in steps])
        maps = maps.reshape(len(steps), f, h, w)
        return align_to_video(maps, meta, height, width, frames)



def align_to_video(maps: np.ndarray, meta: dict, height: Optional[int], width: Optional[int],
                   frames: Optional[int]) -> np.ndarray:
    """``[N, F, h, w]`` latent-grid maps -> ``[N, frames, height, width]`` aligned to the decoded video.

    Reference and context latent frames (:mod:`wan_capture.time_layout`) are left out first; a frame count that
    does not fit the recording raises.
    """
    import torch
    stride_t, vae_h, vae_w = meta.get("model", {}).get("vae_stride", [4, 8, 8])
    maps = video_maps(maps, meta, frames, stride_t)
    n, f, h, w = maps.shape
    patch = meta.get("model", {}).get("patch_size", [1, 2, 2])
    lf, lh, lw = meta["latent_grid"]
    cell_h, cell_w = vae_h * patch[1] * -(-lh // h), vae_w * patch[2] * -(-lw // w)  # pixels per map cell
    height = height or h * cell_h
    width = width or w * cell_w
    frames = frames or pixel_frame_count(f, stride_t)
    index = list(range(f)) if frames == f else [latent_frame_of(p, f, stride_t) for p in range(frames)]
    x = torch.from_numpy(np.ascontiguousarray(maps[:, index])).float().reshape(n * frames, 1, h, w)
    up = torch.nn.functional.interpolate(x, size=(h * cell_h, w * cell_w), mode="bilinear", align_corners=False)
    if -(-height // cell_h) == h and -(-width // cell_w) == w:
        up = up[..., :height, :width]  # the grid covers the video rounded up to whole cells: drop the padding
    else:
        up = torch.nn.functional.interpolate(up, size=(height, width), mode="bilinear", align_corners=False)
    return up.reshape(n, frames, height, width).numpy()
