"""GPU benchmark: Wan-shaped denoising steps, plain and recording, side by side in one run.

    COMFYUI_PATH=... python -m bench.gpu_recording [--size 1.3b|14b] [--blocks N] [--repeats 5] [--json out.json]

Runs ComfyUI's real ``WanModel`` class with random weights in bf16, one CFG batch of 2 per step (cond + uncond):
``1.3b`` is Wan 2.1 1.3B (dim 1536, 12 heads of 128, 30 blocks) at 81 frames of 480x832 = 21x30x52 = 32,760 tokens;
``14b`` is Wan 14B's shape (dim 5120, 40 heads of 128, ffn 13824) at 81 frames of 720x1280 = 21x45x80 = 75,600
tokens, with a few blocks (the per-block ratios do not depend on the block count). Recording goes through the
Attach node's patch points (``install_recorder``), cond rows, every block and step. Reports per configuration the
median step time and its ratio to plain, peak GPU memory, whether outputs are identical, host memory of the recording
per step and the time to save one step; then per block, the sink kernels against the attention call ComfyUI really
makes (``comfy.ops.scaled_dot_product_attention``: cuDNN first) for the same rows.
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
    from devtools.comfy_path import use_comfyui
    use_comfyui(comfyui)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)  # without comfy_api here, the pack's __init__ registers no nodes
    pack.wan_capture = importlib.import_module(PACK + ".wan_capture")
    return pack


SIZES = {
    "1.3b": dict(dim=1536, ffn=8960, heads=12, blocks=30, frames=81, height=480, width=832),
    "14b": dict(dim=5120, ffn=13824, heads=40, blocks=2, frames=81, height=720, width=1280),
}


def build_model(dim: int, ffn: int, heads: int, blocks: int):
    import comfy.ldm.wan.model as wan
    import comfy.ops
    model = wan.WanModel(model_type="t2v", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=blocks, in_dim=16,
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


def model_inputs(size: dict):
    """The latent ``x`` and the umt5 context of a CFG batch of 2 at ``size`` (a ``SIZES`` entry), random bf16."""
    t = (size["frames"] - 1) // 4 + 1
    x = torch.randn(2, 16, t, size["height"] // 8, size["width"] // 8, device="cuda", dtype=torch.bfloat16)
    return x, torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16)


def sampling_steps(model, x, context, to: dict, sigmas):
    """A callable that runs the model's next sampling step of ``sigmas`` each call (the recorder maps each step's
    sigma to its index, so no sigma is run twice)."""
    left = iter(sigmas)

    def step():
        s = next(left)
        to["sigmas"] = torch.full((2,), s, device="cuda")
        with torch.no_grad():
            return model(x, torch.full((2,), s * 1000, device="cuda"), context, transformer_options=to)
    return step


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
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    ap.add_argument("--blocks", type=int, default=None, help="blocks to build (default: 30 for 1.3b, 2 for 14b)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-baseline", action="store_true", help="also time the chunked torch path once per block")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    if not args.comfyui or not torch.cuda.is_available():
        print("needs a CUDA GPU and --comfyui / COMFYUI_PATH", file=sys.stderr)
        return 2
    size = dict(SIZES[args.size])
    for key in ("blocks", "frames", "height", "width"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    pack = load(args.comfyui)
    wc = pack.wan_capture
    import comfy.ldm.modules.attention as comfy_attention
    from .wan_capture_bench_util import save_step_seconds
    dim, heads = size["dim"], size["heads"]
    model = build_model(dim, size["ffn"], heads, size["blocks"])
    x, context = model_inputs(size)
    grid = wc.Grid.from_latent(x.shape)
    steps = args.warmup + args.repeats
    sigmas = [1.0 - i / (steps + 1) for i in range(steps + 2)]
    big = dict(memory_budget_mb=1 << 22, store_per_head=False)
    configs = {
        "plain": (None, "on"),
        "cross maps, 8 tokens": (wc.RecordingPlan(text_positions=tuple(range(8)), **big), "on"),
        "sink statistics (single sweep)": (wc.RecordingPlan(record_cross=False, record_sink_stats=True, **big), "on"),
        "sink statistics, no key max": (wc.RecordingPlan(record_cross=False, record_sink_stats=True,
                                                         record_key_max=False, **big), "on"),
        "sink statistics (row pass forced)": (wc.RecordingPlan(record_cross=False, record_sink_stats=True, **big),
                                              "off"),
        "cross maps + sink statistics": (wc.RecordingPlan(text_positions=tuple(range(8)), record_sink_stats=True,
                                                          **big), "on"),
    }
    results = {}
    reference = None
    for name, (plan, lse_mode) in configs.items():
        os.environ["WAN_CAPTURE_LSE"] = lse_mode
        to = {"cond_or_uncond": [1, 0]}
        rec = None
        if plan is not None:
            rec, info = install(pack, model, plan, to)
            rec.begin_pass(sigmas, info)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        med, times = timed(sampling_steps(model, x, context, to, sigmas), args.repeats, args.warmup)
        peak = torch.cuda.max_memory_allocated()
        out = sampling_steps(model, x, context, to, sigmas[:1])()
        reference = out if reference is None else reference
        identical = bool(torch.equal(out, reference))
        recorded = None
        if rec is not None:
            take = rec.end_pass()
            host = take.bytes_per_step(grid, 1)
            recorded = {"steps": len(take.steps), "skipped": dict(take.skipped),
                        "host_mib_per_step": host / 2 ** 20,
                        "save_seconds_per_step": save_step_seconds(wc, take)}
            del take
            rec.takes.clear()
        results[name] = {"median_ms": med, "times_ms": times, "peak_gib": peak / 2 ** 30, "identical": identical,
                         "recorded": recorded}
        del out
    os.environ.pop("WAN_CAPTURE_LSE", None)
    plain = results["plain"]
    print(f"\nComfyUI WanModel, {args.size} shape with random weights (dim {dim}, {heads} heads of 128), "
          f"{size['blocks']} blocks, bf16, CFG batch 2, grid {grid.as_list()} = {grid.tokens} tokens, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median of {args.repeats} steps after "
          f"{args.warmup} warm-up")
    print(f"{'configuration':<36}{'step ms':>10}{'ratio':>8}{'peak GiB':>10}{'extra mem':>11}{'host MiB/step':>15}"
          f"{'save s/step':>13}  identical")
    for name, r in results.items():
        extra = (r["peak_gib"] - plain["peak_gib"]) / plain["peak_gib"] * 100
        rc = r["recorded"] or {}
        print(f"{name:<36}{r['median_ms']:>10.1f}{r['median_ms'] / plain['median_ms']:>7.3f}x"
              f"{r['peak_gib']:>10.2f}{extra:>10.2f}%{rc.get('host_mib_per_step', 0):>15.1f}"
              f"{rc.get('save_seconds_per_step', 0):>13.3f}  {r['identical']}")

    # per block: the recording kernels against the attention call ComfyUI makes, for the same rows
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, grid.tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ctx_k = torch.randn(2, 512, dim, device="cuda", dtype=torch.bfloat16)
    split = lambda z: z.view(z.shape[0], z.shape[1], heads, 128).transpose(1, 2)  # noqa: E731
    qh, kh, vh, ch = split(q), split(k), split(v), split(ctx_k)
    attn = comfy_attention.attention_pytorch
    comfy_both = timed(lambda: attn(q, k, v, heads), 10, 3)[0]
    comfy_cond = timed(lambda: attn(q[1:], k[1:], v[1:], heads), 10, 3)[0]
    comfy_cross = timed(lambda: attn(q[1:], ctx_k[1:], ctx_k[1:], heads), 10, 3)[0]
    cudnn_attention = importlib.import_module(PACK + ".wan_capture.capture.lse_attention").cudnn_attention
    cudnn_lse = timed(lambda: cudnn_attention(qh, kh, vh), 10, 3)[0]
    lse = cudnn_attention(qh, kh, vh)[1]
    ft = grid.frame_tokens
    scale = 128 ** -0.5
    sweep_cond = timed(lambda: wc.sink_statistics(qh[1:], kh[1:], scale, ft, 1 << 34, lse=lse[1:]), 10, 3)[0]
    sweep_cond_no_max = timed(lambda: wc.sink_statistics(qh[1:], kh[1:], scale, ft, 1 << 34, lse=lse[1:],
                                                         key_max=False), 10, 3)[0]
    sweep_both = timed(lambda: wc.sink_statistics(qh, kh, scale, ft, 1 << 34, lse=lse), 10, 3)[0]
    two_pass_cond = timed(lambda: wc.sink_statistics(qh[1:], kh[1:], scale, ft, 1 << 34), 10, 3)[0]
    cross = timed(lambda: wc.cross_attention_probs(qh[1:], ch[1:], list(range(8)), scale), 10, 3)[0]
    per_block = {"comfy_attention_batch2_ms": comfy_both, "comfy_attention_cond_ms": comfy_cond,
                 "comfy_cross_attention_cond_ms": comfy_cross, "cudnn_with_lse_batch2_ms": cudnn_lse,
                 "sweep_cond_ms": sweep_cond, "sweep_cond_no_key_max_ms": sweep_cond_no_max,
                 "sweep_both_rows_ms": sweep_both, "two_pass_cond_ms": two_pass_cond,
                 "cross_kernel_cond_ms": cross}
    full = {}
    for label, kw in (("cross maps, 8 tokens", dict(text_positions=tuple(range(8)))),
                      ("sink statistics", dict(record_cross=False, record_sink_stats=True)),
                      ("both", dict(text_positions=tuple(range(8)), record_sink_stats=True))):
        plan = wc.RecordingPlan(memory_budget_mb=1 << 22, store_per_block=True, store_per_head=True, **kw)
        take = wc.Take(plan, wc.describe_model(model))
        full[label] = {"mib_per_step_one_video": take.bytes_per_step(grid, 1) / 2 ** 20,
                       "full_model_blocks": size["blocks"]}
    print("host memory of a full recording (every block and head, float16, one video) per step: " +
          ", ".join(f"{k} {v['mib_per_step_one_video']:.1f} MiB" for k, v in full.items()) +
          f" for {size['blocks']} blocks")
    print(f"\nper block, against ComfyUI's attention call (cuDNN first): batch 2 {comfy_both:.2f} ms, cond row "
          f"{comfy_cond:.2f} ms; cuDNN with log-sum-exp (batch 2) {cudnn_lse:.2f} ms")
    print(f"  sink statistics, single sweep: cond row {sweep_cond:.2f} ms ({sweep_cond / comfy_cond:.2f}x the "
          f"call for that row), both rows {sweep_both:.2f} ms ({sweep_both / comfy_both:.2f}x)")
    print(f"  sink statistics without the key max (record_key_max off): cond row {sweep_cond_no_max:.2f} ms "
          f"({sweep_cond_no_max / comfy_cond:.2f}x)")
    print(f"  sink statistics, two passes (row pass + column pass): cond row {two_pass_cond:.2f} ms "
          f"({two_pass_cond / comfy_cond:.2f}x)")
    print(f"  tracked-token cross maps {cross:.3f} ms (ComfyUI's cross-attention call, cond row {comfy_cross:.3f} ms)")
    if args.torch_baseline:
        os.environ["WAN_CAPTURE_BACKEND"] = "torch"
        base = timed(lambda: wc.sink_statistics(qh[1:], kh[1:], scale, ft, 1 << 30), 2, 1)[0]
        os.environ.pop("WAN_CAPTURE_BACKEND")
        per_block["sink_torch_cond_ms"] = base
        print(f"chunked torch path for the same sink statistics: {base:.1f} ms ({base / sweep_cond:.1f}x the sweep)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "shape": size, "configs": results, "per_block": per_block,
                       "host_memory_full_recording": full,
                       "grid": grid.as_list(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": importlib.import_module("triton").__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
