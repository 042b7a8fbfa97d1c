"""The sweep as a warp-specialised Gluon kernel for Hopper (issue 36): a loader warp streams the frame's key tiles
through the bulk-copy engine (TMA) into a ring of shared-memory stages, signalled by mbarriers, and 2 to 4 consumer
warpgroups, each with its own query tile, run ``QK^T`` and the statistics on every stage. No barrier spans the
program: each warpgroup waits only for its data, so one's tensor-core work can run while another's exponentials do.

Same statistics as ``kernels.sweep`` for bidirectional layouts: each consumer adds each key's sums to rows of its own
(one per consumer and query split, summed afterwards), so the order of every addition is fixed and the result
deterministic. A benchmark variant, measured no faster than the shipped kernel (bench/README.md):
``bench/sweep_variants.py`` times it and checks it against float64 (sm_90, Gluon, bf16, head dim 128,
``[B, L, H*128]`` inputs as ComfyUI passes them).

Phases (per program: one query split of one key frame of one row-head; the split's query tiles go in groups, one
to each consumer):
1. loader: for every group, every key tile of the frame: wait until every consumer released the stage, then copy;
2. consumer: its query tiles by TMA (double-buffered); per key tile: wait for the stage, read the keys' max so
   far, ``wgmma``, release the stage, exponentials and sums; per-query sums stored after the frame. A consumer
   without a tile in a group only releases the stages.
"""
from __future__ import annotations

import torch

from wan_capture.stats import kernels as K

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .sweep_gluon import _query_state, _softmax, _store_query_sums
except ImportError:  # no Gluon (or no warp specialisation) in this Triton: the variant is absent
    gluon = None

BLOCK_M, BLOCK_N, HEAD_DIM = 128, 64, 128  # queries per consumer tile (the MMA's N), keys per tile (its M), features
STAGES = 4  # key tiles in shared memory: both consumers read one while the loader fills the others
LOADER_REGS = gl.constexpr(24) if gluon is not None else 24  # registers a loader thread keeps (the fewest allowed)
LOG2E = 1.4426950408889634

if gluon is not None:
    @gluon.jit
    def _drain(ready, empty, it, n_tiles, NS: gl.constexpr):
        """A consumer with no query tile in this pair: release every stage the other one reads."""
        for t in range(n_tiles):
            mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
            mbarrier.arrive(empty.index(it % NS), count=1)
            it += 1
        return it

    @gluon.jit
    def _consume_tile(k_smem, q_smem, qbar, ready, empty, it, q_phase, start_m, q_hi, k_lo, k_hi,
                      LSE, MASS, PX, RB, KB, out_row, c, Q_MASKED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                      NS: gl.constexpr):
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
        KEYS: gl.constexpr = gl.SliceLayout(1, MMA)
        QS: gl.constexpr = gl.SliceLayout(0, MMA)
        offs_m, qmask, lse2, zero, accp, accx = _query_state(start_m, q_hi, LSE, MMA, BM, BN)
        q_t = q_smem.permute((1, 0))  # [features, queries]: the MMA's B operand
        mbarrier.wait(qbar, q_phase)  # the query tile, copied while the previous one was consumed
        n_full = (k_hi - k_lo) // BN
        n_tiles = gl.cdiv(k_hi - k_lo, BN)
        for t in range(n_full):
            offs_n = k_lo + t * BN + gl.arange(0, BN, layout=KEYS)
            kmax = gl.load(KB + offs_n)  # read before the MMA: its latency hides behind it
            mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
            s = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(it % NS), q_t, zero, use_acc=False,
                                                          is_async=True)])
            mbarrier.arrive(empty.index(it % NS), count=1)
            accp, accx = _softmax(s, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED, kmax)
            it += 1
        if n_full < n_tiles:  # the frame's last, partial key tile (the copy's rows past the frame are masked)
            offs_n = k_lo + n_full * BN + gl.arange(0, BN, layout=KEYS)
            mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
            s = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(it % NS), q_t, zero, use_acc=False,
                                                          is_async=True)])
            mbarrier.arrive(empty.index(it % NS), count=1)
            accp, accx = _softmax(s, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, True)
            it += 1
        _store_query_sums(MASS, PX, out_row, offs_m, qmask, accp, accx, QS)
        return it

    @gluon.jit
    def _consume_tile_pipelined(k_smem, q_smem, qbar, ready, empty, it, q_phase, start_m, q_hi, k_lo, k_hi, LSE, MASS,
                                PX, RB, KB, out_row, c, Q_MASKED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                                NS: gl.constexpr):
        """As :func:`_consume_tile`, with the next key tile's ``wgmma`` issued before this tile's exponentials (two
        score tiles in registers, FlashAttention-3's intra-warpgroup overlap; small query tiles leave the room)."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
        KEYS: gl.constexpr = gl.SliceLayout(1, MMA)
        QS: gl.constexpr = gl.SliceLayout(0, MMA)
        offs_m, qmask, lse2, zero, accp, accx = _query_state(start_m, q_hi, LSE, MMA, BM, BN)
        q_t = q_smem.permute((1, 0))
        mbarrier.wait(qbar, q_phase)
        n_full = (k_hi - k_lo) // BN
        n_tiles = gl.cdiv(k_hi - k_lo, BN)
        arange = gl.arange(0, BN, layout=KEYS)
        if n_full > 0:
            # tile 0 in s_a; then two tiles an iteration, each MMA issued before the other tile's softmax
            kmax_a = gl.load(KB + k_lo + arange)
            mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
            s_a = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(it % NS), q_t, zero, use_acc=False,
                                                            is_async=True)])
            mbarrier.arrive(empty.index(it % NS), count=1)
            it += 1
            t = 0
            for pair in range((n_full - 1) // 2):
                mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
                tok_b = warpgroup_mma(k_smem.index(it % NS), q_t, zero, use_acc=False, is_async=True)
                offs_n = k_lo + t * BN + arange
                accp, accx = _softmax(s_a, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED,
                                      kmax_a)
                kmax_b = gl.load(KB + offs_n + BN)
                s_b = warpgroup_mma_wait(0, deps=[tok_b])
                mbarrier.arrive(empty.index(it % NS), count=1)
                it += 1
                mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
                tok_a = warpgroup_mma(k_smem.index(it % NS), q_t, zero, use_acc=False, is_async=True)
                offs_n = offs_n + BN
                accp, accx = _softmax(s_b, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED,
                                      kmax_b)
                kmax_a = gl.load(KB + offs_n + BN)
                s_a = warpgroup_mma_wait(0, deps=[tok_a])
                mbarrier.arrive(empty.index(it % NS), count=1)
                it += 1
                t += 2
            offs_n = k_lo + t * BN + arange
            if t + 1 < n_full:  # one more full tile
                mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
                tok_b = warpgroup_mma(k_smem.index(it % NS), q_t, zero, use_acc=False, is_async=True)
                accp, accx = _softmax(s_a, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED,
                                      kmax_a)
                kmax_b = gl.load(KB + offs_n + BN)
                s_b = warpgroup_mma_wait(0, deps=[tok_b])
                mbarrier.arrive(empty.index(it % NS), count=1)
                it += 1
                accp, accx = _softmax(s_b, offs_n + BN, offs_n + BN < k_hi, qmask, lse2, accp, accx, RB, KB, c,
                                      Q_MASKED, kmax_b)
            else:
                accp, accx = _softmax(s_a, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED,
                                      kmax_a)
        if n_full < n_tiles:  # the frame's last, partial key tile
            offs_n = k_lo + n_full * BN + arange
            mbarrier.wait(ready.index(it % NS), (it // NS) & 1)
            s = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(it % NS), q_t, zero, use_acc=False,
                                                          is_async=True)])
            mbarrier.arrive(empty.index(it % NS), count=1)
            accp, accx = _softmax(s, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, True)
            it += 1
        _store_query_sums(MASS, PX, out_row, offs_m, qmask, accp, accx, QS)
        return it

    @gluon.jit
    def _consume(k_smem, q_smem, qbar, ready, empty, it, q_phase, start_m, q_hi, k_lo, k_hi, LSE, MASS, PX, RB, KB,
                 out_row, c, Q_MASKED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr,
                 PIPE: gl.constexpr):
        if PIPE:
            it = _consume_tile_pipelined(k_smem, q_smem, qbar, ready, empty, it, q_phase, start_m, q_hi, k_lo, k_hi,
                                         LSE, MASS, PX, RB, KB, out_row, c, Q_MASKED, BM, BN, NS)
        else:
            it = _consume_tile(k_smem, q_smem, qbar, ready, empty, it, q_phase, start_m, q_hi, k_lo, k_hi, LSE, MASS,
                               PX, RB, KB, out_row, c, Q_MASKED, BM, BN, NS)
        return it

    @gluon.jit
    def _consumer(cid, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, q_row, k_row, col, q_lo, q_hi, k_lo, k_hi,
                  n_groups, LSE, MASS, PX, RB0, KB0, row_stride, out_row, c, BM: gl.constexpr, BN: gl.constexpr,
                  NS: gl.constexpr, NC: gl.constexpr, PIPE: gl.constexpr):
        """Consumer ``cid`` of ``NC``: query tiles ``cid``, ``cid + NC``, ... of the split, each against every key
        tile of the frame; each key's sums into its own rows (``row_stride`` apart from the next consumer's). Its
        signature is the loader's (Gluon's worker partitions share one)."""
        it = 0
        n_tiles = gl.cdiv(k_hi - k_lo, BN)
        RB = RB0 + cid * row_stride
        KB = KB0 + cid * row_stride
        # two query buffers of its own: the next group's tile is copied while this one is consumed
        start_m = q_lo + cid * BM
        if start_m < q_hi:
            mbarrier.expect(qbar.index(2 * cid), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + start_m, col], qbar.index(2 * cid), q_smem.index(2 * cid))
        for j in range(n_groups):
            start_m = q_lo + (NC * j + cid) * BM
            nxt = start_m + NC * BM
            if nxt < q_hi:  # its buffer was read by the MMAs of group j - 1, all waited for
                mbarrier.expect(qbar.index(2 * cid + (j + 1) % 2), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [q_row + nxt, col], qbar.index(2 * cid + (j + 1) % 2),
                                                q_smem.index(2 * cid + (j + 1) % 2))
            if start_m + BM <= q_hi:
                it = _consume(k_smem, q_smem.index(2 * cid + j % 2), qbar.index(2 * cid + j % 2), ready, empty,
                              it, (j // 2) & 1, start_m, q_hi, k_lo, k_hi, LSE, MASS, PX, RB, KB, out_row, c, False,
                              BM, BN, NS, PIPE)
            elif start_m < q_hi:
                it = _consume(k_smem, q_smem.index(2 * cid + j % 2), qbar.index(2 * cid + j % 2), ready, empty,
                              it, (j // 2) & 1, start_m, q_hi, k_lo, k_hi, LSE, MASS, PX, RB, KB, out_row, c, True,
                              BM, BN, NS, PIPE)
            else:
                it = _drain(ready, empty, it, n_tiles, NS)

    @gluon.jit
    def _loader(cid, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, q_row, k_row, col, q_lo, q_hi, k_lo, k_hi,
                n_groups, LSE, MASS, PX, RB0, KB0, row_stride, out_row, c, BM: gl.constexpr, BN: gl.constexpr,
                NS: gl.constexpr, NC: gl.constexpr, PIPE: gl.constexpr):
        it = 0
        n_tiles = gl.cdiv(k_hi - k_lo, BN)
        for j in range(n_groups):
            for t in range(n_tiles):
                # every consumer released this stage (mbarriers start as if the phase before the first completed)
                mbarrier.wait(empty.index(it % NS), ((it // NS) & 1) ^ 1)
                mbarrier.expect(ready.index(it % NS), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [k_row + k_lo + t * BN, col], ready.index(it % NS),
                                                k_smem.index(it % NS))
                it += 1

    @gluon.jit
    def _ws_sweep_kernel(q_desc, k_desc, LSE, MASS, PX, RECV, KMAX, H, Lq, Lk, frame_tokens, Fk, q_per_split, c,
                         BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr, NC: gl.constexpr, PIPE: gl.constexpr,
                         REGS: gl.constexpr):
        split = gl.program_id(0)
        fk = gl.program_id(1)
        pid_bh = gl.program_id(2)
        rh = gl.num_programs(2)
        r = pid_bh // H
        h = pid_bh % H
        k_lo = fk * frame_tokens
        k_hi = gl.minimum(k_lo + frame_tokens, Lk)
        q_lo = split * q_per_split
        q_hi = gl.minimum(q_lo + q_per_split, Lq)
        n_groups = gl.cdiv(gl.cdiv(q_hi - q_lo, BM), NC)
        col = h * q_desc.block_type.shape[1]
        # consumer i's per-key rows: row NC*split + i of the [NC*splits, R*H, Lk] buffers
        RB0 = RECV + ((NC * split) * rh + pid_bh) * Lk
        KB0 = KMAX + ((NC * split) * rh + pid_bh) * Lk
        row_stride = rh * Lk
        out_row = (pid_bh * Fk + fk) * Lq
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NS] + k_desc.block_type.shape, k_desc.layout)
        # two query buffers per consumer (consumer i has 2i and 2i + 1) and their barriers
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * NC] + q_desc.block_type.shape, q_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        qbar = gl.allocate_shared_memory(gl.int64, [2 * NC, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NS):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NC)  # released by every consumer
        for i in gl.static_range(2 * NC):
            mbarrier.init(qbar.index(i), count=1)
        lse_row = LSE + pid_bh * Lq
        # every partition takes the same arguments but the consumer's number, written out in each call (a tuple held
        # in a variable loses its constexprs); the first is the default partition, the last the loader
        if NC == 2:
            gl.warp_specialize([
                (_consumer, (0, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_consumer, (1, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_loader, (0, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi, k_lo,
                           k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC, PIPE)),
            ], [4, 1], [REGS, LOADER_REGS])
        elif NC == 3:
            gl.warp_specialize([
                (_consumer, (0, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_consumer, (1, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_consumer, (2, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_loader, (0, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi, k_lo,
                           k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC, PIPE)),
            ], [4, 4, 1], [REGS, REGS, LOADER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (0, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_consumer, (1, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_consumer, (2, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_consumer, (3, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi,
                             k_lo, k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC,
                             PIPE)),
                (_loader, (0, q_desc, k_desc, k_smem, q_smem, qbar, ready, empty, r * Lq, r * Lk, col, q_lo, q_hi, k_lo,
                           k_hi, n_groups, lse_row, MASS, PX, RB0, KB0, row_stride, out_row, c, BM, BN, NS, NC, PIPE)),
            ], [4, 4, 4, 1], [REGS, REGS, REGS, LOADER_REGS])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[R, H, L, D]`` (a view of ComfyUI's ``[R, L, H*D]``) as the ``[R*L, H*D]`` matrix it is stored as."""
    r, h, l, d = x.shape
    assert x.stride() == (l * h * d, d, h * d, 1), "needs the [B, L, H*D] layout ComfyUI passes"
    return x.transpose(1, 2).reshape(r * l, h * d)


# per consumer count: (registers a consumer thread, the kernel's limit): the warps, the loader's rounded up to a
# warpgroup, share the multiprocessor's 64K registers, the loader keeping 24
REGISTERS = {2: (240, 168), 3: (160, 128), 4: (112, 96)}


def ws_sweep(q, k, scale, frame_tokens, lse, stages: int = STAGES, splits=None, block_m: int = BLOCK_M,
             pipelined: bool = False, consumers: int = 2):
    """:func:`kernels.sweep`'s results (bidirectional, bf16, head_dim 128, key max on) from the warp-specialised
    kernel: ``consumers`` warpgroups of ``block_m`` queries each (2, 3 or 4), ``stages`` key tiles in shared memory,
    ``splits`` query splits a frame (``kernels.sweep_splits``'s by default), ``pipelined``: each consumer issues the
    next tile's MMA before this tile's exponentials."""
    if gluon is None:
        raise RuntimeError("this Triton has no Gluon warp specialisation")
    r, h, lq, d = q.shape
    assert d == HEAD_DIM and q.dtype == torch.bfloat16 and consumers in REGISTERS
    lk = k.shape[2]
    ft, fk, splits, per, mass, px, recv, kmax, lse = K.sweep_buffers(q, k, frame_tokens, lse, consumers * block_m,
                                                                     splits, writers=consumers)
    q_desc = TensorDescriptor.from_tensor(_rows(q), [block_m, d],
                                          gl.NVMMASharedLayout.get_default_for([block_m, d], gl.bfloat16))
    k_desc = TensorDescriptor.from_tensor(_rows(k), [BLOCK_N, d],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_N, d], gl.bfloat16))
    regs, limit = REGISTERS[consumers]
    _ws_sweep_kernel[(splits, fk, r * h)](q_desc, k_desc, lse, mass, px, recv, kmax, h, lq, lk, ft, fk, per,
                                          scale * LOG2E, BM=block_m, BN=BLOCK_N, NS=stages, NC=consumers,
                                          PIPE=pipelined, REGS=regs, num_warps=4, maxnreg=limit)
    return K.sweep_results(recv, kmax, mass, px, scale)
