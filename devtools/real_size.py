"""A recording at Wan 2.1 1.3B's real size, written by the pack's own save path, for the viewer benchmark and the
``real_size`` browser test: 81 frames at 480x832 (21 x 30 x 52 map cells), 30 blocks, 30 steps, 4 words, sink
statistics, the decoded frames kept. The values are synthetic (smooth blobs that move with the step, so every
picture differs); the shapes, files and sizes are those of a real recording.

    python -m devtools.real_size OUTPUT_DIR [--steps 30]   # writes OUTPUT_DIR/real_size/attention_maps/<video>
"""
from __future__ import annotations

import argparse
from typing import Tuple

import numpy as np
import torch

from wan_capture import RecordingPlan, SaveOptions
from wan_capture.capture.store import ALL_COLUMNS
from wan_capture.capture.take import Take
from wan_capture.grid import Grid
from wan_capture.model_info import ModelInfo
from wan_capture.recording import MemoryRecording
from wan_capture.keys import ArrayKey
from wan_capture.recording.save import save_recording

SHAPE_1_3B = (21, 30, 52)  # latent frames, rows, columns of 81 frames at 480x832
BLOCKS_1_3B, HEADS_1_3B = 30, 12
WORDS = ("flower", "tree", "sky", "river")


def _blobs(grid: Tuple[int, int, int], count: int, phase: float, rng: np.random.Generator) -> np.ndarray:
    """``[F*h*w, count]`` smooth positive maps, one blob per column drifting with ``phase``."""
    f, h, w = grid
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    out = np.empty((f * h * w, count), dtype=np.float32)
    for c in range(count):
        cy = (0.3 + 0.4 * np.sin(phase + c)) * h + t * 0.3
        cx = (0.5 + 0.35 * np.cos(phase * 0.7 + 2 * c)) * w - t * 0.5
        blob = np.exp(-(((y - cy) / (0.18 * h)) ** 2 + ((x - cx) / (0.15 * w)) ** 2))
        out[:, c] = (blob + 0.02 * rng.random(blob.shape)).reshape(-1) / (f * h * w)
    return out


def real_size_take(grid: Tuple[int, int, int] = SHAPE_1_3B, blocks: int = BLOCKS_1_3B, steps: int = 30,
                   words: int = len(WORDS), seed: int = 0) -> Take:
    """A complete take of the given size: token maps of ``words`` words and sink statistics at every block and
    step (the mean over heads, float16, the plan's defaults), as the recorder would hold it."""
    rng = np.random.default_rng(seed)
    plan = RecordingPlan(text_positions=tuple(range(1, words + 1)), record_sink_stats=True)
    info = ModelInfo("WAN21", "WanModel", blocks, HEADS_1_3B, 128, 1536, (1, 2, 2), (4, 8, 8))
    take = Take(plan, info)
    f, h, w = grid
    n = f * h * w
    take.grid, take.text_len, take.batch = Grid(f, h, w), 512, 1
    sigmas = np.linspace(1.0, 0.0, steps + 1).tolist()
    take.log.begin(sigmas, None)
    for s in range(steps):
        take.log.step_sigmas[s] = sigmas[s]
        per_block = np.stack([_blobs(grid, words, 0.2 * s + 0.05 * b, rng) for b in range(blocks)])  # [B, n, words]
        cross = torch.from_numpy(per_block[None, :, None]).to(plan.torch_dtype)  # [1, blocks, heads, n, words]
        take.store.put(ArrayKey("cross", ALL_COLUMNS, s, "cond"), cross)
        received = per_block.sum(axis=-1)[None, :, None] / words  # [1, blocks, 1, n]
        mass = rng.random((1, blocks, 1, f, f)).astype(np.float32)
        stats = {"received": received, "key_max": received * 50.0, "frame_mass": mass / mass.sum(-1, keepdims=True),
                 "entropy": rng.random((1, blocks, 1, f)).astype(np.float32) * 10}
        for name, value in stats.items():
            take.store.put(ArrayKey("sink", name, s, "cond"), torch.from_numpy(np.asarray(value)).to(plan.torch_dtype))
    take.status = "complete"
    return take


def frames_for(grid: Tuple[int, int, int] = SHAPE_1_3B) -> np.ndarray:
    """``[T, H, W, 3]`` decoded frames of the grid's video (gradients, so each frame differs)."""
    f, h, w = grid
    t = 4 * (f - 1) + 1
    yy, xx = np.meshgrid(np.linspace(0, 1, h * 16), np.linspace(0, 1, w * 16), indexing="ij")
    return np.stack([np.stack([xx, yy, np.full_like(xx, i / t)], axis=-1) for i in range(t)]).astype(np.float32)


def write(output_root: str, steps: int = 30, batch: str = "real_size") -> str:
    """Write the recording under ``output_root/batch/attention_maps``; returns its video id."""
    take = real_size_take(steps=steps)
    saved = save_recording(MemoryRecording(take), output_root, batch, SaveOptions(prompt_id="real"),
                           frames=frames_for())
    return saved.video_id


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.real_size", description=__doc__.split("\n\n")[0])
    ap.add_argument("output")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    print(write(args.output, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
