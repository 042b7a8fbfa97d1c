"""Where a recorded step's GPU time goes: one step of ComfyUI's WanModel (random weights, the 1.3B shape) with the
full sink set recorded, under ``torch.profiler``, every GPU kernel's total time beside the same step unrecorded.

    python -m bench.profile_sink_step --comfyui ~/ComfyUI [--json out.json]

The difference between the two steps' kernel totals, kernel by kernel, is what recording adds: the sweep and its
frame-tail kernel, and the small kernels around them (buffers, per-frame means, host copies).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

from .gpu_recording import SIZES, build_model, install, load, model_inputs, sampling_steps


def kernel_times(step) -> dict:
    """GPU time (ms) of each kernel name in one call of ``step`` (after one warm-up call)."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] += e.device_time_total / 1e3
    return dict(totals)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.comfyui or not torch.cuda.is_available():
        print("needs a CUDA GPU and --comfyui / COMFYUI_PATH", file=sys.stderr)
        return 2
    size = SIZES[args.size]
    pack = load(args.comfyui)
    wc = pack.wan_capture
    model = build_model(size["dim"], size["ffn"], size["heads"], size["blocks"])
    x, context = model_inputs(size)
    sigmas = [1.0 - i / 5 for i in range(5)]
    out = {}
    for name, plan in (("plain", None), ("sink statistics", wc.RecordingPlan(
            record_cross=False, record_sink_stats=True, memory_budget_mb=1 << 22, store_per_head=False))):
        os.environ["WAN_CAPTURE_LSE"] = "on"
        to = {"cond_or_uncond": [1, 0]}
        rec = None
        if plan is not None:
            rec, info = install(pack, model, plan, to)
            rec.begin_pass(sigmas, info)
        out[name] = kernel_times(sampling_steps(model, x, context, to, sigmas))
        if rec is not None:
            rec.end_pass()
    plain, rec = out["plain"], out["sink statistics"]
    names = sorted(set(plain) | set(rec), key=lambda n: -(rec.get(n, 0) - plain.get(n, 0)))
    total = sum(rec.values()) - sum(plain.values())
    print(f"{torch.cuda.get_device_name()}, {args.size}, {size['blocks']} blocks; GPU kernel time a step: plain "
          f"{sum(plain.values()):.1f} ms, recorded {sum(rec.values()):.1f} ms, added {total:.1f} ms")
    for n in names:
        d = rec.get(n, 0) - plain.get(n, 0)
        if abs(d) >= 0.05:
            print(f"{d:9.2f} ms  (plain {plain.get(n, 0):8.2f}, recorded {rec.get(n, 0):8.2f})  {n[:150]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "size": args.size, "kernels_ms": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
