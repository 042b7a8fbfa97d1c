"""Where the sweep's time goes (issue 36): its hot loop with its work added back one part at a time, timed side by side
on one GPU at the model's shapes. Diagnostic only: the partial key and query tiles are skipped and the results are
not statistics; the last stage is the shipped hot loop's work.

    python -m bench.sweep_ablation [--size 1.3b 14b] [--json out.json]

Stages: 0 ``QK^T`` only (each score added once, so it is not optimised away); 1 + one ``exp2`` per score and the
per-query mass; 2 + the per-query ``sum p*log2 p``; 3 + each key's received sum (in-thread sum, shuffles, one atomic
add a key); 4 + each key's max score (read before the dot, written after): the shipped hot loop; 5 stage 3 with the
key max as an atomic max (no read before the dot).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from wan_capture.stats import kernels as K

from .sweep_variants import SIZES, model_call, model_tensors

STAGES = ("QK^T only", "+ exp2 and mass", "+ sum p*log2 p", "+ received (atomic)", "+ key max: the shipped hot loop",
          "stage 3 + key max as an atomic max")


@triton.jit
def _ablation_kernel(Q, K_, LSE, OUT, RECV, KMAX, sq_h, sq_l, sk_h, sk_l, H, Lq, Lk, frame_tokens, Fk, q_per_split, c,
                     STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    split = tl.program_id(0)
    fk = tl.program_id(1)
    pid_bh = tl.program_id(2)
    h = pid_bh % H
    k_lo = fk * frame_tokens
    k_hi = tl.minimum(k_lo + frame_tokens, Lk)
    n_full = k_lo + ((k_hi - k_lo) // BLOCK_N) * BLOCK_N
    q_lo = split * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, Lq)
    q_full = q_lo + ((q_hi - q_lo) // BLOCK_M) * BLOCK_M
    offs_d = tl.arange(0, D)
    RB = RECV + (split * tl.num_programs(2) + pid_bh) * Lk
    KB = KMAX + (split * tl.num_programs(2) + pid_bh) * Lk
    for start_m in range(q_lo, q_full, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(Q + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :])
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m) * 1.4426950408889634
        accp = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        accx = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for start_n in range(k_lo, n_full, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if STAGE == 4:
                kmax = tl.load(KB + offs_n)
            k = tl.load(K_ + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :])
            s = tl.dot(k, tl.trans(q))
            if STAGE >= 4:
                smax = tl.max(s, 1)
            if STAGE == 0:
                accp += s
            else:
                x = s * c - lse2[None, :]
                p = tl.exp2(x)
                accp += p
                if STAGE >= 2:
                    accx += p * x
                if STAGE >= 3:
                    tl.atomic_add(RB + offs_n, tl.sum(p, 1), sem="relaxed")
            if STAGE == 4:
                tl.store(KB + offs_n, tl.maximum(kmax, smax))
            if STAGE == 5:
                tl.atomic_max(KB + offs_n, smax, sem="relaxed")
        out = (pid_bh * Fk + fk) * Lq + offs_m
        tl.store(OUT + out, tl.sum(accp, 0) + tl.sum(accx, 0))
        tl.debug_barrier()


def ablation(q, k, scale, ft, lse, stage):
    """One stage over ``q, k [1, H, L, 128]`` (ComfyUI's strided views), launched as the shipped sweep is."""
    _, h, lq, d = q.shape
    lk = k.shape[2]
    bm, bn, warps, stages = K.SWEEP_CONFIG
    fk = triton.cdiv(lk, ft)
    splits = K.sweep_splits(lq, fk, h, ft, d, q.device)
    per = triton.cdiv(triton.cdiv(lq, splits), bm) * bm
    splits = triton.cdiv(lq, per)
    out = torch.zeros(h * fk * lq, device=q.device)
    recv = torch.zeros(splits * h * lk, device=q.device)
    kmax = torch.full((splits * h * lk,), float("-inf"), device=q.device)
    _ablation_kernel[(splits, fk, h)](q, k, lse, out, recv, kmax, q.stride(1), q.stride(2), k.stride(1), k.stride(2), h,
                                      lq, lk, ft, fk, per, scale * K.LOG2E, STAGE=stage, BLOCK_M=bm, BLOCK_N=bn, D=d,
                                      num_warps=warps, num_stages=stages)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["1.3b", "14b"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from wan_capture import KeyLayout
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for size in args.size:
        tokens, ft, heads = SIZES[size]
        q, k, v = model_tensors(size)
        scale = 128 ** -0.5
        ref, lse = model_call(q, k, v)
        full = triton.testing.do_bench(lambda: K.sweep(q, k, scale, KeyLayout(), ft, lse), warmup=50, rep=300,
                                       return_mode="median")
        print(f"{size}: cuDNN {ref:.2f} ms; the shipped sweep {full:.2f} ms ({full / ref:.3f}x)", flush=True)
        # the same sweep where no tile is partial: frames of whole 64-key tiles, whole 128-query tiles (scaled to the
        # real shape's score count), to separate the partial tiles' passes from the hot loop
        fe = ft // 64 * 64
        te = tokens // ft * fe
        qe, ke = q[:, :, :te], k[:, :, :te]
        lse_e = lse[:, :te].contiguous()
        even = triton.testing.do_bench(lambda: K.sweep(qe, ke, scale, KeyLayout(), fe, lse_e), warmup=50, rep=300,
                                       return_mode="median") * (tokens / te) ** 2
        print(f"{size}: the shipped sweep without partial tiles (frames of {fe} keys, {te} tokens), scaled to "
              f"{tokens} tokens: {even:.2f} ms ({even / ref:.3f}x)", flush=True)
        row = {"cudnn_ms": ref, "shipped_ms": full, "shipped_without_partial_tiles_ms": even, "stages": {}}
        for stage, name in enumerate(STAGES):
            ms = triton.testing.do_bench(lambda: ablation(q, k, scale, ft, lse, stage), warmup=50, rep=300,
                                         return_mode="median")
            row["stages"][f"{stage} {name}"] = {"ms": ms, "x_model_call": ms / ref}
            print(f"{size} stage {stage} {name}: {ms:.2f} ms ({ms / ref:.3f}x cuDNN)", flush=True)
        results[size] = row
        del q, k, v, lse
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
