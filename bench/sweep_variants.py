"""Sweep kernels tried against the shipped one (issue 36), side by side in one run on one GPU, each checked against
the shipped kernel's output on the same inputs, with the roofline beside them.

    python -m bench.sweep_variants [--size 1.3b|14b ...] [--json out.json]
    TRITON_INTERPRET=1 python -m bench.sweep_variants --check   # the variants against float64 on tiny shapes (CPU)

Variants (all exact: the same sums as the shipped sweep, only scheduled differently):

* ``shipped``: ``kernels.sweep`` (128 queries x 64 keys, 4 warps, 3 stages; each key frame's tail, its keys past
  the last whole tile, in a second kernel; on sm_90 each key's per-tile results written by the first lane of the
  quad that holds them in the MMA layout, ``QUAD``).
* ``before``: the shipped kernel with each tile's per-key sums and maxima stored through Triton's ``tl.atomic_add`` /
  ``tl.store``, which first convert them through shared memory to one owner thread per key (two barriers each).
* ``0.2.0``: the same hot loop with each frame's tail inside the sweep kernel, one masked tile per query tile.
* ``key tiles by TMA``: the shipped hot loop with the key tiles copied by the bulk-copy engine (a tensor descriptor),
  waited for on mbarriers instead of ``cp.async`` groups.
* ``folded per-query sums``: the shipped hot loop with each query's sums over keys ``r`` and ``r + 8`` added in the
  thread that holds both in the ``wgmma`` layout (half the accumulator registers), registers capped so that three
  programs share a multiprocessor; by pointers or with the key tiles by TMA.
* ``pipelined``: the hot loop issues the next key tile's ``QK^T`` before the current tile's exponentials, so one
  program's tensor-core work can overlap its own softmax (FlashAttention-3's intra-warpgroup overlap), at the cost of
  a second score tile in registers.
* ``pipelined, 64 queries``: the same with 64-query tiles (half the registers per score tile, twice the key reads).
* ``8 warps, 256 queries``: the shipped kernel with two warpgroups sharing each key tile (half the key reads from L2).
* ``8 warps, 128 keys``: two warpgroups, each its own 64 keys of a 128-key tile against the same queries (no
  cross-warpgroup key sums).
* ``Gluon``: ``bench/sweep_gluon.py``, asynchronous ``wgmma`` overlapping the previous tile's softmax (sm_90 only);
  ``Gluon: one warpgroup``: the same file's one-tile-at-a-time kernel, each key's sums stored from the MMA's layout.
* ``Gluon, warp-specialised``: ``bench/sweep_gluon_ws.py``, a TMA loader warp and two consumer warpgroups (and its
  pipelined consumers, and 3 or 4 consumers, 64 queries each).

The roofline (per CFG row and block, the quantities the sweep cannot avoid): ``QK^T`` at the measured bf16 matrix
rate, one ``exp2`` per score at 16 per clock per multiprocessor (sm_90's special-function units), the key tiles read
from L2 once per query tile, and the issue slots of the shipped hot loop (instructions per tile, from its SASS).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

from wan_capture import KeyLayout
from wan_capture.stats import kernels as K

from . import sweep_gluon as G
from . import sweep_gluon_ws as W

SIZES = {"1.3b": (32760, 1560, 12), "14b": (75600, 3600, 40)}
EX2_PER_CLOCK_PER_SM = 16  # sm_90 special-function throughput (CUDA programming guide, arithmetic instructions)


@triton.jit
def _soft(s, offs_n, lse2, accp, accx, RB, KB, c, KEY_MAX: tl.constexpr):
    """The second half of ``kernels._sweep_tile`` (unmasked): exponentials and sums of one score tile."""
    if KEY_MAX:
        kmax = tl.load(KB + offs_n)
        smax = tl.max(s, 1)
    x = s * c - lse2[None, :]
    p = tl.exp2(x)
    accp += p
    accx += p * x
    tl.atomic_add(RB + offs_n, tl.sum(p, 1), sem="relaxed")
    if KEY_MAX:
        tl.store(KB + offs_n, tl.maximum(kmax, smax))
    return accp, accx


@triton.jit
def _pipelined_kernel(Q, K_, LSE, MASS, PX, RECV, KMAX, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H, Lq, Lk,
                      q_offset, frame_tokens, Fk, q_per_split, c, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, D: tl.constexpr, KEY_MAX: tl.constexpr):
    """``kernels._sweep_kernel`` for bidirectional attention with its hot loop software-pipelined by one key tile."""
    split = tl.program_id(0)
    fk = tl.program_id(1)
    pid_bh = tl.program_id(2)
    r = pid_bh // H
    h = pid_bh % H
    k_lo = fk * frame_tokens
    k_hi = tl.minimum(k_lo + frame_tokens, Lk)
    n_full = k_lo + ((k_hi - k_lo) // BLOCK_N) * BLOCK_N
    q_lo = split * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, Lq)
    offs_d = tl.arange(0, D)
    kbase = K_ + r * sk_r + h * sk_h
    qbase = Q + r * sq_r + h * sq_h
    RB = RECV + (split * tl.num_programs(2) + pid_bh) * Lk
    KB = KMAX + (split * tl.num_programs(2) + pid_bh) * Lk
    q_full = q_lo + ((q_hi - q_lo) // BLOCK_M) * BLOCK_M
    for start_m in range(q_lo, q_full, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d)
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m) * 1.4426950408889634
        accp = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        accx = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        if n_full > k_lo:
            offs_n = k_lo + tl.arange(0, BLOCK_N)
            s = K._dot(tl.load(kbase + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d), tl.trans(q), IEEE)
            for start_n in range(k_lo + BLOCK_N, n_full, BLOCK_N):
                offs_next = start_n + tl.arange(0, BLOCK_N)
                s_next = K._dot(tl.load(kbase + offs_next[:, None] * sk_l + offs_d[None, :] * sk_d), tl.trans(q),
                                IEEE)
                accp, accx = _soft(s, offs_n, lse2, accp, accx, RB, KB, c, KEY_MAX)
                s = s_next
                offs_n = offs_next
            accp, accx = _soft(s, offs_n, lse2, accp, accx, RB, KB, c, KEY_MAX)
        out = (pid_bh * Fk + fk) * Lq + offs_m
        tl.store(MASS + out, tl.sum(accp, 0))
        tl.store(PX + out, tl.sum(accx, 0))
        tl.debug_barrier()
    # a partial query tile: the shipped kernel's own pass (the frame's tail: kernels.sweep_frame_tails, after)
    K._masked_query_tiles(qbase, kbase, sq_l, sq_d, sk_l, sk_d, offs_d, q_full, q_hi, k_lo, k_hi, q_offset,
                          LSE + pid_bh * Lq, MASS, PX, (pid_bh * Fk + fk) * Lq, RB, KB, frame_tokens, c, K.MASK_NONE,
                          IEEE, BLOCK_M, BLOCK_N, KEY_MAX)


@triton.jit
def _inline_tail(qbase, kbase, sq_l, sq_d, sk_l, sk_d, offs_d, q_lo, q_full, q_hi, n_hot, k_hi, LSE_ROW, MASS, PX,
                 out_row, RB, KB, frame_tokens, c, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 KEY_MAX: tl.constexpr):
    """0.2.0's pass over the frame's tail inside the sweep kernel: one masked key tile per full query tile, added to
    the per-query sums the hot loop stored, a barrier after each."""
    for start_m in range(q_lo, q_full, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d)
        lse2 = tl.load(LSE_ROW + offs_m) * 1.4426950408889634
        accp = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        accx = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        accp, accx = K._sweep_tile(q, kbase, sk_l, sk_d, offs_d, n_hot, k_hi, offs_m, offs_m < q_hi, lse2, accp,
                                   accx, RB, KB, frame_tokens, c, K.MASK_NONE, True, IEEE, BLOCK_N, KEY_MAX)
        out = out_row + offs_m
        tl.store(MASS + out, tl.load(MASS + out) + tl.sum(accp, 0))
        tl.store(PX + out, tl.load(PX + out) + tl.sum(accx, 0))
        tl.debug_barrier()


@triton.jit
def _inline_tail_kernel(Q, K_, LSE, MASS, PX, RECV, KMAX, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H, Lq, Lk,
                        frame_tokens, Fk, q_per_split, c, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, D: tl.constexpr, KEY_MAX: tl.constexpr):
    """0.2.0's ``kernels._sweep_kernel`` (bidirectional): the shipped hot loop, then the frame's tail inside the
    same program (:func:`_inline_tail`), then a partial query tile."""
    split = tl.program_id(0)
    fk = tl.program_id(1)
    pid_bh = tl.program_id(2)
    r = pid_bh // H
    h = pid_bh % H
    k_lo = fk * frame_tokens
    k_hi = tl.minimum(k_lo + frame_tokens, Lk)
    n_full = k_lo + ((k_hi - k_lo) // BLOCK_N) * BLOCK_N
    q_lo = split * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, Lq)
    offs_d = tl.arange(0, D)
    kbase = K_ + r * sk_r + h * sk_h
    qbase = Q + r * sq_r + h * sq_h
    RB = RECV + (split * tl.num_programs(2) + pid_bh) * Lk
    KB = KMAX + (split * tl.num_programs(2) + pid_bh) * Lk
    q_full = q_lo + ((q_hi - q_lo) // BLOCK_M) * BLOCK_M
    out_row = (pid_bh * Fk + fk) * Lq
    for start_m in range(q_lo, q_full, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d)
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m) * 1.4426950408889634
        accp = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        accx = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for start_n in range(k_lo, n_full, BLOCK_N):
            accp, accx = K._sweep_tile(q, kbase, sk_l, sk_d, offs_d, start_n, k_hi, offs_m, offs_m, lse2, accp, accx,
                                       RB, KB, frame_tokens, c, K.MASK_NONE, False, IEEE, BLOCK_N, KEY_MAX)
        tl.store(MASS + out_row + offs_m, tl.sum(accp, 0))
        tl.store(PX + out_row + offs_m, tl.sum(accx, 0))
        tl.debug_barrier()
    if n_full < k_hi:
        _inline_tail(qbase, kbase, sq_l, sq_d, sk_l, sk_d, offs_d, q_lo, q_full, q_hi, n_full, k_hi, LSE + pid_bh * Lq,
                     MASS, PX, out_row, RB, KB, frame_tokens, c, IEEE, BLOCK_M, BLOCK_N, KEY_MAX)
    K._masked_query_tiles(qbase, kbase, sq_l, sq_d, sk_l, sk_d, offs_d, q_full, q_hi, k_lo, k_hi, 0,
                          LSE + pid_bh * Lq, MASS, PX, out_row, RB, KB, frame_tokens, c, K.MASK_NONE,
                          IEEE, BLOCK_M, BLOCK_N, KEY_MAX)


@triton.jit
def _rows_r_and_r8(t, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """A ``[keys, queries]`` tile in the ``wgmma`` layout split into the keys a thread holds as ``r`` and as ``r + 8``
    of its warp's 16: two ``[BLOCK_N // 16, 8, BLOCK_M]`` tiles, each in the same thread's registers."""
    return tl.split(tl.permute(tl.reshape(t, [BLOCK_N // 16, 2, 8, BLOCK_M]), [0, 2, 3, 1]))


@triton.jit
def _hot_loop_kernel(Q, K_, K_desc, LSE, MASS, PX, RECV, KMAX, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H,
                     Lq, Lk, frame_tokens, Fk, q_per_split, c, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, D: tl.constexpr, KEY_MAX: tl.constexpr, QUAD: tl.constexpr,
                     FOLD: tl.constexpr, TMA: tl.constexpr):
    """The shipped hot loop (bidirectional) with two changes, each on or off.

    ``FOLD``: each query's sums folded in the thread. Of the ``[keys, queries]`` score tile a thread of the ``wgmma``
    layout holds keys ``r`` and ``r + 8`` of its warp's 16, so a ``[BLOCK_N // 16, 2, 8, BLOCK_M]`` view split along
    its second axis (:func:`_rows_r_and_r8`) gives both halves without leaving the thread, and each is added to the
    accumulators with its own (fused multiply-)add. The two per-query accumulators take half the registers (32 each
    instead of 64), so with the registers capped at 168 three programs share a multiprocessor (12 warps instead of 8).

    ``TMA``: each key tile copied by the bulk-copy engine (a tensor descriptor ``K_desc`` over ComfyUI's ``[B*L,
    H*D]`` keys), so the pipeline waits on mbarriers instead of ``cp.async`` groups and barriers, and the copies'
    addresses take no registers.

    Partial query tiles as the shipped kernel does them, the frames' tails in the shipped tail kernel."""
    split = tl.program_id(0)
    fk = tl.program_id(1)
    pid_bh = tl.program_id(2)
    r = pid_bh // H
    h = pid_bh % H
    k_lo = fk * frame_tokens
    k_hi = tl.minimum(k_lo + frame_tokens, Lk)
    n_full = k_lo + ((k_hi - k_lo) // BLOCK_N) * BLOCK_N
    q_lo = split * q_per_split
    q_hi = tl.minimum(q_lo + q_per_split, Lq)
    q_full = q_lo + ((q_hi - q_lo) // BLOCK_M) * BLOCK_M
    offs_d = tl.arange(0, D)
    kbase = K_ + r * sk_r + h * sk_h
    qbase = Q + r * sq_r + h * sq_h
    RB = RECV + (split * tl.num_programs(2) + pid_bh) * Lk
    KB = KMAX + (split * tl.num_programs(2) + pid_bh) * Lk
    for start_m in range(q_lo, q_full, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d)
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m) * 1.4426950408889634
        if FOLD:
            accp = tl.zeros([BLOCK_N // 16, 8, BLOCK_M], tl.float32)
            accx = tl.zeros([BLOCK_N // 16, 8, BLOCK_M], tl.float32)
        else:
            accp = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            accx = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for start_n in range(k_lo, n_full, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if KEY_MAX:
                kmax = tl.load(KB + offs_n)
            if TMA:
                k = K_desc.load([r * Lk + start_n, h * D])
            else:
                k = tl.load(kbase + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d)
            s = K._dot(k, tl.trans(q), IEEE)
            if KEY_MAX:
                smax = tl.max(s, 1)
            x = s * c - lse2[None, :]
            p = tl.exp2(x)
            if FOLD:
                p0, p1 = _rows_r_and_r8(p, BLOCK_N, BLOCK_M)
                x0, x1 = _rows_r_and_r8(x, BLOCK_N, BLOCK_M)
                accp += p0
                accp += p1
                accx += p0 * x0  # two fused multiply-adds, not a product summed first and then added
                accx += p1 * x1
            else:
                accp += p
                accx += p * x
            K._add_key_sums(RB + offs_n, tl.sum(p, 1), offs_n < k_hi, QUAD)
            if KEY_MAX:
                K._store_key_max(KB + offs_n, tl.maximum(kmax, smax), offs_n < k_hi, QUAD)
        out = (pid_bh * Fk + fk) * Lq + offs_m
        if FOLD:
            tl.store(MASS + out, tl.sum(tl.sum(accp, 0), 0))
            tl.store(PX + out, tl.sum(tl.sum(accx, 0), 0))
        else:
            tl.store(MASS + out, tl.sum(accp, 0))
            tl.store(PX + out, tl.sum(accx, 0))
        tl.debug_barrier()
    K._masked_query_tiles(qbase, kbase, sq_l, sq_d, sk_l, sk_d, offs_d, q_full, q_hi, k_lo, k_hi, 0,
                          LSE + pid_bh * Lq, MASS, PX, (pid_bh * Fk + fk) * Lq, RB, KB, frame_tokens, c, 0, IEEE,
                          BLOCK_M, BLOCK_N, KEY_MAX, QUAD)


def inline_tail_sweep(q, k, scale, frame_tokens, lse, config=K.SWEEP_CONFIG, key_max=True):
    """:func:`kernels.sweep`'s results (bidirectional layouts only) as 0.2.0 computed them: each frame's tail inside
    the sweep kernel, not in a kernel of its own."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    bm, bn, warps, stages = config
    ft, fk, splits, per, mass, px, recv, kmax, lse = K.sweep_buffers(q, k, frame_tokens, lse, bm, key_max=key_max)
    _inline_tail_kernel[(splits, fk, r * h)](q, k, lse, mass, px, recv, kmax, *K._strides(q), *K._strides(k), h, lq,
                                             lk, ft, fk, per, scale * K.LOG2E, IEEE=K._ieee(q), BLOCK_M=bm,
                                             BLOCK_N=bn, D=d, KEY_MAX=bool(key_max), num_warps=warps,
                                             num_stages=stages)
    return K.sweep_results(recv, kmax, mass, px, scale, key_max)


def pipelined_sweep(q, k, scale, frame_tokens, lse, config=(128, 64, 4, 3), key_max=True):
    """:func:`kernels.sweep`'s results (bidirectional layouts only) from the software-pipelined kernel."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    bm, bn, warps, stages = config
    ft, fk, splits, per, mass, px, recv, kmax, lse = K.sweep_buffers(q, k, frame_tokens, lse, bm, key_max=key_max)
    _pipelined_kernel[(splits, fk, r * h)](q, k, lse, mass, px, recv, kmax, *K._strides(q), *K._strides(k), h, lq, lk,
                                           0, ft, fk, per, scale * K.LOG2E, IEEE=K._ieee(q), BLOCK_M=bm, BLOCK_N=bn,
                                           D=d, KEY_MAX=bool(key_max), num_warps=warps, num_stages=stages)
    K.sweep_frame_tails(q, k, ft, fk, splits, per, lse, mass, px, recv, kmax, scale, bm, bn, key_max)
    return K.sweep_results(recv, kmax, mass, px, scale, key_max)


def hot_loop_sweep(q, k, scale, frame_tokens, lse, config=(128, 64, 4, 2, 168), resident=3, key_max=True, quad=None,
                   fold=True, tma=False):
    """:func:`kernels.sweep`'s results (bidirectional layouts only) from :func:`_hot_loop_kernel` at ``config`` (its
    fifth entry a register cap), the query splits chosen for ``resident`` programs a multiprocessor; ``fold``: each
    query's sums folded in the thread; ``tma``: the key tiles by a tensor descriptor (keys in ComfyUI's ``[B, L,
    H*D]`` layout)."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    bm, bn, warps, stages, cap = config
    desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        if k.stride() != (lk * h * d, d, h * d, 1):
            raise ValueError("hot_loop_sweep(tma=True) needs keys in the [B, L, H*D] layout")
        desc = TensorDescriptor.from_tensor(torch.as_strided(k, (r * lk, h * d), (h * d, 1)), [bn, d])
    splits = K.sweep_splits(lq, -(-lk // frame_tokens), r * h, frame_tokens, d, q.device, resident)
    ft, fk, splits, per, mass, px, recv, kmax, lse = K.sweep_buffers(q, k, frame_tokens, lse, bm, splits, key_max)
    if quad is None:
        quad = K._quad_wanted(q, warps, bn)
    compiled = _hot_loop_kernel[(splits, fk, r * h)](
        q, k, desc, lse, mass, px, recv, kmax, *K._strides(q), *K._strides(k), h, lq, lk, ft, fk, per, scale * K.LOG2E,
        IEEE=K._ieee(q), BLOCK_M=bm, BLOCK_N=bn, D=d, KEY_MAX=bool(key_max), QUAD=bool(quad), FOLD=fold, TMA=tma,
        num_warps=warps, num_stages=stages, **K._register_cap((cap,)))
    if quad and not K._quad_layout(compiled.asm.get("ttgir", "")):
        raise RuntimeError("hot_loop_sweep: the compiled kernel's MMA layout is not the one QUAD writes from")
    K.sweep_frame_tails(q, k, ft, fk, splits, per, lse, mass, px, recv, kmax, scale, bm, bn, key_max)
    return K.sweep_results(recv, kmax, mass, px, scale, key_max)


def capped_sweep(config, resident: int):
    """:func:`kernels.sweep` at ``config`` (its fifth entry a register cap) with the query splits chosen for
    ``resident`` programs a multiprocessor (the L2 term of :func:`kernels.sweep_splits`)."""
    def run(q, k, scale, frame_tokens, lse):
        r, h, lq, d = q.shape
        splits = K.sweep_splits(lq, -(-k.shape[2] // frame_tokens), r * h, frame_tokens, d, q.device, resident)
        return K.sweep(q, k, scale, KeyLayout(), frame_tokens, lse, config=config, splits=splits)
    return run


# (config with a register cap, programs a multiprocessor holds: by registers and shared memory, sm_90)
CAPPED = [((64, 64, 4, 2, 128), 4), ((64, 64, 4, 2, 128), 3), ((64, 64, 4, 3, 128), 3), ((64, 64, 4, 2, 168), 3),
          ((64, 64, 4, 2, None), 2), ((128, 64, 4, 2, 168), 3)]

VARIANTS = {
    "shipped (128 q x 64 k, 4 warps, 3 stages)": lambda q, k, s, ft, lse: K.sweep(q, k, s, KeyLayout(), ft, lse),
    "before: each key's results converted through shared memory for tl.atomic_add/tl.store (128 x 64, 4 warps, "
    "3 stages)": lambda q, k, s, ft, lse: K.sweep(q, k, s, KeyLayout(), ft, lse, quad=False),
    "0.2.0: each frame's tail inside the sweep kernel (128 x 64, 4 warps, 3 stages)": lambda q, k, s, ft, lse:
        inline_tail_sweep(q, k, s, ft, lse),
    "key tiles by TMA (128 x 64, 4 warps, 3 stages)": lambda q, k, s, ft, lse: hot_loop_sweep(
        q, k, s, ft, lse, (128, 64, 4, 3, None), fold=False, tma=True),
    "pipelined (128 x 64, 4 warps, 3 stages)": lambda q, k, s, ft, lse: pipelined_sweep(q, k, s, ft, lse),
    "pipelined (128 x 64, 4 warps, 2 stages)": lambda q, k, s, ft, lse: pipelined_sweep(q, k, s, ft, lse,
                                                                                       (128, 64, 4, 2)),
    "pipelined, 64 queries (64 x 64, 4 warps, 3 stages)": lambda q, k, s, ft, lse: pipelined_sweep(
        q, k, s, ft, lse, (64, 64, 4, 3)),
    "8 warps, 256 queries (256 x 64, 8 warps, 2 stages)": lambda q, k, s, ft, lse: K.sweep(
        q, k, s, KeyLayout(), ft, lse, config=(256, 64, 8, 2)),
    # two warpgroups, each its own 64 keys of a 128-key tile against the same 128 queries: each key's sums stay in
    # its warpgroup (no cross-warpgroup reduction), the per-query sums are reduced once per query tile
    "8 warps, 128 keys (128 x 128, 8 warps, 2 stages)": lambda q, k, s, ft, lse: K.sweep(
        q, k, s, KeyLayout(), ft, lse, config=(128, 128, 8, 2)),
    "8 warps, 128 keys (128 x 128, 8 warps, 3 stages)": lambda q, k, s, ft, lse: K.sweep(
        q, k, s, KeyLayout(), ft, lse, config=(128, 128, 8, 3)),
}
VARIANTS["folded per-query sums, registers capped at 168, 3 programs a multiprocessor (128 x 64, 4 warps, 2 stages)"] \
    = lambda q, k, s, ft, lse: hot_loop_sweep(q, k, s, ft, lse)
VARIANTS["folded per-query sums, registers capped at 160, 3 programs a multiprocessor (128 x 64, 4 warps, 2 stages)"] \
    = lambda q, k, s, ft, lse: hot_loop_sweep(q, k, s, ft, lse, (128, 64, 4, 2, 160))
VARIANTS["folded per-query sums, key tiles by TMA, registers capped at 168, 3 programs a multiprocessor (128 x 64, 4 "
         "warps, 2 stages)"] = lambda q, k, s, ft, lse: hot_loop_sweep(q, k, s, ft, lse, tma=True)
VARIANTS["folded per-query sums, key tiles by TMA, no cap, 2 programs a multiprocessor (128 x 64, 4 warps, 3 stages)"] \
    = lambda q, k, s, ft, lse: hot_loop_sweep(q, k, s, ft, lse, (128, 64, 4, 3, None), resident=2, tma=True)
VARIANTS["folded per-query sums, no cap, 2 programs a multiprocessor (128 x 64, 4 warps, 3 stages)"] = \
    lambda q, k, s, ft, lse: hot_loop_sweep(q, k, s, ft, lse, (128, 64, 4, 3, None), resident=2)
for _config, _resident in CAPPED:
    VARIANTS[f"registers capped at {_config[4] or 'none'}, {_resident} programs a multiprocessor "
             f"({_config[0]} x {_config[1]}, {_config[2]} warps, {_config[3]} stages)"] = \
        capped_sweep(_config, _resident)
if G.gluon is not None:
    VARIANTS["Gluon: async wgmma, two warpgroups (128 x 64, 8 warps, 3 stages)"] = \
        lambda q, k, s, ft, lse: G.gluon_sweep(q, k, s, ft, lse)
    VARIANTS["Gluon: one warpgroup, per-key sums stored from the MMA layout (128 x 64, 4 warps, 3 stages)"] = \
        lambda q, k, s, ft, lse: G.gluon_sweep(q, k, s, ft, lse, sync=True)
if W.gluon is not None:
    VARIANTS["Gluon, warp-specialised: a TMA loader warp, two consumer warpgroups (2 x 128 q x 64 k, 4 stages)"] = \
        lambda q, k, s, ft, lse: W.ws_sweep(q, k, s, ft, lse)
    VARIANTS["Gluon, warp-specialised, pipelined: each consumer's next MMA before its exponentials (2 x 64 q x 64 k, "
             "4 stages)"] = lambda q, k, s, ft, lse: W.ws_sweep(q, k, s, ft, lse, block_m=64, pipelined=True)
    VARIANTS["Gluon, warp-specialised, 3 consumers (3 x 64 q x 64 k, 4 stages)"] = \
        lambda q, k, s, ft, lse: W.ws_sweep(q, k, s, ft, lse, block_m=64, consumers=3)
    VARIANTS["Gluon, warp-specialised, 4 consumers (4 x 64 q x 64 k, 4 stages)"] = \
        lambda q, k, s, ft, lse: W.ws_sweep(q, k, s, ft, lse, block_m=64, consumers=4)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check() -> int:
    """Every variant against float64 on tiny shapes (under the interpreter on CPU, or on CUDA)."""
    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    worst = 0.0
    for lq, ft, seed in ((256, 128, 0), (320, 96, 1)):  # full tiles only / partial key and query tiles
        g = torch.Generator().manual_seed(seed)
        q = (torch.randn(1, lq, 2, 64, generator=g) * 1.5).transpose(1, 2)  # ComfyUI's strided [B, H, L, D] views
        k = (torch.randn(1, lq, 2, 64, generator=g) * 1.5).transpose(1, 2)
        scale = 64 ** -0.5
        s64 = q.double() @ k.double().transpose(-1, -2) * scale  # float64 reference: [1, H, Lq, Lk]
        p64 = torch.softmax(s64, -1)
        fk = -(-lq // ft)
        received, key_max = p64.sum(2).reshape(2, lq), s64.amax(2).reshape(2, lq)
        mass = torch.stack([p64[..., f * ft:(f + 1) * ft].sum(-1) for f in range(fk)], 2).reshape(2, fk, lq)
        ent = -(p64 * torch.log(p64)).sum(-1).reshape(2, lq)
        lse = torch.logsumexp(s64, -1).float()
        q, k, lse = q.to(dev), k.to(dev), lse.to(dev)
        runs = [("pipelined", pipelined_sweep, cfg) for cfg in ((64, 64, 4, 2), (16, 32, 1, 1))]
        runs += [("0.2.0 frame tails", inline_tail_sweep, (64, 64, 4, 2))]
        runs += [("registers capped", lambda q, k, s, ft, lse, cfg: K.sweep(q, k, s, KeyLayout(), ft, lse, config=cfg),
                  cfg) for cfg, _ in CAPPED[:1]]
        runs += [("folded per-query sums", lambda q, k, s, ft, lse, cfg: hot_loop_sweep(q, k, s, ft, lse, cfg), cfg)
                 for cfg in ((64, 64, 4, 2, None), (32, 32, 4, 2, None))]
        for name, fn, cfg in runs:
            recv, kmax, m, e = fn(q, k, scale, ft, lse, cfg)
            errs = [rel(recv.cpu(), received), rel(kmax.cpu(), key_max), rel(m.cpu(), mass), rel(e.cpu(), ent)]
            worst = max(worst, *errs)
            print(f"{name} {cfg} Lq {lq} frames of {ft}: relative errors {['%.1e' % x for x in errs]}")
    if dev == "cuda" and G.gluon is not None:  # the Gluon kernel: bf16, head_dim 128, sm_90 only
        for lq, ft, seed in ((1000, 300, 2), (1560, 1560, 3), (640, 128, 4)):
            g = torch.Generator().manual_seed(seed)
            q = (torch.randn(2, lq, 3, 128, generator=g) * 1.5).to(torch.bfloat16).transpose(1, 2)
            k = (torch.randn(2, lq, 3, 128, generator=g) * 1.5).to(torch.bfloat16).transpose(1, 2)
            scale = 128 ** -0.5
            s64 = q.double() @ k.double().transpose(-1, -2) * scale
            p64 = torch.softmax(s64, -1)
            fk = -(-lq // ft)
            want = [p64.sum(2).reshape(6, lq), s64.amax(2).reshape(6, lq),
                    torch.stack([p64[..., f * ft:(f + 1) * ft].sum(-1) for f in range(fk)], 2).reshape(6, fk, lq),
                    -(p64 * torch.log(p64)).sum(-1).reshape(6, lq)]
            lse = torch.logsumexp(s64, -1).float().cuda()
            kernels = {"": lambda: G.gluon_sweep(q.cuda(), k.cuda(), scale, ft, lse),
                       " one warpgroup": lambda: G.gluon_sweep(q.cuda(), k.cuda(), scale, ft, lse, True)}
            if W.gluon is not None:  # the [B, L, H*D] layout its copies need
                qs, ks = (x.transpose(1, 2).contiguous().transpose(1, 2).cuda() for x in (q, k))
                kernels[" warp-specialised"] = lambda: W.ws_sweep(qs, ks, scale, ft, lse)
                kernels[" warp-specialised, pipelined"] = lambda: W.ws_sweep(qs, ks, scale, ft, lse, block_m=64,
                                                                             pipelined=True)
                for n in (3, 4):
                    kernels[f" warp-specialised, {n} consumers"] = lambda n=n: W.ws_sweep(qs, ks, scale, ft, lse,
                                                                                         block_m=64, consumers=n)
            for name, run in kernels.items():
                got, again = run(), run()
                errs = [rel(a.cpu(), b) for a, b in zip(got, want)]
                same = all(torch.equal(a, b) for a, b in zip(got, again))
                worst = max(worst, *errs) if same else float("inf")
                print(f"Gluon{name} Lq {lq} frames of {ft}: relative errors "
                      f"{['%.1e' % x for x in errs]}; deterministic {same}")
    if dev == "cuda":
        worst = max(worst, check_quad(), check_folded())
    ok = worst < 2e-5
    print(("ok" if ok else "FAILED") + f" worst relative error {worst:.2e}")
    return 0 if ok else 1


def check_folded() -> float:
    """On CUDA: :func:`hot_loop_sweep` with each query's sums folded, at the timed config (bf16, head_dim 128,
    registers capped, 3 programs a multiprocessor; key tiles by pointers and by TMA) against float64, frames of 300
    and 1,560 keys (partial key and query tiles), and run twice."""
    worst = 0.0
    for lq, ft, seed in ((1000, 300, 5), (1560, 1560, 6)):
        g = torch.Generator().manual_seed(seed)
        q = (torch.randn(2, lq, 3, 128, generator=g) * 1.5).to(torch.bfloat16)
        k = (torch.randn(2, lq, 3, 128, generator=g) * 1.5).to(torch.bfloat16)
        q, k = q.cuda().transpose(1, 2), k.cuda().transpose(1, 2)  # ComfyUI's strided [B, H, L, D] views
        scale = 128 ** -0.5
        s64 = q.double() @ k.double().transpose(-1, -2) * scale
        p64 = torch.softmax(s64, -1)
        fk = -(-lq // ft)
        want = [p64.sum(2).reshape(6, lq), s64.amax(2).reshape(6, lq),
                torch.stack([p64[..., f * ft:(f + 1) * ft].sum(-1) for f in range(fk)], 2).reshape(6, fk, lq),
                -(p64 * torch.log(p64)).sum(-1).reshape(6, lq)]
        lse = torch.logsumexp(s64, -1).float()
        for tma in (False, True):
            got, again = hot_loop_sweep(q, k, scale, ft, lse, tma=tma), hot_loop_sweep(q, k, scale, ft, lse, tma=tma)
            errs = [rel(a, b) for a, b in zip(got, want)]
            same = all(torch.equal(a, b) for a, b in zip(got, again))
            worst = max(worst, *errs) if same else float("inf")
            print(f"folded per-query sums{', key tiles by TMA' if tma else ''}, bf16 Lq {lq} frames of {ft}: "
                  f"relative errors {['%.1e' % x for x in errs]}; deterministic {same}")
    return worst


def check_quad() -> float:
    """On CUDA: the shipped sweep (on sm_90 each key's results written from the MMA layout, ``QUAD``) bit-identical to
    the same kernel writing them through Triton's conversion (``quad=False``), and both within 2e-5 of float64 for
    the received sums and key maxima, at head_dim 128 in bf16 and fp16, bidirectional and causal (token, frame, and a
    chunk of queries after a KV cache). Returns the worst relative error (inf where the two differ)."""
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for lq, lk, ft, causal, off in ((1000, 1000, 300, None, 0), (1560, 1560, 1560, None, 0),
                                        (700, 700, 100, "token", 0), (1024, 1024, 256, "frame", 0),
                                        (640, 1920, 640, "frame", 1280)):
            g = torch.Generator().manual_seed(lq + lk)
            q = (torch.randn(2, 3, lq, 128, generator=g) * 1.5).to(dtype).cuda()
            k = (torch.randn(2, 3, lk, 128, generator=g) * 1.5).to(dtype).cuda()
            scale = 128 ** -0.5
            s64 = q.double() @ k.double().transpose(-1, -2) * scale
            qa = torch.arange(lq, device="cuda")[:, None] + off
            ka = torch.arange(lk, device="cuda")[None, :]
            if causal == "token":
                s64 = s64.masked_fill(ka > qa, float("-inf"))
            elif causal == "frame":
                s64 = s64.masked_fill(ka // ft > qa // ft, float("-inf"))
            lse = torch.logsumexp(s64, -1).float().reshape(6, lq)
            layout = KeyLayout(causal=causal, q_offset=off, frame_tokens=ft)
            got = K.sweep(q, k, scale, layout, ft, lse)
            same = all(torch.equal(a, b) for a, b in zip(got, K.sweep(q, k, scale, layout, ft, lse, quad=False)))
            km = s64.amax(2).reshape(6, lk)
            seen = torch.isfinite(km)  # keys no query sees (causal) have no max
            errs = [rel(got[0], torch.softmax(s64, -1).sum(2).reshape(6, lk)), rel(got[1][seen], km[seen])]
            worst = max(worst, *errs) if same else float("inf")
            print(f"shipped sweep {str(dtype)[6:]} Lq {lq} Lk {lk} frames of {ft} causal {causal}: relative errors "
                  f"{['%.1e' % x for x in errs]}; identical to quad=False {same}; QUAD used "
                  f"{K._quad_wanted(q, 4, 64) and not K._NOT_QUAD}")
    return worst

def model_tensors(size: str, n: int = 3):
    """``n`` random bf16 tensors (q, k, v) at a model shape of ``SIZES``, ``[1, H, L, 128]`` views of ComfyUI's
    ``[B, L, H*D]`` layout, seed 0 (so the first two are the same whatever ``n``)."""
    tokens, _, heads = SIZES[size]
    torch.manual_seed(0)
    return [torch.randn(1, tokens, heads * 128, device="cuda", dtype=torch.bfloat16).view(1, tokens, heads, 128)
            .transpose(1, 2) for _ in range(n)]


def model_call(q, k, v):
    """The model's attention call at this shape, timed as ComfyUI runs it on CUDA (cuDNN first), in ms, and its
    log-sum-exp ``[H, L]`` (what the sweep is given)."""
    from wan_capture.capture.lse_attention import cudnn_attention
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
        ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                     warmup=50, rep=300, return_mode="median")
    return ms, cudnn_attention(q, k, v)[1].reshape(q.shape[1], q.shape[2]).contiguous()


def frame_tails_ms(q, k, scale, frame_tokens, lse, config=None) -> float:
    """The shipped sweep's second kernel alone (each key frame's tail), in ms, on the buffers the sweep would use;
    ``config`` as :func:`kernels.sweep_frame_tails` takes it."""
    bm, bn = K.SWEEP_CONFIG[:2]
    ft, fk, splits, per, mass, px, recv, kmax, lse = K.sweep_buffers(q, k, frame_tokens, lse, bm)
    return triton.testing.do_bench(lambda: K.sweep_frame_tails(q, k, ft, fk, splits, per, lse, mass, px, recv, kmax,
                                                               scale, bm, bn, config=config), warmup=50, rep=300,
                                   return_mode="median")


def roofline(tokens: int, heads: int, ref_ms: float, bm: int = 128) -> dict:
    """Floors per CFG row and block, in ms: matrix, exponentials and key reads, from measured or datasheet rates."""
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm = triton.testing.do_bench(lambda: a @ a, warmup=50, rep=300, return_mode="median")
    tflops = 2 * 8192 ** 3 / mm / 1e9
    a = None  # rebound, not del: the lambda above names it
    try:
        clock = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=30).stdout.split()[0]) * 1e6
    except Exception:  # noqa: BLE001 - no nvidia-smi: the H100/H200 boost clock
        clock = 1.98e9
    scores = heads * tokens * tokens
    matrix = 2 * 128 * scores / (tflops * 1e12) * 1e3
    exp = scores / (EX2_PER_CLOCK_PER_SM * props.multi_processor_count * clock) * 1e3
    key_bytes = heads * triton.cdiv(tokens, bm) * tokens * 128 * 2
    buf = torch.empty(1 << 28, device=dev, dtype=torch.uint8)  # 256 MiB: an L2-resident copy would mislead less
    small = torch.empty(16 << 20, device=dev, dtype=torch.uint8)
    out = torch.empty_like(small)
    l2 = triton.testing.do_bench(lambda: out.copy_(small), warmup=50, rep=300, return_mode="median")
    l2_bw = 2 * small.numel() / (l2 * 1e-3)  # 16 MiB read + written: stays in L2
    del buf
    return {"matrix_tflops_measured": tflops, "sm_clock_hz": clock, "matrix_ms": matrix, "exp2_ms": exp,
            "key_reads_gb": key_bytes / 1e9, "l2_copy_gbps": l2_bw / 1e9, "key_reads_ms": key_bytes / l2_bw * 1e3,
            "model_call_ms": ref_ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["1.3b", "14b"])
    ap.add_argument("--check", action="store_true", help="the variants against float64 on tiny shapes, then stop")
    ap.add_argument("--json", default=None)
    ap.add_argument("--once", default=None, help="run this variant once per size and stop (for a profiler: ncu)")
    ap.add_argument("--only", nargs="+", default=None, help="time only the variants whose names contain one of these "
                    "(the shipped sweep, the reference, always runs)")
    args = ap.parse_args(argv)
    if args.check:
        return check()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (or --check under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for size in args.size:
        tokens, ft, heads = SIZES[size]
        q, k, v = model_tensors(size)
        scale = 128 ** -0.5
        ref, lse = model_call(q, k, v)
        del v
        if args.once:
            for _ in range(2):  # the first call compiles; a profiler takes the second (ncu --launch-skip 1)
                VARIANTS[args.once](q, k, scale, ft, lse)
            torch.cuda.synchronize()
            continue
        base = VARIANTS[next(iter(VARIANTS))](q, k, scale, ft, lse)
        rows = {}
        for name, fn in VARIANTS.items():
            if args.only and name != next(iter(VARIANTS)) and not any(o in name for o in args.only):
                continue
            try:
                got = fn(q, k, scale, ft, lse)
                diff = max(rel(a, b) for a, b in zip(got, base))
                ms = triton.testing.do_bench(lambda: fn(q, k, scale, ft, lse), warmup=50, rep=300,
                                             return_mode="median")
                again = triton.testing.do_bench(lambda: fn(q, k, scale, ft, lse), warmup=20, rep=300,
                                                return_mode="median")
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit: reported, not fatal
                print(f"{size} {name}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                rows[name] = {"failed": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            rows[name] = {"ms": ms, "ms_again": again, "x_model_call": ms / ref, "max_rel_diff_vs_shipped": diff}
            print(f"{size} {name}: {ms:.2f} / {again:.2f} ms ({ms / ref:.3f}x cuDNN {ref:.2f} ms); "
                  f"max relative difference from the shipped sweep {diff:.1e}", flush=True)
        tails = frame_tails_ms(q, k, scale, ft, lse)
        rows["frame tail kernel alone (kernels.sweep_frame_tails)"] = {"ms": tails}
        print(f"{size} the shipped sweep's frame tail kernel alone: {tails:.2f} ms", flush=True)
        roof = roofline(tokens, heads, ref)
        print(f"{size} roofline per CFG row and block: QK^T {roof['matrix_ms']:.2f} ms at "
              f"{roof['matrix_tflops_measured']:.0f} TFLOP/s, exp2 {roof['exp2_ms']:.2f} ms at "
              f"{roof['sm_clock_hz'] / 1e9:.2f} GHz, key reads {roof['key_reads_gb']:.1f} GB at "
              f"{roof['l2_copy_gbps']:.0f} GB/s (L2 copy) = {roof['key_reads_ms']:.2f} ms; model call {ref:.2f} ms",
              flush=True)
        results[size] = {"tokens": tokens, "frame_tokens": ft, "heads": heads, "cudnn_ms": ref, "variants": rows,
                         "roofline": roof}
        q = k = lse = base = None  # freed before the next size (rebound, not del: the lambdas name them)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
