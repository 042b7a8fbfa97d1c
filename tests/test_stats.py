"""Every statistic against the float64 naive reference, chunked and unchunked, causal and with a KV cache."""
import pytest
import torch

from reference import naive_probs, naive_scores, naive_sink
from wan_capture import KeyLayout, cross_attention_probs, score_window, sink_statistics, split_heads
from wan_capture.stats.statistics import plan_chunks

LAYOUTS = [
    dict(),
    dict(causal="token"),
    dict(causal="frame", frame_tokens=6),
    dict(q_offset=12, causal="frame", frame_tokens=6),  # KV cache: 12 cached keys before 18 current queries
    dict(q_offset=7, causal="token"),
]
TINY = 64 * 12  # bytes: forces chunks of a couple of query rows


def _qk(r=2, h=3, lq=18, lk=18, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, h, lq, d, generator=g) * 2, torch.randn(r, h, lk, d, generator=g) * 2


def _layout(kw):
    return KeyLayout(kw.get("q_offset", 0), kw.get("causal"), kw.get("frame_tokens", 6))


@pytest.mark.parametrize("kw", LAYOUTS)
@pytest.mark.parametrize("chunk", [TINY, 1 << 30])
def test_cross_probs_match_naive(kw, chunk):
    lk = 18 + kw.get("q_offset", 0)
    q, k = _qk(lk=lk)
    pos = [0, 3, lk - 1]
    got = cross_attention_probs(q, k, pos, scale=0.25, chunk_bytes=chunk, layout=_layout(kw))
    s, _ = naive_scores(q, k, scale=0.25, **kw)
    want = naive_probs(s)[..., pos]
    assert got.shape == (2, 3, 18, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_cross_probs_rows_sum_to_one_over_all_keys():
    q, k = _qk(lk=7)
    got = cross_attention_probs(q, k, list(range(7)), scale=0.125, chunk_bytes=TINY)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 18))


def test_cross_probs_bad_position():
    q, k = _qk(lk=5)
    with pytest.raises(IndexError, match=r"1 tracked positions \(\[5\]\) fall outside the 5 text keys"):
        cross_attention_probs(q, k, [5], scale=1.0)


@pytest.mark.parametrize("kw", LAYOUTS)
@pytest.mark.parametrize("chunk", [TINY, 1 << 30])
def test_sink_statistics_match_naive(kw, chunk):
    lk = 18 + kw.get("q_offset", 0)
    q, k = _qk(lk=lk, seed=1)
    ref_kw = {key: v for key, v in kw.items() if key != "frame_tokens"}
    got = sink_statistics(q, k, scale=0.25, frame_tokens=6, chunk_bytes=chunk, layout=_layout(kw))
    received, key_max, mass, ent, f0 = naive_sink(q, k, 6, scale=0.25, **ref_kw)
    assert got.q_frame0 == f0
    torch.testing.assert_close(got.received.double(), received, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.key_max.double(), key_max, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.frame_mass.double(), mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.entropy.double(), ent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.frame_mass.sum(-1), torch.ones_like(got.frame_mass.sum(-1)))


def test_sink_statistics_partial_last_frame():
    q, k = _qk(lq=17, lk=17, seed=2)  # 17 tokens, frames of 6: the last frame holds 5
    got = sink_statistics(q, k, scale=0.3, frame_tokens=6, chunk_bytes=TINY)
    received, key_max, mass, ent, _ = naive_sink(q, k, 6, scale=0.3)
    assert got.frame_mass.shape == (2, 3, 3, 3)
    torch.testing.assert_close(got.frame_mass.double(), mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.entropy.double(), ent, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", LAYOUTS)
def test_score_window_matches_naive(kw):
    lk = 18 + kw.get("q_offset", 0)
    q, k = _qk(lk=lk, seed=3)
    scores, probs = score_window(q, k, 0.2, (6, 12), (2, lk), chunk_bytes=TINY, layout=_layout(kw))
    s, _ = naive_scores(q, k, scale=0.2, **{x: v for x, v in kw.items()})
    p = naive_probs(s)
    torch.testing.assert_close(scores.double(), s[:, :, 6:12, 2:lk], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.double(), p[:, :, 6:12, 2:lk], rtol=1e-5, atol=1e-7)


def test_score_window_out_of_range():
    q, k = _qk()
    with pytest.raises(IndexError, match="outside"):
        score_window(q, k, 1.0, (0, 19), (0, 4))


def test_bf16_inputs_are_upcast_not_rounded():
    q, k = _qk(lk=9)
    qb, kb = q.bfloat16(), k.bfloat16()
    got = cross_attention_probs(qb, kb, [1, 2], scale=0.25)
    s, _ = naive_scores(qb.double(), kb.double(), scale=0.25)
    torch.testing.assert_close(got.double(), naive_probs(s)[..., [1, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,queries,keys,budget", [(6, 100, 50, 1 << 30), (6, 100, 50, 12 * 50 * 40),
                                                      (6, 100, 50, 12 * 50 * 3), (6, 100, 50, 1)])
def test_chunk_plan_stays_within_budget(rows, queries, keys, budget):
    rc, qc = plan_chunks(rows, queries, keys, budget)
    assert 1 <= rc <= rows and 1 <= qc <= queries
    assert rc * qc * keys * 12 <= max(budget, keys * 12)


def test_split_heads_layout():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 2)
    assert torch.equal(h[1, 2, 4], x[1, 4, 4:6])
