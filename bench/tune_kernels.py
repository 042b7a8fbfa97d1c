"""Time the sink-statistics kernels' block shapes on this GPU at Wan 1.3B's size (one CFG row, 12 heads of 128,
32,760 tokens, frames of 1,560) or Wan 14B's at 720p (40 heads, 75,600 tokens, frames of 3,600) and print the
fastest; kernels.ROW_CONFIG / COL_CONFIG / SWEEP_CONFIG hold the chosen ones, kernels.sweep_splits the splits.

    python -m bench.tune_kernels [row] [column] [sweep] [variants] [pinned] [--size 1.3b|14b] [--no-key-max]

``variants``: the sweep at the shipped block shape with and without the per-key max (what that statistic costs). ``pinned``: what the per-block
pinned host copies of a recorded step cost, against one pinned buffer per step carved into views.
"""
import sys

import torch
import triton.testing

from wan_capture import KeyLayout
from wan_capture.stats import kernels

ROW = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 128, 4, 2),
       (128, 64, 4, 2), (64, 64, 4, 3)]
SWEEP = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 4, 2), (64, 64, 4, 3), (256, 64, 8, 2), (128, 64, 8, 2),
         (128, 32, 4, 3), (64, 128, 4, 3)]
SWEEP_SPLITS = [None, 8, 16, 32]  # None: kernels.sweep_splits
COL = [(64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 2),
       (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
KEY_MAX = "--no-key-max" not in sys.argv  # sweep timings without the per-key max (record_key_max off)
SIZES = {"1.3b": (32760, 1560, 12), "14b": (75600, 3600, 40)}


def main(argv):
    size = argv[argv.index("--size") + 1] if "--size" in argv else "1.3b"
    only = [a for a in argv if a in ("row", "column", "sweep", "variants", "pinned")]
    torch.manual_seed(0)
    tokens, ft, heads = SIZES[size]
    dim = heads * 128
    q = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16).view(1, tokens, heads, 128).transpose(1, 2)
    k = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16).view(1, tokens, heads, 128).transpose(1, 2)
    scale, layout = 128 ** -0.5, KeyLayout()
    # the model's own call for this row (ComfyUI: cuDNN first): what the per-block ratio is taken against
    v = torch.randn_like(q)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
        ref = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=50,
                                      rep=300, return_mode="median")
    from wan_capture.capture.lse_attention import cudnn_attention
    lse = cudnn_attention(q, k, v)[1].reshape(heads, tokens)
    del v
    print(f"{size}: cuDNN attention, this row: {ref:.2f} ms; splits chosen for the sweep: "
          f"{kernels.sweep_splits(tokens, -(-tokens // ft), heads, ft, 128, q.device)}")
    best = {}
    if "variants" in only:
        variants(q, k, scale, layout, ft, lse, ref)
    if "pinned" in only:
        pinned(tokens)
    runs = [("row", [(c, None) for c in ROW], lambda c, s: kernels.row_pass(q, k, scale, layout, ft, True, config=c)),
            ("column", [(c, None) for c in COL], lambda c, s: kernels.column_pass(q, k, scale, layout, ft, lse, config=c)),
            ("sweep", [(c, s) for c in SWEEP for s in SWEEP_SPLITS],
             lambda c, s: kernels.sweep(q, k, scale, layout, ft, lse, config=c, splits=s, key_max=KEY_MAX))]
    for name, cases, fn in runs:
        if only and name not in only:
            continue
        for c, s in cases:
            try:
                ms = triton.testing.do_bench(lambda: fn(c, s), warmup=50, rep=300, return_mode="median")
            except Exception as e:  # a shape that does not fit this GPU's shared memory or registers
                print(f"{name} {c} splits {s}: failed ({type(e).__name__})")
                continue
            print(f"{name} {c} splits {s or 'auto'}: {ms:.2f} ms ({ms / ref:.3f}x cuDNN)", flush=True)
            if name not in best or ms < best[name][2]:
                best[name] = (c, s, ms)
    for name, (c, s, ms) in best.items():
        print(f"best {name}: {c} splits {s or 'auto'} {ms:.2f} ms ({ms / ref:.3f}x cuDNN)")


def variants(q, k, scale, layout, ft, lse, ref):
    """The sweep at the shipped shape with and without the per-key max (what that statistic costs)."""
    base = kernels.sweep(q, k, scale, layout, ft, lse)
    for kmax in (True, False):
        got = kernels.sweep(q, k, scale, layout, ft, lse, key_max=kmax)
        same = torch.equal(got[0], base[0])
        ms = triton.testing.do_bench(lambda: kernels.sweep(q, k, scale, layout, ft, lse, key_max=kmax), warmup=50,
                                     rep=300, return_mode="median")
        print(f"variant key max {'on' if kmax else 'off'}: {ms:.2f} ms ({ms / ref:.3f}x cuDNN); received identical to "
              f"the full sweep's: {same}", flush=True)


def pinned(tokens, blocks=30):
    """One recorded step's host copies (cross maps of 8 tokens in float16 and sink statistics, per block, one
    video): a pinned buffer each (what the collector does) against views of one pinned buffer per step."""
    import time
    sizes = [tokens * 8 * 2, tokens * 4, tokens * 4] * blocks  # bytes: cross maps, received, key max
    srcs = [torch.empty(n // 2, dtype=torch.float16, device="cuda") for n in sizes]
    torch.cuda.synchronize()

    def each():
        return [torch.empty(s.shape, dtype=s.dtype, pin_memory=True).copy_(s, non_blocking=True) for s in srcs]

    def pooled():
        slab = torch.empty(sum(s.numel() for s in srcs), dtype=torch.float16, pin_memory=True)
        out, at = [], 0
        for s in srcs:
            out.append(slab[at:at + s.numel()].view(s.shape).copy_(s, non_blocking=True))
            at += s.numel()
        return out

    for name, fn in (("a pinned buffer per copy", each), ("one pinned buffer per step", pooled)):
        keep = []
        for _ in range(3):
            keep.append(fn())
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            keep.append(fn())  # kept, as a take keeps them: nothing returns to the pinned cache
        torch.cuda.synchronize()
        print(f"pinned host copies of one step ({len(srcs)} arrays, {sum(sizes) / 2**20:.1f} MiB): {name} "
              f"{(time.perf_counter() - t) / 10 * 1000:.2f} ms", flush=True)
        del keep


if __name__ == "__main__":
    main(sys.argv[1:])
