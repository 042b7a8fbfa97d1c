"""GPU benchmark: Wan 1.3B-shaped denoising steps, plain and recording, side by side in one run.

    COMFYUI_PATH=... python bench/gpu_recording.py [--frames 81 --height 480 --width 832 --blocks 30 --repeats 5]

Runs ComfyUI's real ``WanModel`` class with random weights in the 1.3B configuration (dim 1536, 12 heads of 128,
30 blocks, umt5 context of 512) in bf16, one CFG batch of 2 per step (cond + uncond), 81 frames at 480x832 =
32,760 tokens. Recording goes through the exact patch points the Attach node installs (attention override, block
patches, forward wrapper), recording the cond rows on every block and every step. Reports, per configuration,
the median step time and its ratio to plain, and the peak GPU memory; then per block, the recording kernels'
time against SDPA's.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "wan_attention_capture"


def load(comfyui: str):
    sys.path.insert(0, comfyui)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)  # without comfy_api here, the pack's __init__ registers no nodes
    pack.wan_capture = importlib.import_module(PACK + ".wan_capture")
    return pack


def build_model(blocks: int):
    import comfy.ldm.wan.model as wan
    import comfy.ops
    model = wan.WanModel(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=blocks, in_dim=16,
                         out_dim=16, text_dim=4096, freq_dim=256, device="cuda", dtype=torch.bfloat16,
                         operations=comfy.ops.disable_weight_init)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def install(pack, model, plan, to: dict):
    """The Attach node's patch points, installed into ``transformer_options`` through the public install function."""
    ca = importlib.import_module(PACK + ".nodes.comfy_attach")
    wc = pack.wan_capture
    rec = wc.Recorder(plan)
    info = wc.describe_model(model, model_type="WAN21")
    ca.install_recorder(to, rec, info)
    return rec, info


def timed(fn, repeats: int, warmup: int):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-baseline", action="store_true", help="also time the chunked torch path once per block")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    if not args.comfyui or not torch.cuda.is_available():
        print("needs a CUDA GPU and --comfyui / COMFYUI_PATH", file=sys.stderr)
        return 2
    pack = load(args.comfyui)
    wc = pack.wan_capture
    model = build_model(args.blocks)
    t = (args.frames - 1) // 4 + 1
    x = torch.randn(2, 16, t, args.height // 8, args.width // 8, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16)
    grid = wc.Grid.from_latent(x.shape)
    steps = args.warmup + args.repeats
    sigmas = [1.0 - i / (steps + 1) for i in range(steps + 2)]
    big = dict(memory_budget_mb=1 << 20, store_per_head=False)
    configs = {
        "plain": None,
        "cross maps, 8 tokens": wc.RecordingPlan(text_positions=tuple(range(8)), **big),
        "sink statistics": wc.RecordingPlan(record_cross=False, record_sink_stats=True, **big),
        "cross maps + sink statistics": wc.RecordingPlan(text_positions=tuple(range(8)), record_sink_stats=True, **big),
    }
    results = {}
    reference = None
    for name, plan in configs.items():
        to = {"cond_or_uncond": [1, 0]}
        rec = None
        if plan is not None:
            rec, info = install(pack, model, plan, to)
            rec.begin_pass(sigmas, info)
        counter = {"i": 0}

        def step():
            s = sigmas[counter["i"]]
            counter["i"] += 1
            to["sigmas"] = torch.full((2,), s, device="cuda")
            with torch.no_grad():
                return model(x, torch.full((2,), s * 1000, device="cuda"), context, transformer_options=to)

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        med, times = timed(step, args.repeats, args.warmup)
        peak = torch.cuda.max_memory_allocated()
        counter["i"] = 0
        with torch.no_grad():
            to["sigmas"] = torch.full((2,), sigmas[0], device="cuda")
            out = model(x, torch.full((2,), sigmas[0] * 1000, device="cuda"), context, transformer_options=to)
        reference = out if reference is None else reference
        identical = bool(torch.equal(out, reference))
        recorded = None
        if rec is not None:
            take = rec.end_pass()
            recorded = {"steps": len(take.steps), "skipped": dict(take.skipped)}
        results[name] = {"median_ms": med, "times_ms": times, "peak_gib": peak / 2 ** 30, "identical": identical,
                         "recorded": recorded}
        del out
    plain = results["plain"]
    print(f"\nComfyUI WanModel, 1.3B config with random weights, {args.blocks} blocks, bf16, CFG batch 2, "
          f"grid {grid.as_list()} = {grid.tokens} tokens, {torch.cuda.get_device_name()}; "
          f"median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'configuration':<32}{'step ms':>10}{'ratio':>8}{'peak GiB':>10}{'extra mem':>11}  output identical")
    for name, r in results.items():
        extra = (r["peak_gib"] - plain["peak_gib"]) / plain["peak_gib"] * 100
        print(f"{name:<32}{r['median_ms']:>10.1f}{r['median_ms'] / plain['median_ms']:>7.3f}x"
              f"{r['peak_gib']:>10.2f}{extra:>10.2f}%  {r['identical']}")

    # per block: the recording kernels against the attention itself
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, grid.tokens, 1536, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ctx_k = torch.randn(2, 512, 1536, device="cuda", dtype=torch.bfloat16)
    split = lambda z: z.view(z.shape[0], z.shape[1], 12, 128).transpose(1, 2)  # noqa: E731
    qh, kh, vh, ch = split(q), split(k), split(v), split(ctx_k)
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh), 10, 3)[0]
    sdpa_cross = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qh, ch, ch), 10, 3)[0]
    ft = grid.frame_tokens
    sink_cond = timed(lambda: wc.sink_statistics(qh[1:], kh[1:], 128 ** -0.5, ft), 10, 3)[0]
    sink_both = timed(lambda: wc.sink_statistics(qh, kh, 128 ** -0.5, ft), 10, 3)[0]
    cross = timed(lambda: wc.cross_attention_probs(qh[1:], ch[1:], list(range(8)), 128 ** -0.5), 10, 3)[0]
    per_block = {"sdpa_self_ms": sdpa, "sdpa_cross_ms": sdpa_cross, "sink_kernels_cond_ms": sink_cond,
                 "sink_kernels_both_rows_ms": sink_both, "cross_kernel_cond_ms": cross}
    print(f"\nper block: SDPA self-attention (batch 2) {sdpa:.2f} ms; sink statistics kernels on the cond row "
          f"{sink_cond:.2f} ms ({sink_cond / sdpa:.2f}x SDPA), on both rows {sink_both:.2f} ms "
          f"({sink_both / sdpa:.2f}x SDPA); tracked-token cross maps {cross:.3f} ms "
          f"(SDPA cross-attention {sdpa_cross:.3f} ms)")
    if args.torch_baseline:
        os.environ["WAN_CAPTURE_BACKEND"] = "torch"
        base = timed(lambda: wc.sink_statistics(qh[1:], kh[1:], 128 ** -0.5, ft, 1 << 30), 2, 1)[0]
        os.environ.pop("WAN_CAPTURE_BACKEND")
        per_block["sink_torch_cond_ms"] = base
        print(f"chunked torch path for the same sink statistics: {base:.1f} ms ({base / sink_cond:.1f}x the kernels)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"configs": results, "per_block": per_block, "grid": grid.as_list(),
                       "device": torch.cuda.get_device_name()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
