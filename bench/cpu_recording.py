"""CPU benchmark: tiny Wan sampling through real ComfyUI, plain and recording, side by side in one run.

    python -m bench.cpu_recording [--repeats 5] [--blocks 4] [--frames 17] [--size 128]

Reports the median wall time of each configuration and its ratio to plain sampling. Recording configurations
record on every block and every step: cross-attention maps of 8 text positions, sink statistics, and both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from importlib import import_module

import devtools.tiny_comfy as tc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=128, help="pixel height and width")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    if tc.COMFYUI is None:
        print(tc.NOT_FOUND, file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pack = tc.load_comfy()
    wc = pack.wan_capture
    attach = import_module(pack.__name__ + ".nodes.comfy_attach").attach_recorder
    ckpt = tc.tiny_wan_checkpoint(os.path.join(tempfile.mkdtemp(), "bench.safetensors"), blocks=args.blocks)
    base = tc.load_model(ckpt)
    pos, neg = tc.conditioning("t2v", 1), tc.conditioning("t2v", 2)
    latent = tc.empty_latent("t2v", frames=args.frames, height=args.size, width=args.size)
    configs = {
        "plain": None,
        "cross maps (8 tokens)": dict(text_positions=tuple(range(8))),
        "sink stats": dict(record_cross=False, record_sink_stats=True),
        "cross + sink": dict(text_positions=tuple(range(8)), record_sink_stats=True),
    }
    models = {name: base if kw is None else attach(base, wc.Recorder(wc.RecordingPlan(**kw)))
              for name, kw in configs.items()}
    times = {name: [] for name in configs}
    tc.ksampler(base, pos, neg, latent, steps=args.steps)  # warm-up
    reference = None
    for _ in range(args.repeats):
        for name, model in models.items():  # interleaved, so drift hits every configuration alike
            t0 = time.perf_counter()
            out = tc.ksampler(model, pos, neg, latent, steps=args.steps)
            times[name].append(time.perf_counter() - t0)
            reference = out["samples"] if reference is None else reference
            assert torch.equal(out["samples"], reference), f"{name} changed the sampled latent"
    grid = wc.Grid.from_latent(latent["samples"].shape)
    print(f"tiny Wan 2.1 t2v: {args.blocks} blocks, 2 heads, grid {grid.as_list()} = {grid.tokens} tokens, "
          f"{args.steps} steps, CFG batch 2, {torch.get_num_threads()} CPU threads, median of {args.repeats}")
    plain = statistics.median(times["plain"])
    print(f"{'configuration':<24}{'median s':>10}{'ratio':>8}")
    for name, ts in times.items():
        print(f"{name:<24}{statistics.median(ts):>10.4f}{statistics.median(ts) / plain:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
