"""The shipped sweep with and without ``QUAD`` (each key's per-tile results written from the MMA layout by one lane
of its quad, or converted through shared memory for ``tl.atomic_add``/``tl.store`` as before), timed in alternating
rounds on one GPU, so that drift between the two is shared (issue 36).

    python -m bench.sweep_quad_ab [1.3b] [14b] [--rounds 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import triton

from wan_capture import KeyLayout
from wan_capture.stats import kernels as K

from .sweep_variants import SIZES, model_call, model_tensors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("size", nargs="*", choices=sorted(SIZES), default=["1.3b", "14b"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    out = {"device": torch.cuda.get_device_name()}
    for size in args.size:
        _, ft, _ = SIZES[size]
        q, k, v = model_tensors(size)
        ref, lse = model_call(q, k, v)
        del v
        runs = {"quad": lambda: K.sweep(q, k, 128 ** -0.5, KeyLayout(), ft, lse),
                "before": lambda: K.sweep(q, k, 128 ** -0.5, KeyLayout(), ft, lse, quad=False)}
        times = {name: [] for name in runs}
        for r in range(args.rounds):  # the order alternates too
            for name in (("quad", "before") if r % 2 == 0 else ("before", "quad")):
                times[name].append(triton.testing.do_bench(runs[name], warmup=30, rep=200, return_mode="median"))
        med = {name: statistics.median(t) for name, t in times.items()}
        print(size, "cuDNN", round(ref, 2), {n: [round(x, 2) for x in t] for n, t in times.items()}, "medians", med,
              "quad/before %.3f" % (med["quad"] / med["before"]), flush=True)
        out[size] = {"cudnn_ms": ref, "runs_ms": times, "median_ms": med}
        q = k = lse = runs = None  # freed before the next size (rebound, not del: the lambdas name them)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
