"""Kernels against the float64 reference: run by test_kernels.py on CUDA, or on the CPU under TRITON_INTERPRET=1.

    PYTHONPATH=.:tests python tests/kernel_cases.py DEVICE DTYPE [quick]
"""
import sys

import torch

from reference import naive_probs, naive_scores, naive_sink
from wan_capture import KeyLayout, cross_attention_probs, score_window, sink_statistics
from wan_capture.stats import kernels  # noqa: E402
from wan_capture.stats.statistics import kernels_for  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-4, torch.float16: 2e-4}  # relative error vs float64 on the same inputs


def rel(got, want):
    want = want.double()
    got = got.double().to(want.device)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "non-finite values differ (unwritten or NaN output?)"
    return float((got[fin] - want[fin]).norm() / want[fin].norm().clamp_min(1e-30))


def case(device, dtype, r, h, lq, lk, d, ft, layout_kw, positions, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(r, h, lq, d, generator=g) * 1.5).to(dtype)
    k = (torch.randn(r, h, lk, d, generator=g) * 1.5).to(dtype)
    # strided like ComfyUI's [B, L, H*D] views, not contiguous per head
    q = q.transpose(1, 2).contiguous().transpose(1, 2).to(device)
    k = k.transpose(1, 2).contiguous().transpose(1, 2).to(device)
    assert kernels_for(q, k) is not None, "the kernels were not selected"
    layout = KeyLayout(layout_kw.get("q_offset", 0), layout_kw.get("causal"), ft)
    scale = d ** -0.5
    qd, kd = q.cpu().double(), k.cpu().double()
    out = {}
    st = sink_statistics(q, k, scale, ft, 1 << 30, layout)
    received, key_max, mass, ent, f0 = naive_sink(qd, kd, ft, scale=scale, **layout_kw)
    assert st.q_frame0 == f0
    out["received"] = rel(st.received, received)
    out["key_max"] = rel(st.key_max, key_max)
    out["frame_mass"] = rel(st.frame_mass, mass)
    out["entropy"] = rel(st.entropy, ent)
    s, _ = naive_scores(qd, kd, scale=scale, frame_tokens=ft, **layout_kw)
    p = naive_probs(s)
    # the single sweep, given each query's log-sum-exp as the model's attention kernel returns it (float32)
    lse = torch.logsumexp(s, dim=-1).float().to(device)
    sw = sink_statistics(q, k, scale, ft, 1 << 30, layout, lse=lse)
    out["sweep_received"] = rel(sw.received, received)
    out["sweep_key_max"] = rel(sw.key_max, key_max)
    out["sweep_frame_mass"] = rel(sw.frame_mass, mass)
    out["sweep_entropy"] = rel(sw.entropy, ent)
    # the sweep without the per-key max, and run again: bit-identical (each per-key row has one writer)
    fk = -(-lk // ft)
    if fk <= kernels.MAX_FRAMES:
        flat = lse.reshape(r * h, lq)
        first = kernels.sweep(q, k, scale, layout, ft, flat)
        again = kernels.sweep(q, k, scale, layout, ft, flat)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), "the sweep is not deterministic"
        recv, kmax, mass_rows, _ = kernels.sweep(q, k, scale, layout, ft, flat, key_max=False)
        assert kmax is None
        out["sweep_no_key_max_received"] = rel(recv.reshape(r, h, lk) / lq, received)
    if not layout_kw.get("causal"):
        got = cross_attention_probs(q, k, positions, scale)
        out["cross"] = rel(got, p[..., positions])
    q0, q1 = lq // 3, lq // 3 + max(1, lq // 4)
    sc, pr = score_window(q, k, scale, (q0, q1), (1, lk), layout=layout)
    out["window_scores"] = rel(sc, s[:, :, q0:q1, 1:lk])
    out["window_probs"] = rel(pr, p[:, :, q0:q1, 1:lk])
    return out


CASES = [
    # r, h, lq, lk, d, frame_tokens, layout, positions
    (2, 2, 200, 200, 64, 40, {}, [0, 5, 199]),
    (1, 3, 97, 97, 128, 13, {}, [3, 96]),
    (1, 2, 130, 130, 64, 26, {"causal": "token"}, [0]),
    (2, 1, 120, 120, 64, 30, {"causal": "frame"}, [0]),
    (1, 2, 90, 150, 64, 30, {"q_offset": 60, "causal": "frame"}, [0]),
    (1, 2, 70, 77, 32, 11, {"q_offset": 7, "causal": "token"}, [0]),
    (2, 2, 150, 512, 128, 600, {}, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 500]),
    # eleven frames of 14 keys (the last of 10): two frames' tails a tile in the sweep's tail kernel, the last tile
    # half empty
    (1, 2, 150, 150, 64, 14, {}, [0]),
    # frames longer than 2,048 tokens (Wan 14B at 720p has 3,600): the single sweep's per-key rows live in memory
    (1, 2, 70, 4450, 32, 2210, {}, [0, 4449]),
    (1, 1, 100, 4500, 32, 2250, {"q_offset": 4400, "causal": "frame"}, [0]),
    # more key frames than the kernels keep sums for (MAX_FRAMES): the chunked torch path answers, as exactly
    (1, 1, 40, 200, 32, 1, {}, [0, 199]),
]


def window_without_frames(device, dtype, lk):
    """An exact window whose layout names no frame_tokens (the row pass once sized a frame accumulator by Lk)."""
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(1, 1, 64, 64, generator=g)).to(dtype).to(device)
    k = (torch.randn(1, 1, lk, 64, generator=g)).to(dtype).to(device)
    sc, pr = score_window(q, k, 0.125, (3, 40), (0, lk), layout=KeyLayout())
    s, _ = naive_scores(q.cpu().double(), k.cpu().double(), scale=0.125)
    return {"nf_window_scores": rel(sc, s[:, :, 3:40]), "nf_window_probs": rel(pr, naive_probs(s)[:, :, 3:40])}


def main(device, dtype_name, quick=False):
    dtype = getattr(torch, dtype_name)
    worst = 0.0
    errs = window_without_frames(device, dtype, 8192 if device == "cuda" else 300)
    print(f"window without frame_tokens: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    assert all(e <= TOL[dtype] for e in errs.values()), errs
    for i, (r, h, lq, lk, d, ft, kw, pos) in enumerate(CASES[:3] if quick else CASES):
        errs = case(device, dtype, r, h, lq, lk, d, ft, kw, pos, seed=i)
        print(f"case {i} {dtype_name} r{r} h{h} lq{lq} lk{lk} d{d} ft{ft} {kw}: " +
              " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
        worst = max(worst, *errs.values())
        bad = {n: e for n, e in errs.items() if not e <= TOL[dtype]}
        assert not bad, f"case {i}: over the {TOL[dtype]:.0e} tolerance: {bad}"
    print(f"ok worst relative error {worst:.1e} (tolerance {TOL[dtype]:.0e})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3)
