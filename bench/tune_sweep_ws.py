"""The warp-specialised sweep's stages and query splits, timed side by side with the shipped sweep at the model's
shapes (issue 36): ``python -m bench.tune_sweep_ws [--json out.json]``."""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton

from wan_capture import KeyLayout
from wan_capture.stats import kernels as K

from . import sweep_gluon_ws as W
from .sweep_variants import SIZES, model_tensors

# (stages, splits: the default or a multiple of it, queries a consumer tile, pipelined consumers)
CONFIGS = [(4, None, 128, False), (4, "x2", 128, False), (4, None, 64, True), (6, None, 64, True),
           (4, "x2", 64, True), (6, "x2", 64, True), (8, None, 64, True)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for size in ("1.3b", "14b"):
        tokens, ft, heads = SIZES[size]
        q, k = model_tensors(size, 2)
        lse = torch.randn(heads, tokens, device="cuda") + 12.0
        scale = 128 ** -0.5
        base = K.sweep_splits(tokens, -(-tokens // ft), heads, ft, 128, q.device)
        ref = triton.testing.do_bench(lambda: K.sweep(q, k, scale, KeyLayout(), ft, lse), warmup=30, rep=200,
                                      return_mode="median")
        print(f"{size}: shipped {ref:.2f} ms (splits {base})", flush=True)
        rows = results[size] = {"shipped_ms": ref, "shipped_splits": base, "warp_specialised": []}
        for stages, mult, bm, pipe in CONFIGS:
            splits = None if mult is None else base * int(mult[1:])
            try:
                ms = triton.testing.do_bench(lambda: W.ws_sweep(q, k, scale, ft, lse, stages, splits, bm, pipe),
                                             warmup=30, rep=200, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a configuration that does not fit: reported
                print(f"{size} stages {stages} splits {splits} queries {bm} pipelined {pipe}: failed "
                      f"({type(e).__name__}: {str(e)[:120]})")
                continue
            print(f"{size} stages {stages} splits {splits or base} queries {bm} pipelined {pipe}: {ms:.2f} ms "
                  f"({ms / ref:.3f}x shipped)", flush=True)
            rows["warp_specialised"].append({"stages": stages, "splits": splits or base, "block_m": bm,
                                             "pipelined": pipe, "ms": ms, "x_shipped": ms / ref})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
