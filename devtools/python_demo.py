"""The demo where ComfyUI is not installed: the same kind of recording through the Python API.

A tiny random Wan 2.1 t2v DiT of the official Wan code (``wan22``, which ``make demo`` installs) samples a 9-frame
64x64 video in 3 flow-matching steps with classifier-free guidance, evaluated cond then uncond as the official
pipeline does, inside ``wan_capture.record``. The take is saved in the storage contract's layout, read back with
``AttentionAnalyzer``, and drawn: each tracked position's heatmap frames (time-aligned, at the video's pixel size) and
the attention received per key. A tiny causal Wan with a sink frame (``python -m wan_capture causal-demo``) is then
recorded and its sink report written. Random weights: this shows the layout of the outputs, not a real model's
attention.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import torch

FRAMES, SIZE, STEPS, CFG = 9, 64, 3, 5.0
POSITIONS = (1, 4, 7)  # umt5 context positions recorded (no tokenizer without ComfyUI: positions, not words)


def official_wan():
    """``wan.modules.model`` without the packages' ``__init__`` files (the official t5.py touches CUDA at import)."""
    if "wan.modules.model" not in sys.modules:
        spec = importlib.util.find_spec("wan")
        if spec is None:
            raise ImportError("the official Wan code is not installed: pip install --no-deps wan22==2.2.11 "
                              "(make demo does)")
        root = list(spec.submodule_search_locations)[0]
        for name, path in (("wan", root), ("wan.modules", os.path.join(root, "modules"))):
            if name not in sys.modules:
                pkg = types.ModuleType(name)
                pkg.__path__ = [path]
                sys.modules[name] = pkg
    import wan.modules.model as wm
    return wm


def _png(img: np.ndarray, path: str) -> str:
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((np.clip(img[..., :3], 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def sample(model, steps: int = STEPS, seed: int = 0):
    """Euler flow matching with CFG: per step the model at t = 1000 sigma, cond then uncond."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8, generator=g)
    cond, uncond = torch.randn(12, 4096, generator=g), torch.randn(8, 4096, generator=g)
    seq_len = x.shape[1] * (x.shape[2] // 2) * (x.shape[3] // 2)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([float(sigmas[i]) * 1000.0])
            v_cond = model([x], t=t, context=[cond], seq_len=seq_len)[0]
            v_uncond = model([x], t=t, context=[uncond], seq_len=seq_len)[0]
            print(f"  sampling step {i + 1}/{steps}", flush=True)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + CFG * (v_cond - v_uncond))
    return x


def main(out: str) -> int:
    from wan_capture import AttentionAnalyzer, RecordingPlan, SaveOptions, record, save_take
    from wan_capture.views.maps import sink_maps, token_maps, video_frames
    from wan_capture.views.sink_report import sink_table, write_sink_report
    wm = official_wan()
    torch.manual_seed(0)
    model = wm.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=512,
                        freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2).eval()
    plan = RecordingPlan(text_positions=POSITIONS, record_sink_stats=True)
    print(f"recording a tiny random Wan 2.1 t2v ({FRAMES} frames of {SIZE}x{SIZE}, {STEPS} steps) with wan_capture.record ...")
    with record(model, plan) as rec:
        sample(model)
    saved = save_take(rec.latest, out, "demo", SaveOptions(prompt_id="python_demo"))
    maps = os.path.join(out, "demo", "attention_maps")
    an = AttentionAnalyzer(maps)
    video = saved[0].video_id
    print(f"\nattention arrays and metadata: {saved[0].path}")
    recording = an.recording(video)
    heat = []
    for token in an.list_tokens(video):
        evo = an.get_temporal_evolution(video, token)  # [steps, spatial, pieces]
        frames = video_frames(token_maps(recording, token), recording.meta, None, "inferno", "per_video", 1.0)
        heat += [_png(f, os.path.join(out, "demo", "heatmaps", token, f"frame_{i:03d}.png")) for i, f in enumerate(frames)]
        print(f"  token '{token}': {evo.shape[0]} steps saved, {len(frames)} heatmap frames")
    received = video_frames(sink_maps(recording), recording.meta, None, "viridis", "per_video", 1.0)
    heat += [_png(f, os.path.join(out, "demo", "heatmaps", "received", f"frame_{i:03d}.png")) for i, f in enumerate(received)]
    print(f"heatmaps: {len(heat)} frames under {os.path.join(out, 'demo', 'heatmaps')}")
    from devtools.causal_demo import main as causal_demo
    causal_out = os.path.join(out, "causal_demo")
    print("\nrecording a tiny causal Wan with a sink frame and a KV cache ...")
    causal_demo(["--out", causal_out])
    causal = AttentionAnalyzer(os.path.join(causal_out, "causal_demo", "attention_maps"))
    figures = importlib.util.find_spec("matplotlib") is not None  # pip install 'wan-attention-capture[report]'
    table = sink_table(causal.recording(causal.list_videos()[0]))
    files = write_sink_report([table], os.path.join(out, "sink_report"), figures=figures)
    print(f"sink report: {len(files)} files under {os.path.join(out, 'sink_report')}"
          + ("" if figures else " (tables only: its figures need pip install 'wan-attention-capture[report]')"))
    print("\nThis ran without ComfyUI (the Python API on the official Wan code). To run the node pack inside ComfyUI, "
          "clone this repository into ComfyUI/custom_nodes/ (or set COMFYUI_PATH=<ComfyUI checkout>) and run "
          "`make demo` again.")
    return 0
