"""``python -m wan_capture causal-demo``: a tiny causal Wan with sink frames and a local window, run through the
chunked KV-cache inference loop, recorded, saved, read back and drawn; prints where the arrays and pictures are.

With ``--self-forcing PATH`` (or ``SELF_FORCING_PATH``) the model is Self-Forcing's own ``CausalWanModel`` (tiny, random
weights, in bf16 as it runs); otherwise the project's own :mod:`devtools.tiny_causal` model.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch

from wan_capture.adapters import record
from wan_capture.adapters.causal_wan import self_forcing_modules
from wan_capture.recording.analyzer import AttentionAnalyzer
from wan_capture.plan import FrameWindow, RecordingPlan
from wan_capture.recording.save import SaveOptions, save_take
from .tiny_causal import CausalWanModel, causal_generate
from wan_capture.recording import FolderRecording
from wan_capture.views.maps import frame_mass_images, sink_maps, token_maps, window_image


def _png(img: np.ndarray, path: str) -> str:
    from PIL import Image
    Image.fromarray((np.clip(img[..., :3], 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def _strip(maps: np.ndarray, what: str) -> np.ndarray:
    """``[F, h, w]`` latent-frame maps side by side, labelled by frame, one colour range with its legend."""
    from wan_capture.views.maps import grid_image
    return grid_image([maps[:, None]], [what], [f"frame {i}" for i in range(maps.shape[0])], 0, "inferno", "shared",
                      f"{what} per latent frame", cell=96)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wan_capture causal-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("out", "causal_demo"), help="output folder")
    ap.add_argument("--self-forcing", default=os.environ.get("SELF_FORCING_PATH"),
                    help="a Self-Forcing checkout: use its CausalWanModel")
    ap.add_argument("--frames", type=int, default=12, help="latent frames")
    ap.add_argument("--chunk", type=int, default=3, help="latent frames per chunk")
    ap.add_argument("--cache-frames", type=int, default=5, help="KV cache size in frames (local_attn_size)")
    ap.add_argument("--sink", type=int, default=1, help="sink frames kept at the front of the cache")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    h = w = 8  # latent 8x8 -> 4x4 tokens per frame
    noise = torch.randn(1, 16, args.frames, h, w)
    context = torch.randn(1, 24, 4096)
    # every head kept, in float32: which heads are sink heads is a question the sink report answers per head
    plan = RecordingPlan(text_positions=(0, 1, 2), record_sink_stats=True, storage_dtype="float32",
                         store_per_head=True, window=FrameWindow(min(7, args.frames - 1), min(8, args.frames)))
    with contextlib.ExitStack() as stack:
        if args.self_forcing:
            # without flash-attn, the recorder's tap runs Self-Forcing's cross-attention with its SDPA stand-in
            try:
                cm, _ = stack.enter_context(self_forcing_modules(args.self_forcing))
            except (ImportError, FileNotFoundError) as e:  # a missing package or a wrong path: say which
                ap.error(str(e))
            model = cm.CausalWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256,
                                      ffn_dim=512, freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2,
                                      local_attn_size=args.cache_frames, sink_size=args.sink).eval().to(torch.bfloat16)
            noise, context, which = noise.bfloat16(), context.bfloat16(), "Self-Forcing's CausalWanModel"
        else:
            model = CausalWanModel(dim=256, num_heads=2, num_layers=2, local_attn_size=args.cache_frames,
                                   sink_size=args.sink, frame_tokens=(h // 2) * (w // 2)).eval()
            which = "devtools.tiny_causal.CausalWanModel"
        with record(model, plan) as rec:
            causal_generate(model, noise, context, args.chunk, cache_frames=args.cache_frames)
    take = rec.latest
    videos = save_take(take, args.out, "causal_demo", SaveOptions(storage_dtype="float32", prompt_id="causal"))
    maps_dir = os.path.join(args.out, "causal_demo", "attention_maps")
    video = videos[0].video_id
    an, src = AttentionAnalyzer(maps_dir), FolderRecording.open(maps_dir, video)
    pics = os.path.join(args.out, "pictures")
    os.makedirs(pics, exist_ok=True)
    last = max(s for s in src.steps if take.step_pass.get(s) == "denoise")
    mass = np.mean([an.get_causal_self_attention(video, s, "frame_mass").mean(0) for s in src.steps], axis=0)
    written = [
        _png(frame_mass_images(mass, src.heads, False, "inferno", "all steps:", src.sink_frames)[0],
             os.path.join(pics, "causal_frame_mass.png")),
        _png(_strip(sink_maps(src)[0], "attention received"), os.path.join(pics, "received_per_key_frame.png")),
        _png(_strip(token_maps(src, src.labels[0], [last])[0], f"'{src.labels[0]}', step {last}"),
             os.path.join(pics, f"token_{src.labels[0]}.png")),
    ]
    win = src.window(0, 0)
    written.append(_png(window_image(win, "scores", None, take.grid.frame_tokens, "inferno", "shared",
                                     title="step 0, block 0:")[0], os.path.join(pics, "window_scores.png")))
    events = an.load_kv_cache_events(video)
    evicted = sorted({f for e in events for f in e["evicted"]})
    print(f"causal Wan demo ({which}): {args.frames} latent frames in chunks of {args.chunk}, KV cache of "
          f"{args.cache_frames} frames with {args.sink} sink frame(s); {len(take.chunks)} chunks x "
          f"{len(src.steps)} steps (step {src.steps[-1]} = the context pass) x {len(take.blocks)} blocks recorded")
    print(f"KV-cache log: {len(events)} events, sink frames {an.sink_frames(video)}, evicted frames {evicted}")
    print(f"arrays: {videos[0].path} ({len(videos[0].files)} files, status {videos[0].status})")
    for p in written:
        print(f"picture: {p}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0 if videos[0].status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
