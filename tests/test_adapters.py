"""Adapters outside ComfyUI: tiny random instances of the official WanModel and diffusers' WanTransformer3DModel,
and a causal KV-cache run chunk by chunk, all against an independent float64 recomputation."""
import importlib.util

import pytest
import torch

from reference import naive_probs, naive_scores, naive_sink
from wan_capture import CausalRecorder, RecordingPlan, record

HAVE_WAN = importlib.util.find_spec("wan") is not None
HAVE_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def official_module():
    """wan.modules.model without the packages' __init__ files (the official t5.py touches CUDA at import)."""
    from devtools.python_demo import official_wan
    return official_wan()


def heads(x):
    """[B, L, N, D] -> [B, N, L, D] float64"""
    return x.transpose(1, 2).double()


@pytest.mark.skipif(not HAVE_WAN, reason="the official Wan code (pip install --no-deps wan22) is not installed")
def test_official_wanmodel_records_exactly_and_is_restored(monkeypatch):
    wm = official_module()
    from wan_capture.adapters import official
    torch.manual_seed(0)
    model = wm.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=512,
                        freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2).eval()
    x, ctx = [torch.randn(16, 3, 8, 8)], [torch.randn(20, 4096)]
    calls = []
    real_sdpa = official.sdpa_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.clone(), k.clone()))
        return real_sdpa(q, k, v, *args, **kwargs)
    monkeypatch.setattr(official, "sdpa_attention", spy)
    original = wm.flash_attention
    plan = RecordingPlan(text_positions=(0, 7, 511), negative_positions=(0, 7, 511), record_sink_stats=True,
                         storage_dtype="float32", branch="both", store_per_head=True)
    outputs = []
    with record(model, plan) as rec:
        with torch.no_grad():
            for t in (999.0, 600.0):
                outputs += [model(x, t=torch.tensor([t]), context=ctx, seq_len=48)[0] for _ in range(2)]
    assert wm.flash_attention is original and not model._forward_pre_hooks and not model.blocks[0].self_attn._forward_hooks
    take = rec.latest
    assert take.status == "complete" and take.steps == [0, 1] and take.step_sigmas == {0: 0.999, 1: 0.6}
    assert take.grid.as_list() == [3, 4, 4] and take.text_len == 512
    # outputs equal a run through the plain fallback attention, without any recording
    monkeypatch.setattr(wm, "flash_attention", real_sdpa)
    with torch.no_grad():
        plain = model(x, t=torch.tensor([999.0]), context=ctx, seq_len=48)[0]
    assert torch.equal(outputs[0], plain)
    # 2 steps x 2 evaluations (cond, uncond) x 2 blocks x (self, cross)
    assert len(calls) == 16
    for i, (q, k) in enumerate(calls):
        step, branch, block, kind = i // 8, ("cond", "uncond")[(i // 4) % 2], (i // 2) % 2, ("self", "cross")[i % 2]
        qd, kd = heads(q.bfloat16()), heads(k.bfloat16())
        if kind == "cross":
            want = naive_probs(naive_scores(qd[:, :, :48], kd)[0])[..., [0, 7, 511]]
            torch.testing.assert_close(take.cross[(step, branch)][:, block].double(), want, rtol=1e-4, atol=1e-6)
        else:
            received, key_max, mass, ent, _ = naive_sink(qd[:, :, :48], kd[:, :, :48], 16)
            st = take.sink[(step, branch)]
            torch.testing.assert_close(st["received"][:, block].double(), received, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st["frame_mass"][:, block].double(), mass, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st["entropy"][:, block].double(), ent, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_WAN, reason="the official Wan code is not installed")
def test_official_model_restored_after_an_exception():
    wm = official_module()
    model = wm.WanModel(model_type="t2v", in_dim=16, dim=256, ffn_dim=512, text_dim=4096, out_dim=16, num_heads=2,
                        num_layers=1).eval()
    original = wm.flash_attention
    with pytest.raises(RuntimeError, match="boom"):
        with record(model, RecordingPlan(text_positions=(0,), store_per_head=True)) as rec:
            with torch.no_grad():
                model([torch.randn(16, 1, 4, 4)], t=torch.tensor([500.0]), context=[torch.randn(3, 4096)], seq_len=4)
            raise RuntimeError("boom")
    assert wm.flash_attention is original and not model._forward_pre_hooks and not model._forward_hooks
    assert all(not b.self_attn._forward_pre_hooks and not b.cross_attn._forward_hooks for b in model.blocks)
    assert rec.latest.status == "partial" and "boom" in rec.latest.error


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed")
def test_diffusers_wan_transformer_records_exactly_and_is_restored(monkeypatch):
    import diffusers.models.transformers.transformer_wan as tw
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2).eval()
    hs, ctx = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 20, 4096)
    with torch.no_grad():
        plain = model(hs, torch.tensor([999.0]), ctx, return_dict=False)[0]
    calls = []
    real = tw.dispatch_attention_fn

    def spy(query, key, value, *args, **kwargs):
        calls.append((query.clone(), key.clone()))
        return real(query, key, value, *args, **kwargs)
    monkeypatch.setattr(tw, "dispatch_attention_fn", spy)
    processors = dict(model.attn_processors)
    with record(model, RecordingPlan(text_positions=(1, 19), record_sink_stats=True, storage_dtype="float32", store_per_head=True)) as rec:
        with torch.no_grad():
            out = model(hs, torch.tensor([999.0]), ctx, return_dict=False)[0]
    assert torch.equal(out, plain), "recording changed the output"
    assert tw.dispatch_attention_fn is spy and all(model.attn_processors[n] is p for n, p in processors.items())
    take = rec.latest
    assert take.steps == [0] and take.text_len == 20 and take.grid.as_list() == [3, 4, 4]
    for i, (q, k) in enumerate(calls):
        block, kind = i // 2, ("self", "cross")[i % 2]
        if kind == "cross":
            want = naive_probs(naive_scores(heads(q), heads(k))[0])[..., [1, 19]]
            torch.testing.assert_close(take.cross[(0, "cond")][:, block].double(), want, rtol=1e-4, atol=1e-6)
        else:
            received, key_max, mass, ent, _ = naive_sink(heads(q), heads(k), 16)
            torch.testing.assert_close(take.sink[(0, "cond")]["received"][:, block].double(), received, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(take.sink[(0, "cond")]["key_max"][:, block].double(), key_max, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAVE_DIFFUSERS, reason="diffusers is not installed")
def test_diffusers_restored_after_an_exception():
    import diffusers.models.transformers.transformer_wan as tw
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=1).eval()
    processors, dispatch = dict(model.attn_processors), tw.dispatch_attention_fn
    with pytest.raises(KeyboardInterrupt):
        with record(model, RecordingPlan(text_positions=(0,), store_per_head=True)):
            raise KeyboardInterrupt
    assert tw.dispatch_attention_fn is dispatch and all(model.attn_processors[n] is p for n, p in processors.items())
    assert not model._forward_pre_hooks


def test_record_refuses_other_models():
    with pytest.raises(TypeError, match="supports the official Wan code's WanModel, diffusers' WanTransformer3DModel"):
        with record(torch.nn.Linear(2, 2), RecordingPlan(text_positions=(0,), store_per_head=True)):
            pass


@pytest.mark.parametrize("mask", [None, "frame"])
def test_causal_kv_cache_chunk_by_chunk(mask):
    """CausalRecorder (taps by hand) goes through the same tracker and take: 6 latent frames of 8 tokens in chunks
    of 2 frames; the cache keeps 1 sink frame and a 2-frame window."""
    ft, frames, chunk, sink, window = 8, 6, 2, 1, 2
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, frames * ft, 2, 16, generator=g) * 2  # every frame's keys, as the model computes them
    rec = CausalRecorder(RecordingPlan(record_cross=False, record_sink_stats=True, storage_dtype="float32",
                                       store_per_head=True), ft, frame_width=4)
    seen = {}
    with rec.recording(num_blocks=4, num_heads=2, head_dim=16):
        for c0 in range(0, frames, chunk):
            current = list(range(c0, c0 + chunk))
            past = [f for f in range(c0) if f < sink or f >= c0 - window]
            cached = past + current
            k = torch.cat([keys[:, f * ft:(f + 1) * ft] for f in cached], dim=1)
            q = torch.randn(1, chunk * ft, 2, 16, generator=g) * 2
            out = rec.tap(3, q, k, lambda: torch.zeros(1), query_start=c0 * ft, key_frames=cached, step=0, mask=mask)
            assert torch.equal(out, torch.zeros(1))
            seen[c0] = (q, k, cached)
    take = rec.take
    assert take.status == "complete" and sorted(take.chunks) == [0, 2, 4] and take.grid.as_list() == [6, 2, 4]
    for c0, (q, k, cached) in seen.items():
        part = take.chunks[c0]
        assert part.key_frames[(0, 3)] == tuple(cached)
        got = {n: v[:, 0] for n, v in part.sink[(0, "cond")].items()}  # the one recorded block
        layout = dict(q_offset=k.shape[1] - q.shape[1], causal=mask) if mask else dict(q_offset=k.shape[1] - q.shape[1])
        received, key_max, mass, ent, _ = naive_sink(heads(q), heads(k), ft, **layout)
        torch.testing.assert_close(got["received"].double(), received, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["key_max"].double(), key_max, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["frame_mass"].double(), mass, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["entropy"].double(), ent, rtol=1e-4, atol=1e-5)
        if mask == "frame":  # the first query frame of the chunk cannot see the second
            assert float(got["frame_mass"][0, :, 0, -1].abs().max()) == 0.0
    with pytest.raises(ValueError, match="whole frames"):
        with rec.recording(num_blocks=1, num_heads=2, head_dim=16):
            rec.tap(0, torch.zeros(1, 5, 2, 16), torch.zeros(1, 16, 2, 16), lambda: None, query_start=0,
                    key_frames=[0, 1])
