"""Time the sink-statistics kernels' block shapes on this GPU at Wan 1.3B's size (one CFG row, 12 heads of 128,
32,760 tokens, frames of 1,560) and print the fastest; kernels.ROW_CONFIG / COL_CONFIG / SWEEP_CONFIG hold the chosen ones.

    python bench/tune_kernels.py
"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_capture import KeyLayout  # noqa: E402
from wan_capture import kernels  # noqa: E402

ROW = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 128, 4, 2),
       (128, 64, 4, 2), (64, 64, 4, 3)]
SWEEP = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 4, 3),
         (256, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2)]
COL = [(64, 128, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 2),
       (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]


def main(only=None):
    torch.manual_seed(0)
    tokens, ft = 32760, 1560
    q = torch.randn(1, tokens, 1536, device="cuda", dtype=torch.bfloat16).view(1, tokens, 12, 128).transpose(1, 2)
    k = torch.randn(1, tokens, 1536, device="cuda", dtype=torch.bfloat16).view(1, tokens, 12, 128).transpose(1, 2)
    scale, layout = 128 ** -0.5, KeyLayout()
    lse = kernels.row_pass(q, k, scale, layout, ft, True)[0]
    # the model's own call for this row (ComfyUI: cuDNN first): what the per-block ratio is taken against
    v = torch.randn_like(q)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
        ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=50,
                                     rep=300, return_mode="median")
    print(f"cuDNN attention, this row: {ms:.2f} ms")
    best = {}
    for name, configs, fn in [
        ("row", ROW, lambda c: kernels.row_pass(q, k, scale, layout, ft, True, config=c)),
        ("column", COL, lambda c: kernels.column_pass(q, k, scale, layout, ft, lse, config=c)),
        ("sweep", SWEEP, lambda c: kernels.sweep(q, k, scale, layout, ft, lse, config=c)),
    ]:
        if only and name not in only:
            continue
        for c in configs:
            try:
                ms = triton.testing.do_bench(lambda: fn(c), warmup=50, rep=300, return_mode="median")
            except Exception as e:  # a shape that does not fit this GPU's shared memory or registers
                print(f"{name} {c}: failed ({type(e).__name__})")
                continue
            print(f"{name} {c}: {ms:.2f} ms")
            if name not in best or ms < best[name][1]:
                best[name] = (c, ms)
    for name, (c, ms) in best.items():
        print(f"best {name}: {c} {ms:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
