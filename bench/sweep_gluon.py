"""The sweep written in Gluon for Hopper (issue 36): ``QK^T`` issued as an asynchronous ``wgmma`` for key tile t
while the exponentials and sums of tile t-1 run, so one warpgroup's tensor-core and special-function work overlap
(FlashAttention-3's intra-warpgroup pipelining), which Triton does not generate for this loop (bench/README.md).

Same statistics as ``kernels.sweep`` for bidirectional layouts (same tiles, same per-split per-key rows, the same
order of additions), so its output can be compared with the shipped kernel's bit for bit or nearly. A benchmark
variant, measured slower than the shipped kernel (bench/README.md): ``bench/sweep_variants.py`` times it beside the
shipped kernel and cuDNN; it needs an sm_90 GPU and Triton's Gluon (3.6 on the GPU machine).
``bench/sweep_sass.py`` compiles it for sm_90 on any machine.

Phases of the kernel (per program: one query split of one key frame of one row-head):
1. the query tile to shared memory (``cp.async``), and the first ``STAGES - 1`` key tiles of the frame;
2. per key tile t: wait for its copy, issue ``wgmma`` S_t = K_t Q^T asynchronously, then the softmax of S_{t-1}
   (already in registers), then wait for S_t and refill the stage S_{t-1} came from;
3. the last tile (the frame's partial one, masked) after the loop; per-query sums reduced and stored.
"""
from __future__ import annotations

import torch

from wan_capture.stats import kernels as K

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
except ImportError:  # no Gluon in this Triton: the variant is absent
    gluon = None

BLOCK_M, BLOCK_N, HEAD_DIM = 128, 64, 128  # queries (the MMA's N), keys (its M: one warpgroup's 64 rows), features
STAGES = 3  # key tiles in shared memory: one being read by the MMA, one landing, one in flight
WARPS = 8  # two warpgroups, each 64 of the 128 queries of every key tile (the tile is loaded once for both)
LOG2E = 1.4426950408889634

if gluon is not None:
    @gluon.jit
    def _softmax(s, offs_n, kmask, qmask, lse2, accp, accx, RB, KB, c, MASKED: gl.constexpr, kmax=None):
        """Exponentials and sums of one score tile [keys, queries] (``kernels._sweep_tile``'s second half); ``kmax``:
        the keys' max scores so far, if the caller read them already (before the MMA, to hide the read)."""
        if MASKED:
            valid = gl.expand_dims(kmask, 1) & gl.expand_dims(qmask, 0)
            s = gl.where(valid, s, float("-inf"))
        if kmax is None:
            kmax = gl.load(KB + offs_n, mask=kmask, other=float("-inf"))
        smax = gl.max(s, 1)
        x = s * c - gl.expand_dims(lse2, 0)
        p = gl.exp2(x)
        if MASKED:
            x = gl.where(valid, x, 0.0)
        # per-query sums folded in the thread: rows r and r+8 of a warp's 16 (the MMA layout gives a thread both), so
        # the two accumulators take 64 registers, not 128, and the next tile's scores fit beside this tile's
        accp += gl.sum(gl.reshape(p, [4, 2, 8, p.shape[1]]), 1)
        accx += gl.sum(gl.reshape(p * x, [4, 2, 8, p.shape[1]]), 1)
        gl.atomic_add(RB + offs_n, gl.sum(p, 1), mask=kmask, sem="relaxed")
        gl.store(KB + offs_n, gl.maximum(kmax, smax), mask=kmask)
        return accp, accx

    @gluon.jit
    def _query_state(start_m, q_hi, LSE, MMA: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
        """A query tile's per-query values in the MMA's query layout (offsets, mask, ``lse`` in base 2), the zero
        score tile the MMA starts from, and its two per-query sums, zeroed in the folded layout: rows r and r+8 of a
        warp's 16 (the MMA layout gives a thread both) share one accumulator, [warp, lane row, query]."""
        offs_m = start_m + gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
        qmask = offs_m < q_hi
        lse2 = gl.load(LSE + offs_m, mask=qmask, other=0.0) * 1.4426950408889634
        zero = gl.zeros([BN, BM], gl.float32, MMA)
        accp = gl.sum(gl.reshape(zero, [4, 2, 8, BM]), 1)
        accx = gl.sum(gl.reshape(zero, [4, 2, 8, BM]), 1)
        return offs_m, qmask, lse2, zero, accp, accx

    @gluon.jit
    def _store_query_sums(MASS, PX, out_row, offs_m, qmask, accp, accx, QS: gl.constexpr):
        """A query tile's mass and ``sum p*log2 p`` on this key frame, its folded sums reduced."""
        gl.store(MASS + out_row + offs_m, gl.convert_layout(gl.sum(gl.sum(accp, 0), 0), QS), mask=qmask)
        gl.store(PX + out_row + offs_m, gl.convert_layout(gl.sum(gl.sum(accx, 0), 0), QS), mask=qmask)

    @gluon.jit
    def _copy_query_tile(q_smem, qbase, sq_l, start_m, q_hi, LD: gl.constexpr, BM: gl.constexpr, D: gl.constexpr):
        """The query tile to shared memory (``cp.async``, rows past ``q_hi`` zero), as its own copy group."""
        qrows = start_m + gl.arange(0, BM, layout=gl.SliceLayout(1, LD))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
        q_ptrs = qbase + gl.expand_dims(qrows, 1) * sq_l + gl.expand_dims(cols, 0)
        async_copy.async_copy_global_to_shared(q_smem, q_ptrs, mask=gl.expand_dims(qrows < q_hi, 1))
        async_copy.commit_group()

    @gluon.jit
    def _load_keys(k_smem, kbase, sk_l, start_n, k_hi, LD: gl.constexpr, BN: gl.constexpr, D: gl.constexpr):
        rows = start_n + gl.arange(0, BN, layout=gl.SliceLayout(1, LD))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
        ptrs = kbase + gl.expand_dims(rows, 1) * sk_l + gl.expand_dims(cols, 0)
        async_copy.async_copy_global_to_shared(k_smem, ptrs, mask=gl.expand_dims(rows < k_hi, 1))
        async_copy.commit_group()

    @gluon.jit
    def _issue(k_smem, q_t, zero, kbase, sk_l, k_lo, k_hi, t, LD: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
               NS: gl.constexpr):
        """Refill the stage tile t-1 was read from with tile t+NS-2, wait for tile t, issue its MMA (asynchronous)."""
        gl.thread_barrier()  # every warp is past the MMA that read the stage refilled next
        _load_keys(k_smem.index((t + NS - 2) % NS), kbase, sk_l, k_lo + (t + NS - 2) * BN, k_hi, LD, BN, D)
        async_copy.wait_group(NS - 2)
        gl.thread_barrier()
        fence_async_shared()
        return warpgroup_mma(k_smem.index(t % NS), q_t, zero, use_acc=False, is_async=True)

    @gluon.jit
    def _query_tile(q_smem, k_smem, qbase, kbase, sq_l, sk_l, start_m, q_hi, k_lo, k_hi, LSE, MASS, PX, RB, KB,
                    out_row, c, Q_MASKED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                    NS: gl.constexpr):
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, BM // 2, 16])
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [8, 1], [1, 0])  # 16-byte copies, 128 features a row
        KEYS: gl.constexpr = gl.SliceLayout(1, MMA)
        QS: gl.constexpr = gl.SliceLayout(0, MMA)
        # phase 1: the query tile and the first key tiles in flight
        _copy_query_tile(q_smem, qbase, sq_l, start_m, q_hi, LD, BM, D)
        n_tiles = gl.cdiv(k_hi - k_lo, BN)
        for i in gl.static_range(NS - 1):
            _load_keys(k_smem.index(i), kbase, sk_l, k_lo + i * BN, k_hi, LD, BN, D)
        offs_m, qmask, lse2, zero, accp, accx = _query_state(start_m, q_hi, LSE, MMA, BM, BN)
        q_t = q_smem.permute((1, 0))  # [features, queries]: the MMA's B operand
        # tile 0
        async_copy.wait_group(NS - 2)
        gl.thread_barrier()
        fence_async_shared()
        s_a = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(0), q_t, zero, use_acc=False, is_async=True)])
        # phase 2, two tiles an iteration with two named score tiles: the MMA into one runs while the softmax of the
        # other does (one loop-carried tile would share its registers with the MMA's result, serialising the two)
        n_pairs = (n_tiles - 1) // 2
        for pair in range(n_pairs):
            t = 2 * pair + 1
            tok_b = _issue(k_smem, q_t, zero, kbase, sk_l, k_lo, k_hi, t, LD, BN, D, NS)
            offs_n = k_lo + (t - 1) * BN + gl.arange(0, BN, layout=KEYS)
            accp, accx = _softmax(s_a, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED)
            s_b = warpgroup_mma_wait(0, deps=[tok_b])
            tok_a = _issue(k_smem, q_t, zero, kbase, sk_l, k_lo, k_hi, t + 1, LD, BN, D, NS)
            offs_n = k_lo + t * BN + gl.arange(0, BN, layout=KEYS)
            accp, accx = _softmax(s_b, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED)
            s_a = warpgroup_mma_wait(0, deps=[tok_a])
        # phase 3: what is left (one or two tiles; the frame's last, partial one masked), the per-query sums
        last = n_tiles - 1
        if 2 * n_pairs < last:
            tok_b = _issue(k_smem, q_t, zero, kbase, sk_l, k_lo, k_hi, last, LD, BN, D, NS)
            offs_n = k_lo + (last - 1) * BN + gl.arange(0, BN, layout=KEYS)
            accp, accx = _softmax(s_a, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED)
            s_b = warpgroup_mma_wait(0, deps=[tok_b])
            offs_n = k_lo + last * BN + gl.arange(0, BN, layout=KEYS)
            accp, accx = _softmax(s_b, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, True)
        else:
            offs_n = k_lo + last * BN + gl.arange(0, BN, layout=KEYS)
            accp, accx = _softmax(s_a, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, True)
        async_copy.wait_group(0)
        gl.thread_barrier()
        _store_query_sums(MASS, PX, out_row, offs_m, qmask, accp, accx, QS)

    @gluon.jit
    def _query_tile_sync(q_smem, k_smem, qbase, kbase, sq_l, sk_l, start_m, q_hi, k_lo, k_hi, LSE, MASS, PX, RB, KB,
                         out_row, c, Q_MASKED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                         NS: gl.constexpr):
        """One warpgroup, one key tile at a time (``wgmma`` waited for at once, as the shipped kernel), with what
        Gluon allows and Triton does not: each key's sums go to memory from the MMA's own layout (no conversion
        through shared memory), the per-query sums are folded in the thread (64 registers, not 128): 2 barriers a
        tile in its hot loop, not 4; a warp's tensor-core work can overlap the other programs' exponentials."""
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])  # 16-byte copies, 128 features a row
        KEYS: gl.constexpr = gl.SliceLayout(1, MMA)
        QS: gl.constexpr = gl.SliceLayout(0, MMA)
        _copy_query_tile(q_smem, qbase, sq_l, start_m, q_hi, LD, BM, D)
        n_tiles = gl.cdiv(k_hi - k_lo, BN)
        n_full = (k_hi - k_lo) // BN
        for i in gl.static_range(NS - 1):
            _load_keys(k_smem.index(i), kbase, sk_l, k_lo + i * BN, k_hi, LD, BN, D)
        offs_m, qmask, lse2, zero, accp, accx = _query_state(start_m, q_hi, LSE, MMA, BM, BN)
        q_t = q_smem.permute((1, 0))  # [features, queries]: the MMA's B operand
        for t in range(n_full):
            # tile t has landed (NS - 2 younger copies may be in flight); after the barrier every warp is past the
            # MMA of tile t-1, so its stage takes tile t + NS - 1
            async_copy.wait_group(NS - 2)
            gl.thread_barrier()
            fence_async_shared()
            _load_keys(k_smem.index((t + NS - 1) % NS), kbase, sk_l, k_lo + (t + NS - 1) * BN, k_hi, LD, BN, D)
            offs_n = k_lo + t * BN + gl.arange(0, BN, layout=KEYS)
            kmax = gl.load(KB + offs_n)  # read before the MMA: its latency hides behind it
            s = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(t % NS), q_t, zero, use_acc=False,
                                                          is_async=True)])
            accp, accx = _softmax(s, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, Q_MASKED, kmax)
        if n_full < n_tiles:  # the frame's last, partial key tile
            async_copy.wait_group(NS - 2)
            gl.thread_barrier()
            fence_async_shared()
            offs_n = k_lo + n_full * BN + gl.arange(0, BN, layout=KEYS)
            s = warpgroup_mma_wait(0, deps=[warpgroup_mma(k_smem.index(n_full % NS), q_t, zero, use_acc=False,
                                                          is_async=True)])
            accp, accx = _softmax(s, offs_n, offs_n < k_hi, qmask, lse2, accp, accx, RB, KB, c, True)
        async_copy.wait_group(0)
        gl.thread_barrier()
        _store_query_sums(MASS, PX, out_row, offs_m, qmask, accp, accx, QS)

    @gluon.jit
    def _gluon_sweep_kernel(Q, K_, LSE, MASS, PX, RECV, KMAX, sq_r, sq_h, sq_l, sk_r, sk_h, sk_l, H, Lq, Lk,
                            frame_tokens, Fk, q_per_split, c, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                            NS: gl.constexpr, SYNC: gl.constexpr = False):
        split = gl.program_id(0)
        fk = gl.program_id(1)
        pid_bh = gl.program_id(2)
        r = pid_bh // H
        h = pid_bh % H
        k_lo = fk * frame_tokens
        k_hi = gl.minimum(k_lo + frame_tokens, Lk)
        q_lo = split * q_per_split
        q_hi = gl.minimum(q_lo + q_per_split, Lq)
        q_full = q_lo + ((q_hi - q_lo) // BM) * BM
        kbase = K_ + r * sk_r + h * sk_h
        qbase = Q + r * sq_r + h * sq_h
        RB = RECV + (split * gl.num_programs(2) + pid_bh) * Lk
        KB = KMAX + (split * gl.num_programs(2) + pid_bh) * Lk
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, D], gl.NVMMASharedLayout.get_default_for([BM, D],
                                                                                                        gl.bfloat16))
        k_smem = gl.allocate_shared_memory(gl.bfloat16, [NS, BN, D],
                                           gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16))
        out_row = (pid_bh * Fk + fk) * Lq
        for start_m in range(q_lo, q_full, BM):
            if SYNC:
                _query_tile_sync(q_smem, k_smem, qbase, kbase, sq_l, sk_l, start_m, q_hi, k_lo, k_hi, LSE + pid_bh * Lq,
                                 MASS, PX, RB, KB, out_row, c, False, BM, BN, D, NS)
            else:
                _query_tile(q_smem, k_smem, qbase, kbase, sq_l, sk_l, start_m, q_hi, k_lo, k_hi, LSE + pid_bh * Lq,
                            MASS, PX, RB, KB, out_row, c, False, BM, BN, D, NS)
        if q_full < q_hi:
            if SYNC:
                _query_tile_sync(q_smem, k_smem, qbase, kbase, sq_l, sk_l, q_full, q_hi, k_lo, k_hi, LSE + pid_bh * Lq,
                                 MASS, PX, RB, KB, out_row, c, True, BM, BN, D, NS)
            else:
                _query_tile(q_smem, k_smem, qbase, kbase, sq_l, sk_l, q_full, q_hi, k_lo, k_hi, LSE + pid_bh * Lq,
                            MASS, PX, RB, KB, out_row, c, True, BM, BN, D, NS)


def gluon_sweep(q, k, scale, frame_tokens, lse, sync: bool = False):
    """:func:`kernels.sweep`'s results (bidirectional, bf16, head_dim 128, key max on) from the Gluon kernel: two
    warpgroups pipelined, or (``sync``) one warpgroup a tile at a time."""
    if gluon is None:
        raise RuntimeError("this Triton has no Gluon")
    r, h, lq, d = q.shape
    assert d == HEAD_DIM and q.dtype == torch.bfloat16 and q.stride(3) == 1 and k.stride(3) == 1
    lk = k.shape[2]
    ft, fk, splits, per, mass, px, recv, kmax, lse = K.sweep_buffers(q, k, frame_tokens, lse, BLOCK_M)
    _gluon_sweep_kernel[(splits, fk, r * h)](q, k, lse, mass, px, recv, kmax, q.stride(0), q.stride(1), q.stride(2),
                                             k.stride(0), k.stride(1), k.stride(2), h, lq, lk, ft, fk, per,
                                             scale * LOG2E, BM=BLOCK_M, BN=BLOCK_N, D=HEAD_DIM, NS=STAGES,
                                             SYNC=sync, num_warps=4 if sync else WARPS)
    return K.sweep_results(recv, kmax, mass, px, scale)
