"""Triton kernels behind :mod:`wan_capture.stats` on CUDA: exact statistics without materialising scores.

* ``row pass`` (one program per query block, all keys): online log-sum-exp, softmax entropy, and probability mass
  per key frame (per-frame accumulators rescaled like the running sum), so one sweep gives ``lse``, ``entropy`` and
  ``frame_mass`` per query.
* ``column pass`` (one program per key block, all queries): with the row pass's ``lse``, the attention each key
  receives and the maximum score it gets; no atomics, each program owns its keys.
* ``cross`` (one program per query block): log-sum-exp over all text keys, then the probabilities of the tracked
  keys only.
* ``sweep`` (one program per query split x key frame, query tiles outer, the frame's key tiles inner): the single
  sweep used when each query's log-sum-exp is already known (returned by the model's own attention kernel): per
  query the mass and the ``sum p*log2 p`` on that key frame (so frame mass and entropy need no second sweep), per
  key the received attention and max score, added tile by tile to rows the program alone owns (one row per split,
  summed afterwards). Each row has one writer, so the results are deterministic. A frame's tail (its keys past the
  last whole key tile) is a second kernel's, launched after the first: the tail's keys held, the query tiles
  streamed past. On sm_90 each key's per-tile results are written by one lane of the quad that holds them in the
  MMA layout (``QUAD``), not converted through shared memory first.

Scores are ``tl.dot`` of the model's own bf16/fp16 q and k with float32 accumulation (float32 inputs use IEEE
float32, never TF32), kept in base-2 units inside the kernels (``exp2``), reported in natural units.
"""
from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# which keys a query sees (the kernels' CAUSAL argument): all, those up to its own token, or up to its own frame
MASK_NONE = tl.constexpr(0)
MASK_TOKEN = tl.constexpr(1)
MASK_FRAME = tl.constexpr(2)
MAX_FRAMES = 128  # key frames the kernels keep per-query sums for (row pass: in registers; sweep: in memory)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation; IEEE float32 for float32 inputs (Triton would use TF32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _visible(offs_q_abs, offs_k, Lk, frame_tokens, CAUSAL: tl.constexpr):
    valid = offs_k[None, :] < Lk
    if CAUSAL == MASK_TOKEN:
        valid = valid & (offs_k[None, :] <= offs_q_abs[:, None])
    if CAUSAL == MASK_FRAME:
        valid = valid & ((offs_k[None, :] // frame_tokens) <= (offs_q_abs[:, None] // frame_tokens))
    return valid


@triton.jit
def _q_tile(Q, sq_r, sq_h, sq_l, sq_d, H, Lq, pid_m, pid_bh, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """The query tile ``pid_m`` of row-head ``pid_bh`` (rows past ``Lq`` read as 0): ``(row, head, query offsets,
    feature offsets, q)``."""
    r = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + r * sq_r + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=offs_m[:, None] < Lq, other=0.0)
    return r, h, offs_m, offs_d, q


@triton.jit
def _row_tile(q, kbase, sk_l, sk_d, offs_d, start_n, q_abs, m, l, u, fm, cols, Lk, frame_tokens, c,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, WANT_MASS: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """One key tile of the row pass: raw scores s, probabilities exp2(c*(s - m)) with the running max m."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(kbase + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d, mask=offs_n[:, None] < Lk, other=0.0)
    else:
        k = tl.load(kbase + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d)
    s = _dot(q, tl.trans(k), IEEE)
    if MASKED:
        valid = _visible(q_abs, offs_n, Lk, frame_tokens, CAUSAL)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    mc = m_new * c
    p = tl.exp2(s * c - mc[:, None])
    alpha = tl.exp2(m * c - mc)
    psum = tl.sum(p, 1)
    l = l * alpha + psum
    if MASKED:
        u = u * alpha + tl.sum(p * tl.where(valid, s, 0.0), 1)
    else:
        u = u * alpha + tl.sum(p * s, 1)
    if WANT_MASS:
        fm = fm * alpha[:, None]
        f_lo = start_n // frame_tokens
        f_hi = (tl.minimum(start_n + BLOCK_N, Lk) - 1) // frame_tokens
        if f_lo == f_hi:  # most tiles lie inside one frame: its mass is the row sum already at hand
            fm = tl.where(cols[None, :] == f_lo, fm + psum[:, None], fm)
        else:
            kf = offs_n // frame_tokens
            for f in range(f_lo, f_hi + 1):
                pf = tl.sum(tl.where(kf[None, :] == f, p, 0.0), 1)
                fm = tl.where(cols[None, :] == f, fm + pf[:, None], fm)
    return m_new, l, u, fm


@triton.jit
def _row_kernel(Q, K, LSE, ENT, MASS, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H, Lq, Lk, q_offset,
                frame_tokens, Fk, c, CAUSAL: tl.constexpr, WANT_MASS: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, FKP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    r, h, offs_m, offs_d, q = _q_tile(Q, sq_r, sq_h, sq_l, sq_d, H, Lq, pid_m, pid_bh, BLOCK_M, D)
    kbase = K + r * sk_r + h * sk_h
    q_abs = offs_m + q_offset
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    fm = tl.zeros([BLOCK_M, FKP], tl.float32)
    cols = tl.arange(0, FKP)
    if CAUSAL == MASK_NONE:
        n_full = (Lk // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            m, l, u, fm = _row_tile(q, kbase, sk_l, sk_d, offs_d, start_n, q_abs, m, l, u, fm, cols, Lk,
                                    frame_tokens, c, CAUSAL, False, WANT_MASS, IEEE, BLOCK_N)
        if n_full < Lk:
            m, l, u, fm = _row_tile(q, kbase, sk_l, sk_d, offs_d, n_full, q_abs, m, l, u, fm, cols, Lk,
                                    frame_tokens, c, CAUSAL, True, WANT_MASS, IEEE, BLOCK_N)
    else:
        last_q = tl.minimum((pid_m + 1) * BLOCK_M, Lq) - 1 + q_offset
        if CAUSAL == MASK_TOKEN:
            hi = tl.minimum(Lk, last_q + 1)
        else:
            hi = tl.minimum(Lk, (last_q // frame_tokens + 1) * frame_tokens)
        for start_n in range(0, hi, BLOCK_N):
            m, l, u, fm = _row_tile(q, kbase, sk_l, sk_d, offs_d, start_n, q_abs, m, l, u, fm, cols, Lk,
                                    frame_tokens, c, CAUSAL, True, WANT_MASS, IEEE, BLOCK_N)
    lse2 = m * c + tl.log2(l)
    row_ok = offs_m < Lq
    tl.store(LSE + pid_bh * Lq + offs_m, lse2 * 0.6931471805599453, mask=row_ok)
    tl.store(ENT + pid_bh * Lq + offs_m, (lse2 - c * u / l) * 0.6931471805599453, mask=row_ok)
    if WANT_MASS:
        tl.store(MASS + (pid_bh * Lq + offs_m[:, None]) * Fk + cols[None, :], fm / l[:, None],
                 mask=row_ok[:, None] & (cols[None, :] < Fk))


@triton.jit
def _col_tile(k, qbase, sq_l, sq_d, offs_d, start_m, offs_n, recv, kmax, LSE, pid_bh, Lq, Lk, q_offset,
              frame_tokens, c, CAUSAL: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """One query tile of the column pass, keys x queries so that the per-key sums are row reductions."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if MASKED:
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d, mask=offs_m[:, None] < Lq, other=0.0)
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf")) * 1.4426950408889634
    else:
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d)
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m) * 1.4426950408889634
    s = _dot(k, tl.trans(q), IEEE)
    if MASKED:
        q_abs = offs_m + q_offset
        valid = (offs_m[None, :] < Lq) & (offs_n[:, None] < Lk)
        if CAUSAL == MASK_TOKEN:
            valid = valid & (offs_n[:, None] <= q_abs[None, :])
        if CAUSAL == MASK_FRAME:
            valid = valid & ((offs_n[:, None] // frame_tokens) <= (q_abs[None, :] // frame_tokens))
        s = tl.where(valid, s, float("-inf"))
    recv += tl.sum(tl.exp2(s * c - lse2[None, :]), 1)
    kmax = tl.maximum(kmax, tl.max(s, 1))
    return recv, kmax


@triton.jit
def _col_kernel(Q, K, LSE, RECV, KMAX, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H, Lq, Lk, q_offset,
                frame_tokens, c, scale, CAUSAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    r = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + r * sk_r + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d,
                mask=offs_n[:, None] < Lk, other=0.0)  # keys past Lk score 0 and are not stored
    qbase = Q + r * sq_r + h * sq_h
    recv = tl.zeros([BLOCK_N], tl.float32)
    kmax = tl.full([BLOCK_N], float("-inf"), tl.float32)
    if CAUSAL == MASK_NONE:
        m_full = (Lq // BLOCK_M) * BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            recv, kmax = _col_tile(k, qbase, sq_l, sq_d, offs_d, start_m, offs_n, recv, kmax, LSE, pid_bh, Lq, Lk,
                                   q_offset, frame_tokens, c, CAUSAL, False, IEEE, BLOCK_M)
        if m_full < Lq:
            recv, kmax = _col_tile(k, qbase, sq_l, sq_d, offs_d, m_full, offs_n, recv, kmax, LSE, pid_bh, Lq, Lk,
                                   q_offset, frame_tokens, c, CAUSAL, True, IEEE, BLOCK_M)
    else:
        first_key = pid_n * BLOCK_N
        if CAUSAL == MASK_TOKEN:
            lo = tl.maximum(first_key - q_offset, 0)
        else:
            lo = tl.maximum((first_key // frame_tokens) * frame_tokens - q_offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        for start_m in range(lo, Lq, BLOCK_M):
            recv, kmax = _col_tile(k, qbase, sq_l, sq_d, offs_d, start_m, offs_n, recv, kmax, LSE, pid_bh, Lq, Lk,
                                   q_offset, frame_tokens, c, CAUSAL, True, IEEE, BLOCK_M)
    ok = offs_n < Lk
    tl.store(RECV + pid_bh * Lk + offs_n, recv, mask=ok)
    tl.store(KMAX + pid_bh * Lk + offs_n, kmax * scale, mask=ok)


@triton.jit
def _cross_kernel(Q, K, POS, OUT, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H, Lq, Lk, T, scale_log2,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                  TP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    r, h, offs_m, offs_d, q = _q_tile(Q, sq_r, sq_h, sq_l, sq_d, H, Lq, pid_m, pid_bh, BLOCK_M, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + r * sk_r + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d,
                    mask=offs_n[:, None] < Lk, other=0.0)
        s = tl.where(offs_n[None, :] < Lk, _dot(q, tl.trans(k), IEEE) * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m = m_new
    lse2 = m + tl.log2(l)
    offs_t = tl.arange(0, TP)
    pos = tl.load(POS + offs_t, mask=offs_t < T, other=0)
    kt = tl.load(K + r * sk_r + h * sk_h + pos[:, None] * sk_l + offs_d[None, :] * sk_d)
    st = _dot(q, tl.trans(kt), IEEE)
    p = tl.exp2(st * scale_log2 - lse2[:, None])
    tl.store(OUT + (pid_bh * Lq + offs_m[:, None]) * T + offs_t[None, :], p,
             mask=(offs_m[:, None] < Lq) & (offs_t[None, :] < T))


# The per-key sums and maxima of a score tile [keys, queries] (``tl.sum``/``tl.max`` over the queries) are held, on
# Hopper's MMA v3 layout with 4 warps, by the 4 lanes of a quad (each warp 16 keys a wgmma, each key's queries spread
# over one quad). Stored with tl.store/tl.atomic_add, Triton first converts them to a layout of one owner per key
# through shared memory (a store, a barrier, a load, a barrier): the hot loop waits at 4 barriers a tile, not 2. With
# QUAD on, the quad's first lane writes them straight from the MMA layout (PTX; sweep() checks the layout it compiled).
# Bit-identical; 3.5% faster at Wan 14B's shape on an H100, no change measured at 1.3B (bench/README.md).
_QUAD_FIRST_LANE = """{
 .reg .pred own, go;
 .reg .b32 lane;
 mov.u32 lane, %laneid;
 and.b32 lane, lane, 3;
 setp.eq.u32 own, lane, 0;
 setp.ne.and.u32 go, $3, 0, own;
 @go """
_QUAD_RED_ADD = tl.constexpr(_QUAD_FIRST_LANE + "red.relaxed.gpu.global.add.f32 [$1], $2;\n mov.u32 $0, 0;\n}")
_QUAD_STORE = tl.constexpr(_QUAD_FIRST_LANE + "st.global.f32 [$1], $2;\n mov.u32 $0, 0;\n}")


@triton.jit
def _add_key_sums(ptrs, vals, mask, QUAD: tl.constexpr):
    """A tile's per-key sums added at ``ptrs`` (relaxed, GPU scope): with ``QUAD`` by the first lane of each quad
    holding them (inline PTX; it must return a value, a dummy), else through ``tl.atomic_add``."""
    if QUAD:
        tl.inline_asm_elementwise(_QUAD_RED_ADD, "=r,l,f,r", [ptrs.to(tl.int64), vals, mask.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_add(ptrs, vals, mask=mask, sem="relaxed")


@triton.jit
def _store_key_max(ptrs, vals, mask, QUAD: tl.constexpr):
    """A tile's per-key maxima stored at ``ptrs``: with ``QUAD`` by the first lane of each quad, else ``tl.store``."""
    if QUAD:
        tl.inline_asm_elementwise(_QUAD_STORE, "=r,l,f,r", [ptrs.to(tl.int64), vals, mask.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptrs, vals, mask=mask)


@triton.jit
def _sweep_tile(q, kbase, sk_l, sk_d, offs_d, start_n, k_hi, q_abs, qmask, lse2, accp, accx, RB, KB, frame_tokens, c,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
                KEY_MAX: tl.constexpr, QUAD: tl.constexpr = False):
    """One key tile against the program's query tile, as [keys, queries].

    Per query, the mass ``p`` and ``p * x`` accumulate elementwise (reduced once per query tile), where
    ``x = log2 p = s*c - lse2`` is the exponent already at hand: ``-sum p*x`` is the entropy in bits, so no raw score
    needs to stay live past the exponent (keeping ``s`` for ``p*s`` cost registers and 3-6% of the sweep on an
    H200).
    Per key, the tile's sum over its queries is added to the program's own row ``RB`` with a relaxed atomic add: no
    other program touches that row and one thread adds each key's partial sums, in program order, so the result is
    deterministic; it replaces a load before the dot and a store after it (faster on an H200, bench/README.md).
    The max score per key is read before the dot (its latency hides behind it) and written after."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kmask = offs_n < k_hi
    if KEY_MAX:
        kmax = tl.load(KB + offs_n, mask=kmask, other=float("-inf"))
    if MASKED:
        k = tl.load(kbase + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d, mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(kbase + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d)
    s = _dot(k, tl.trans(q), IEEE)  # [keys, queries], raw q.k
    if MASKED:
        valid = kmask[:, None] & qmask[None, :]
        if CAUSAL == MASK_TOKEN:
            valid = valid & (offs_n[:, None] <= q_abs[None, :])
        if CAUSAL == MASK_FRAME:
            valid = valid & ((offs_n[:, None] // frame_tokens) <= (q_abs[None, :] // frame_tokens))
        s = tl.where(valid, s, float("-inf"))
    if KEY_MAX:  # reduced first, so that s is dead once x is computed
        smax = tl.max(s, 1)
    x = s * c - lse2[None, :]
    p = tl.exp2(x)
    if MASKED:
        x = tl.where(valid, x, 0.0)  # hidden keys: p = 0 and x = -inf
    accp += p
    accx += p * x
    _add_key_sums(RB + offs_n, tl.sum(p, 1), kmask, QUAD)
    if KEY_MAX:
        _store_key_max(KB + offs_n, tl.maximum(kmax, smax), kmask, QUAD)
    return accp, accx


@triton.jit
def _masked_query_tiles(qbase, kbase, sq_l, sq_d, sk_l, sk_d, offs_d, q_start, q_hi, k_lo, k_hi, q_offset, LSE_ROW,
                        MASS, PX, out_row, RB, KB, frame_tokens, c, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_MAX: tl.constexpr,
                        QUAD: tl.constexpr = False):
    """Query tiles ``q_start..q_hi`` (a partial one, or all of them under a causal mask) against every key of the
    frame, queries and keys masked."""
    for start_m in range(q_start, q_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qmask = offs_m < q_hi
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d, mask=qmask[:, None], other=0.0)
        lse2 = tl.load(LSE_ROW + offs_m, mask=qmask, other=float("inf")) * 1.4426950408889634
        accp = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        accx = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for start_n in range(k_lo, k_hi, BLOCK_N):
            accp, accx = _sweep_tile(q, kbase, sk_l, sk_d, offs_d, start_n, k_hi, offs_m + q_offset, qmask, lse2,
                                     accp, accx, RB, KB, frame_tokens, c, CAUSAL, True, IEEE, BLOCK_N, KEY_MAX, QUAD)
        out = out_row + offs_m
        tl.store(MASS + out, tl.sum(accp, 0), mask=qmask)
        tl.store(PX + out, tl.sum(accx, 0), mask=qmask)
        tl.debug_barrier()


@triton.jit
def _sweep_kernel(Q, K, LSE, MASS, PX, RECV, KMAX, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H, Lq, Lk,
                  q_offset, frame_tokens, Fk, q_per_split, c, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, KEY_MAX: tl.constexpr,
                  QUAD: tl.constexpr = False):
    # the splits of one key frame are neighbours in launch order, so the programs running at once share few key
    # frames and those stay in L2 (at Wan 14B's 720p frames, 0.9 MB a head, that decides the speed)
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
    if CAUSAL != MASK_NONE:  # queries before this frame's first key see none of it
        q_lo = tl.maximum(q_lo, ((tl.maximum(k_lo - q_offset, 0) - q_lo) // BLOCK_M) * BLOCK_M + q_lo)
    offs_d = tl.arange(0, D)
    kbase = K + r * sk_r + h * sk_h
    qbase = Q + r * sq_r + h * sq_h
    # this split's per-key received sums and max scores: rows of its own, so no other program touches them and the
    # results are deterministic. Each query tile updates every key once; the barrier after it orders the max's
    # read-modify-writes across the program's threads.
    RB = RECV + (split * tl.num_programs(2) + pid_bh) * Lk
    KB = KMAX + (split * tl.num_programs(2) + pid_bh) * Lk
    # the hot loop has no masks: full query tiles against the frame's full key tiles (bidirectional attention);
    # a partial query tile follows in a masked loop of its own, the frame's tail in _frame_tail_kernel
    q_full = q_lo if CAUSAL != MASK_NONE else q_lo + ((q_hi - q_lo) // BLOCK_M) * BLOCK_M
    n_hot = n_full if CAUSAL == MASK_NONE else k_lo
    for start_m in range(q_lo, q_full, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d)
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m) * 1.4426950408889634
        accp = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        accx = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for start_n in range(k_lo, n_hot, BLOCK_N):
            accp, accx = _sweep_tile(q, kbase, sk_l, sk_d, offs_d, start_n, k_hi, offs_m, offs_m, lse2, accp, accx,
                                     RB, KB, frame_tokens, c, CAUSAL, False, IEEE, BLOCK_N, KEY_MAX, QUAD)
        out = (pid_bh * Fk + fk) * Lq + offs_m
        tl.store(MASS + out, tl.sum(accp, 0))
        tl.store(PX + out, tl.sum(accx, 0))
        tl.debug_barrier()
    # a partial query tile (or every tile under a causal mask)
    _masked_query_tiles(qbase, kbase, sq_l, sq_d, sk_l, sk_d, offs_d, q_full, q_hi, k_lo, k_hi, q_offset,
                        LSE + pid_bh * Lq, MASS, PX, (pid_bh * Fk + fk) * Lq, RB, KB, frame_tokens, c, CAUSAL, IEEE,
                        BLOCK_M, BLOCK_N, KEY_MAX, QUAD)


@triton.jit
def _frame_tail_kernel(Q, K, LSE, MASS, PX, RECV, KMAX, sq_r, sq_h, sq_l, sq_d, sk_r, sk_h, sk_l, sk_d, H, Lq, Lk,
                       frame_tokens, Fk, q_per_split, c, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, FRAMES: tl.constexpr, D: tl.constexpr,
                       KEY_MAX: tl.constexpr):
    """Key frames' tails (each frame's keys past its last whole ``BLOCK_N`` tile) against the split's whole query
    tiles, added to what :func:`_sweep_kernel` stored (bidirectional sweeps; launched after it, on the same stream).

    One program per split x ``FRAMES`` key frames x row-head, the split's own query range and per-key row as in the
    sweep kernel. The tails of ``FRAMES`` frames, ``TAIL_N`` slots each, are one key tile, so each query tile is read
    once for all of them (a tail is 16-24 keys at Wan's frames: one frame a tile, the query reads would dominate).
    The tails stay in registers while the query tiles stream past (pipelined loads, no barrier); each key's sums are
    accumulated elementwise and reduced once. Done inside the sweep kernel, one masked tile per query tile with a
    barrier after each, this pass cost 13% of the sweep at Wan 1.3B's frames of 1,560 keys."""
    split = tl.program_id(0)
    f0 = tl.program_id(1) * FRAMES
    pid_bh = tl.program_id(2)
    r = pid_bh // H
    h = pid_bh % H
    # slot j of the tile: frame f0 + j // TAIL_N, key j % TAIL_N of that frame's tail
    fr = f0 + tl.arange(0, FRAMES * TAIL_N) // TAIL_N
    k_lo = fr * frame_tokens
    k_hi = tl.minimum(k_lo + frame_tokens, Lk)
    offs_n = k_lo + ((k_hi - k_lo) // BLOCK_N) * BLOCK_N + tl.arange(0, FRAMES * TAIL_N) % TAIL_N
    kmask = (fr < Fk) & (offs_n < k_hi)
    q_lo = split * q_per_split
    q_full = q_lo + ((tl.minimum(q_lo + q_per_split, Lq) - q_lo) // BLOCK_M) * BLOCK_M  # a partial query tile: done
    offs_d = tl.arange(0, D)
    k = tl.load(K + r * sk_r + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d, mask=kmask[:, None],
                other=0.0)
    qbase = Q + r * sq_r + h * sq_h
    recv = tl.zeros([BLOCK_M, FRAMES * TAIL_N], tl.float32)
    smax = tl.full([BLOCK_M, FRAMES * TAIL_N], float("-inf"), tl.float32)
    frames = f0 + tl.arange(0, FRAMES)
    out_rows = (pid_bh * Fk + frames) * Lq
    for start_m in range(q_lo, q_full, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = tl.load(qbase + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d)
        lse2 = tl.load(LSE + pid_bh * Lq + offs_m) * 1.4426950408889634
        s = tl.where(kmask[None, :], _dot(q, tl.trans(k), IEEE), float("-inf"))  # [queries, tail keys]
        if KEY_MAX:
            smax = tl.maximum(smax, s)
        x = s * c - lse2[:, None]
        p = tl.exp2(x)
        x = tl.where(kmask[None, :], x, 0.0)  # empty slots: p = 0 and x = -inf
        recv += p
        out = out_rows[None, :] + offs_m[:, None]  # [queries, frames]
        ok = frames[None, :] < Fk
        mass = tl.sum(tl.reshape(p, [BLOCK_M, FRAMES, TAIL_N]), 2)
        tl.store(MASS + out, tl.load(MASS + out, mask=ok) + mass, mask=ok)
        px = tl.sum(tl.reshape(p * x, [BLOCK_M, FRAMES, TAIL_N]), 2)
        tl.store(PX + out, tl.load(PX + out, mask=ok) + px, mask=ok)
    RB = RECV + (split * tl.num_programs(2) + pid_bh) * Lk
    tl.store(RB + offs_n, tl.load(RB + offs_n, mask=kmask) + tl.sum(recv, 0), mask=kmask)
    if KEY_MAX:
        KB = KMAX + (split * tl.num_programs(2) + pid_bh) * Lk
        tl.store(KB + offs_n, tl.maximum(tl.load(KB + offs_n, mask=kmask), tl.max(smax, 0)), mask=kmask)


_CAUSAL = {None: MASK_NONE, "token": MASK_TOKEN, "frame": MASK_FRAME}


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether these kernels handle these inputs (else the torch path runs)."""
    d = q.shape[-1]
    return (q.is_cuda or _interpreting()) and q.dtype in (torch.bfloat16, torch.float16, torch.float32) \
        and q.dtype == k.dtype and d >= 16 and d == triton.next_power_of_2(d) and d <= 256


def _interpreting() -> bool:
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_numpy_fix()
        return True
    return False


def _interpreter_numpy_fix() -> None:
    """Triton < 3.7's CPU interpreter turns its 1-element scalar arrays into loop bounds with ``int(array)``, which
    NumPy >= 2.5 refuses ("only 0-dimensional arrays can be converted"); later Triton uses ``int(a.squeeze())``.
    Give older interpreters the same conversion (only the interpreter is touched, only while it interprets)."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "_squeezes_index", False):
        return

    class _Scope:
        def __init__(self, scope):
            self._scope = scope

        def set_attr(self, obj, name, value):
            if name == "__index__":
                value = lambda self: int(self.handle.data.squeeze())  # noqa: E731
            self._scope.set_attr(obj, name, value)

        def __getattr__(self, name):
            return getattr(self._scope, name)

    def patched(tensor, scope):
        return original(tensor, _Scope(scope))
    patched._squeezes_index = True
    interpreter._patch_lang_tensor = patched


def _ieee(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, picked on an H100 by bench/tune_kernels.py for head_dim 128
ROW_CONFIG = (128, 64, 8, 3)
COL_CONFIG = (64, 128, 4, 3)
CROSS_CONFIG = (128, 64, 8, 2)  # the cross-attention maps' kernel
SMALL_CONFIG = (64, 64, 4, 2)  # head_dim > 128, and Triton's CPU interpreter
MIN_DOT = 16  # tl.dot needs every dimension of at least 16


def _config(default, d):
    return SMALL_CONFIG if d > 128 or _interpreting() else default


def row_pass(q, k, scale, layout, frame_tokens, want_mass: bool, config=None):
    """``lse [R*H, Lq]``, ``entropy [R*H, Lq]`` and, when ``want_mass``, ``mass [R*H, Lq, Fk]`` (rows sum to 1)."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    fk = -(-lk // frame_tokens) if frame_tokens else 1
    want_mass = want_mass and fk <= MAX_FRAMES
    # without mass the frame accumulator is unused: size it minimally (sizing it by Lk cannot compile)
    fkp = max(MIN_DOT, triton.next_power_of_2(fk)) if want_mass else MIN_DOT
    dev = q.device
    lse = torch.empty(r * h, lq, device=dev, dtype=torch.float32)
    ent = torch.empty_like(lse)
    mass = torch.empty(r * h, lq, fk, device=dev, dtype=torch.float32) if want_mass else lse
    bm, bn, warps, stages = config or _config(ROW_CONFIG, d)
    grid = (triton.cdiv(lq, bm), r * h)
    _row_kernel[grid](q, k, lse, ent, mass, *_strides(q), *_strides(k), h, lq, lk, layout.q_offset,
                      frame_tokens or 1, fk, scale * LOG2E, CAUSAL=_CAUSAL[layout.causal], WANT_MASS=want_mass,
                      IEEE=_ieee(q), BLOCK_M=bm, BLOCK_N=bn, D=d, FKP=fkp,
                      num_warps=warps, num_stages=stages)
    return lse, ent, (mass if want_mass else None)


def column_pass(q, k, scale, layout, frame_tokens, lse, config=None):
    """``received_sum [R*H, Lk]`` (sum over queries of P) and ``key_max [R*H, Lk]`` (natural units)."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    recv = torch.empty(r * h, lk, device=q.device, dtype=torch.float32)
    kmax = torch.empty_like(recv)
    bm, bn, warps, stages = config or _config(COL_CONFIG, d)
    grid = (triton.cdiv(lk, bn), r * h)
    _col_kernel[grid](q, k, lse, recv, kmax, *_strides(q), *_strides(k), h, lq, lk, layout.q_offset,
                      frame_tokens or 1, scale * LOG2E, scale, CAUSAL=_CAUSAL[layout.causal], IEEE=_ieee(q),
                      BLOCK_M=bm, BLOCK_N=bn, D=d, num_warps=warps, num_stages=stages)
    return recv, kmax


def cross_probs(q, k, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """``[R*H, Lq, T]`` softmax probabilities over all keys at ``positions``."""
    r, h, lq, d = q.shape
    lk, t = k.shape[2], positions.numel()
    out = torch.empty(r * h, lq, t, device=q.device, dtype=torch.float32)
    tp = max(MIN_DOT, triton.next_power_of_2(t))
    bm, bn, warps, stages = _config(CROSS_CONFIG, d)
    grid = (triton.cdiv(lq, bm), r * h)
    _cross_kernel[grid](q, k, positions.to(torch.int32).contiguous(), out, *_strides(q), *_strides(k), h, lq, lk, t,
                        scale * LOG2E, IEEE=_ieee(q), BLOCK_M=bm, BLOCK_N=bn, D=d, TP=tp,
                        num_warps=warps, num_stages=stages)
    return out


# (BLOCK_M queries, BLOCK_N keys, warps, stages); bench/tune_kernels.py. A config passed to sweep() may add a fifth
# entry: a cap on the registers a thread (Triton's ``maxnreg``), so that more programs fit on a multiprocessor
SWEEP_CONFIG = (128, 64, 4, 3)
# the frame-tail kernel: (tail slots a tile: the tails of as many frames as fit, at least one; warps; stages of the
# query tiles' loads), tuned on an H100 (bench/README.md "Issue 36"): one frame a tile at 1.3B, two at 14B 720p
TAIL_CONFIG = (32, 4, 3)
H100_SMS, H100_L2 = 132, 50 << 20  # what the interpreter assumes (and the L2 where the driver does not say)
RESIDENT_PER_SM = 3  # sweep programs one multiprocessor holds at once (registers allow 2 to 3)
WAVES = 8  # programs per multiprocessor the sweep launches at least, to fill the GPU


def _register_cap(cap) -> dict:
    """Launch options for a config's optional register cap (none under the interpreter, which has no registers)."""
    return {"maxnreg": cap[0]} if cap and cap[0] and not _interpreting() else {}


def _sweep_config(d: int):
    return SMALL_CONFIG if d > 128 or _interpreting() else SWEEP_CONFIG


def sweep_splits(lq: int, frames: int, rows: int, frame_tokens: int, d: int, device: torch.device,
                 resident: int = RESIDENT_PER_SM) -> int:
    """Query splits of the single sweep: enough programs to fill the GPU, and enough splits per key frame that the
    key frames of the programs running at once (``resident`` a multiprocessor) fit in half the L2 cache (each
    program re-reads its frame's keys for every query tile)."""
    if _interpreting():
        sms, l2 = H100_SMS, H100_L2
    else:
        props = torch.cuda.get_device_properties(device)
        sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", H100_L2)
    running = resident * sms  # an estimate of the programs resident at once
    fill = triton.cdiv(WAVES * sms, frames * rows)
    fit = triton.cdiv(running * frame_tokens * d * 2, l2 // 2)
    return max(1, min(triton.cdiv(lq, _sweep_config(d)[0]), max(fill, fit)))


def sweep_bytes(lq: int, lk: int, frames: int, splits: int) -> int:
    """Device bytes :func:`sweep` allocates per row-head (per-query partial sums, per-split per-key rows)."""
    return (2 * frames * lq + 2 * splits * lk) * 4


def sweep_buffers(q, k, frame_tokens, lse, bm: int, splits=None, key_max: bool = True, causal: bool = False,
                  writers: int = 1):
    """What a sweep kernel of ``bm``-query tiles is launched with: ``(ft, fk, splits, per, mass, px, recv, kmax,
    lse)``: frame tokens, key frames, query splits and queries per split, the per-query partial sums, the per-key
    rows, ``writers`` per split (a program's parts that each write rows of their own; summed by
    :func:`sweep_results`) and the float32 ``lse [R*H, Lq]``."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    ft = frame_tokens or lk
    fk = -(-lk // ft)
    if splits is None:
        splits = sweep_splits(lq, fk, r * h, ft, d, q.device)
    per = triton.cdiv(triton.cdiv(lq, splits), bm) * bm
    splits = triton.cdiv(lq, per)
    dev = q.device
    # every (frame, query) entry is written unless a causal mask skips queries that see none of a frame
    alloc = torch.zeros if causal else torch.empty
    mass = alloc(r * h, fk, lq, device=dev, dtype=torch.float32)
    px = alloc(r * h, fk, lq, device=dev, dtype=torch.float32)
    rows = writers * splits  # each row has one writer, so the sums are deterministic; summed after
    recv = torch.zeros(rows, r * h, lk, device=dev, dtype=torch.float32)
    kmax = torch.full((rows if key_max else 1, r * h, lk if key_max else 1), float("-inf"), device=dev,
                      dtype=torch.float32)
    lse = lse.reshape(r * h, lq).to(torch.float32).contiguous()
    return ft, fk, splits, per, mass, px, recv, kmax, lse


def sweep_results(recv, kmax, mass, px, scale: float, key_max: bool = True):
    """:func:`sweep`'s results from what its kernel wrote: received sums and key max over the splits (natural
    units), the per-query mass, and the entropy ``-sum p log p`` from the sums of ``p * log2 p``."""
    return recv.sum(dim=0), (kmax.amax(dim=0) * scale if key_max else None), mass, px.sum(dim=1) * -LN2


def _quad_wanted(q: torch.Tensor, warps: int, block_n: int) -> bool:
    """Whether a sweep kernel may write its per-key results from the quads of Hopper's MMA layout (``QUAD``): a
    bf16/fp16 ``wgmma`` (sm_90) of 4 warps over tiles of 64 keys or a multiple. :func:`_quad_layout` confirms it on
    the compiled kernel."""
    return not _interpreting() and q.is_cuda and torch.version.hip is None and warps == 4 and block_n % 64 == 0 \
        and q.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(q.device)[0] == 9


_MMA_LAYOUT = re.compile(r"nvidia_mma<\{([^}]*)\}>")


def _quad_layout(ttgir: str) -> bool:
    """Whether every MMA layout of a compiled kernel is the one ``QUAD`` writes from: MMA v3 (``wgmma``) with its 4
    warps along the keys, so each key's row is held by the 4 lanes of one quad and by no other warp."""
    layouts = _MMA_LAYOUT.findall(ttgir)
    return bool(layouts) and all("versionMajor = 3" in m and "warpsPerCTA = [4, 1]" in m for m in layouts)


_NOT_QUAD: set = set()  # sweep kernels (their compile keys) whose layout _quad_layout refused: launched without QUAD


def sweep(q, k, scale, layout, frame_tokens, lse, config=None, splits=None, key_max=True, quad=None):
    """The single sweep given ``lse [R*H, Lq]`` (natural log): ``received_sum``/``key_max`` ``[R*H, Lk]`` (natural
    units), per-query ``mass [R*H, Fk, Lq]`` and ``entropy [R*H, Lq]``. ``key_max`` False: no per-key max (None):
    what the plan's ``record_key_max`` off asks for. ``quad``: write each key's results from the MMA layout (default:
    where :func:`_quad_wanted` allows it; False: through Triton's layout conversion, as before)."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    bm, bn, warps, stages, *cap = config or _sweep_config(d)
    ft, fk, splits, per, mass, px, recv, kmax, lse = sweep_buffers(q, k, frame_tokens, lse, bm, splits, key_max,
                                                                   layout.causal is not None)
    args = (q, k, lse, mass, px, recv, kmax, *_strides(q), *_strides(k), h, lq, lk, layout.q_offset, ft, fk, per,
            scale * LOG2E)
    consts = dict(CAUSAL=_CAUSAL[layout.causal], IEEE=_ieee(q), BLOCK_M=bm, BLOCK_N=bn, D=d, KEY_MAX=bool(key_max),
                  num_warps=warps, num_stages=stages, **_register_cap(cap))
    key = (q.device.index, q.dtype, tuple(sorted(consts.items())))
    if quad is None:
        quad = _quad_wanted(q, warps, bn) and key not in _NOT_QUAD
    compiled = _sweep_kernel[(splits, fk, r * h)](*args, QUAD=bool(quad), **consts)
    if quad and not _quad_layout(compiled.asm.get("ttgir", "")):
        # Triton laid the scores out otherwise than QUAD assumes: its per-key writes may double-count. Start over
        # without it (the per-query sums are overwritten; the per-key rows are reset), and remember.
        _NOT_QUAD.add(key)
        recv.zero_()
        kmax.fill_(float("-inf"))
        _sweep_kernel[(splits, fk, r * h)](*args, QUAD=False, **consts)
    if layout.causal is None:
        sweep_frame_tails(q, k, ft, fk, splits, per, lse, mass, px, recv, kmax, scale, bm, bn, key_max)
    return sweep_results(recv, kmax, mass, px, scale, key_max)


def frame_tail_keys(lk: int, frame_tokens: int, block_n: int) -> int:
    """The most keys a key frame has past its last whole ``block_n`` tile (the last frame may be shorter)."""
    last = lk - (-(-lk // frame_tokens) - 1) * frame_tokens
    return max((frame_tokens % block_n) if lk > frame_tokens else 0, last % block_n)


def sweep_frame_tails(q, k, ft, fk, splits, per, lse, mass, px, recv, kmax, scale, bm, bn, key_max=True,
                      config=None) -> None:
    """Add each key frame's tail (bidirectional sweeps) to what a sweep kernel of ``bm x bn`` tiles wrote into
    :func:`sweep_buffers`'s ``mass``, ``px``, ``recv`` and ``kmax`` (its row per split): run after that kernel, on
    its stream. ``config``: ``(tail keys a tile, warps, stages)``, default :data:`TAIL_CONFIG`."""
    r, h, lq, d = q.shape
    lk = k.shape[2]
    tail = frame_tail_keys(lk, ft, bn)
    if tail == 0 or lq < bm:
        return
    keys, warps, stages = config or TAIL_CONFIG
    tail_n = max(MIN_DOT, triton.next_power_of_2(tail))
    frames = max(1, min(keys // tail_n, triton.next_power_of_2(fk)))
    _frame_tail_kernel[(splits, triton.cdiv(fk, frames), r * h)](
        q, k, lse, mass, px, recv, kmax, *_strides(q), *_strides(k), h, lq, lk, ft, fk, per, scale * LOG2E,
        IEEE=_ieee(q), BLOCK_M=bm, BLOCK_N=bn, TAIL_N=tail_n, FRAMES=frames, D=d, KEY_MAX=bool(key_max),
        num_warps=warps, num_stages=stages)


def sink_statistics(q, k, scale, frame_tokens, layout):
    """The :func:`wan_capture.stats.sink_statistics` quantities, flat over ``R*H``: received (mean), key_max,
    per-query mass ``[R*H, Lq, Fk]`` (None past MAX_FRAMES key frames) and per-query entropy."""
    lse, ent, mass = row_pass(q, k, scale, layout, frame_tokens, want_mass=True)
    recv, kmax = column_pass(q, k, scale, layout, frame_tokens, lse)
    return recv / q.shape[2], kmax, mass, ent, lse


__all__ = ["cross_probs", "row_pass", "column_pass", "sink_statistics", "sweep", "supported", "MAX_FRAMES"]
