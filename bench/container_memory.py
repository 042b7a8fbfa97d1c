"""Peak GPU memory of 0.38.1's tensor-container attention path (the stand-in, devtools/comfy_0381.py) with and without
the recorder: the containers let a kernel free q, k and v as it takes them; a recorder that held them through the
kernel would add their bytes to the peak. Measured side by side in one process, on the same tiny Wan (2 blocks,
2 heads) at a token count where q, k and v are large next to everything but the kernel's own scores.

    COMFYUI_PATH=<ComfyUI checkout> python -m bench.container_memory [--frames 81 --height 240 --width 416]
        [--json bench/results_container_memory.json]

Three runs of one sampling step: ComfyUI alone; with the recorder (its container path: it reads q and k from the
containers, then hands them on); with the recorder forced onto the path that takes the tensors out of the containers
first (what 0.38.1 does for an override without a container path): the wrapper holds them while the kernel runs.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this measures GPU memory")
        return 0
    import devtools.tiny_comfy as tc
    pack = tc.load_comfy(cpu=False)
    import devtools.comfy_0381 as c381
    import comfy.ldm.modules.attention as attention
    ckpt = tc.tiny_wan_checkpoint(os.path.join(tempfile.mkdtemp(), "t2v.safetensors"), "t2v", seed=5)
    latent = tc.empty_latent("t2v", args.frames, args.height, args.width)
    tokens = latent["samples"][0, 0].numel() // 4
    wc = pack.wan_capture
    results = {}
    with c381.emulate():
        attention.optimized_attention.container_function = c381._takes_containers("global", False)
        try:
            for name in ("plain", "recorder", "recorder holding q/k/v"):
                model = c381.wan_patcher(ckpt, device="cuda")
                if name != "plain":
                    rec = wc.Recorder(wc.RecordingPlan(text_positions=(0, 5), record_sink_stats=True))
                    model = pack.nodes.comfy_attach.attach_recorder(model, rec)
                ca = pack.nodes.comfy_attach
                made = ca._make_override
                if name.endswith("holding q/k/v"):  # overrides without a container path: 0.38.1 takes the
                    def without(state, previous, made=made):  # tensors out first and holds them through the call
                        override = made(state, previous)
                        override.container_function = None
                        return override
                    ca._make_override = without
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                tc.ksampler(model, tc.conditioning("t2v", 1), tc.conditioning("t2v", 2), latent, steps=1, cfg=1.0)
                torch.cuda.synchronize()
                ca._make_override = made
                results[name] = {"peak_bytes": torch.cuda.max_memory_allocated() - base}
                if name != "plain":
                    results[name]["recorded"] = rec.latest.status
                del model
        finally:
            attention.optimized_attention.container_function = None
    qkv = 3 * tokens * 256 * 4  # one call's q, k and v (float32, dim 256)
    plain = results["plain"]["peak_bytes"]
    out = {"device": torch.cuda.get_device_name(), "tokens": tokens, "qkv_bytes_per_call": qkv,
           "runs": results, "extra_peak_recorder": results["recorder"]["peak_bytes"] - plain,
           "extra_peak_holding": results["recorder holding q/k/v"]["peak_bytes"] - plain}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
