"""Peak memory of 0.38.1's tensor-container attention path (the stand-in, devtools/comfy_0381.py) with and without
the recorder: the containers let a kernel free q, k and v as it takes them; a recorder that held them through the
kernel would add their bytes to the peak. Measured side by side in one process, on the same tiny Wan (2 blocks,
2 heads) at a token count where q, k and v are large next to everything but the kernel's own scores.

    COMFYUI_PATH=<ComfyUI checkout> python -m bench.container_memory [--device cuda|cpu] [--frames 81
        --height 240 --width 416] [--json bench/results_container_memory.json]

The kernel is a memory-saving one of the kind containers exist for: on its container path it takes each tensor,
copies it into its head-first layout and lets the original go before attending (SDPA); handed tensors, the same
kernel cannot free them. It notes the bytes allocated at its fullest point (its copies made, before it attends).
After a warm-up run (not reported), three runs of one sampling step: ComfyUI alone; with the recorder (its
container path: it reads q and k from the containers, then hands the containers on); with the recorder forced onto
the path that takes the tensors out of the containers first (what 0.38.1 does for an override without a container
path): the override holds them while the kernel runs. Reported: the kernel's peak and the step's peak over the
plain run's, and whether the three outputs are bit-identical.

Memory is counted by the allocator: on CUDA its statistics (``torch.cuda.memory_allocated``); on the CPU, which
keeps none, the profiler's allocation events (``profile_memory=True``) summed in time order.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU meter's profiler: no ERROR line for the GPU it does not use
import torch  # noqa: E402


FULLEST = "container_memory.kernel_fullest"  # the profiler range the CPU meter reads the kernel's peak at


class CudaMeter:
    """Bytes allocated on the GPU, from the caching allocator's own statistics."""

    def __init__(self):
        self.kernel_peak = 0

    @contextlib.contextmanager
    def step(self):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.kernel_peak, self.base = 0, torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        self.step_peak = torch.cuda.max_memory_allocated() - self.base
        self.kernel_peak -= self.base

    def mark(self) -> None:
        """The kernel's fullest point."""
        self.kernel_peak = max(self.kernel_peak, torch.cuda.memory_allocated())


class CpuMeter:
    """Bytes allocated on the CPU: the profiler's allocation events (+ on allocation, - on free) summed in time
    order; the kernel's peak is the sum where its marks stand."""

    def __init__(self):
        self.kernel_peak = 0

    @contextlib.contextmanager
    def step(self):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        events = sorted(((e.start_ns(), e.name(), e.nbytes() if e.name() == "[memory]" else 0)
                         for e in prof.profiler.kineto_results.events()
                         if e.name() in ("[memory]", FULLEST)), key=lambda e: e[0])
        live, self.step_peak, self.kernel_peak = 0, 0, 0
        for _, name, nbytes in events:
            live += nbytes
            self.step_peak = max(self.step_peak, live)
            if name == FULLEST:
                self.kernel_peak = max(self.kernel_peak, live)

    def mark(self) -> None:
        """The kernel's fullest point."""
        with torch.profiler.record_function(FULLEST):
            pass


METER = None  # the run's meter, read by the kernel
CALLS = {"containers": 0, "tensors": 0}  # the kernel's calls by path


def _head_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2).contiguous()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    METER.mark()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def tensor_kernel(q, k, v, heads, **kwargs):
    """The kernel handed tensors: its caller holds them, so they live while it runs."""
    CALLS["tensors"] += 1
    return _attend(_head_first(q, heads), _head_first(k, heads), _head_first(v, heads))


def container_kernel(*args, **kwargs):
    """The same kernel's container path, as a memory-saving kernel's: each tensor is taken, copied into the
    kernel's head-first layout and let go before the next, so nothing but the copies is alive when it attends."""
    CALLS["containers"] += 1
    heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
    return _attend(*(_head_first(c.take(), heads) for c in args[:3]))


def main(argv=None) -> int:
    global METER
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import devtools.tiny_comfy as tc
    pack = tc.load_comfy(cpu=args.device == "cpu")
    import devtools.comfy_0381 as c381
    import comfy.ldm.modules.attention as attention
    ckpt = tc.tiny_wan_checkpoint(os.path.join(tempfile.mkdtemp(), "t2v.safetensors"), "t2v", seed=5)
    latent = tc.empty_latent("t2v", args.frames, args.height, args.width)
    tokens = latent["samples"][0, 0].numel() // 4
    wc = pack.wan_capture
    ca = pack.nodes.comfy_attach
    made = ca._make_override
    results, outputs = {}, {}
    METER = CudaMeter() if args.device == "cuda" else CpuMeter()
    with c381.emulate():
        kernel = c381.wrap_attn(tensor_kernel)
        kernel.container_function = container_kernel
        attention.optimized_attention = kernel  # the stand-in Wan looks the global kernel up at each call
        # a first run (not reported) takes the one-time allocations (cuDNN/cuBLAS workspaces, Triton's compiles)
        for name in ("warm-up", "plain", "recorder", "recorder holding q/k/v"):
            model = c381.wan_patcher(ckpt, device=args.device)
            if name.endswith("holding q/k/v"):  # an override without a container path: 0.38.1 takes the
                def without(state, previous, made=made):  # tensors out first; the override holds them through the call
                    override = made(state, previous)
                    override.container_function = None
                    return override
                ca._make_override = without
            rec = None
            try:
                if name != "plain":
                    rec = wc.Recorder(wc.RecordingPlan(text_positions=(0, 5), record_sink_stats=True))
                    model = ca.attach_recorder(model, rec)
                CALLS.update(containers=0, tensors=0)
                with METER.step():
                    out = tc.ksampler(model, tc.conditioning("t2v", 1), tc.conditioning("t2v", 2), latent, steps=1,
                                      cfg=1.0)
            finally:
                ca._make_override = made
            outputs[name] = out["samples"].cpu()
            results[name] = {"step_peak_bytes": METER.step_peak, "kernel_peak_bytes": METER.kernel_peak,
                             "kernel_calls": dict(CALLS)}
            if rec is not None:
                results[name]["recorded"] = rec.latest.status
                results[name]["arrays_recorded"] = len(list(rec.latest.store.keys()))
            del model, rec
    del results["warm-up"]
    qkv = 3 * tokens * 256 * 4  # one self-attention call's q, k and v (float32, dim 256)
    plain = results["plain"]
    holding = results["recorder holding q/k/v"]
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "tokens": tokens, "qkv_bytes_per_call": qkv, "runs": results,
           "outputs_identical": all(torch.equal(outputs["plain"], o) for o in outputs.values()),
           "extra_kernel_peak_recorder": results["recorder"]["kernel_peak_bytes"] - plain["kernel_peak_bytes"],
           "extra_kernel_peak_holding": holding["kernel_peak_bytes"] - plain["kernel_peak_bytes"],
           "extra_step_peak_recorder": results["recorder"]["step_peak_bytes"] - plain["step_peak_bytes"],
           "extra_step_peak_holding": holding["step_peak_bytes"] - plain["step_peak_bytes"]}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
