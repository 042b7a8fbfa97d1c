"""Causal Wan with a KV cache, end to end: ``record(model, plan)`` on Self-Forcing's own ``CausalWanModel`` and on the
project's tiny causal model, driven through the chunked inference loop (sink frame, local window, eviction).

Every statistic is compared with a float64 recomputation from q/k captured independently (spies on the model's own
attention functions, underneath the recorder's taps); the absolute key frames and the KV-cache log are compared with
the eviction policy worked out by hand; outputs are compared bit for bit with an unrecorded run.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from reference import naive_probs, naive_scores, naive_sink
from self_forcing import SF_NOT_FOUND, self_forcing_modules, self_forcing_path
from wan_capture import AttentionAnalyzer, FrameWindow, RecordingPlan, SaveOptions, record, save_take
from devtools import tiny_causal
from wan_capture.adapters.official import sdpa_attention
from devtools.tiny_causal import causal_generate
from wan_capture.recording import FolderRecording, MemoryRecording
from wan_capture.views.maps import frame_mass_images, sink_maps

FRAMES, CHUNK, CACHE, SINK = 10, 2, 5, 1  # latent frames, frames per chunk, cache frames, sink frames
H = W = 4  # latent 4x4 -> 2x2 tokens per frame
FT = (H // 2) * (W // 2)
TIMESTEPS = (1000.0, 750.0, 500.0)
PASSES = len(TIMESTEPS) + 1  # the denoising steps, then the context pass
POSITIONS = (0, 7, 300)


def expected_cache(chunk: int):
    """Absolute frames a chunk starting at ``chunk`` attends to under Self-Forcing's policy, worked out by hand:
    every earlier frame while they fit, else the sink frames and the most recent ones; the chunk last."""
    room = CACHE - CHUNK
    past = list(range(chunk)) if chunk <= room else list(range(SINK)) + list(range(chunk - (room - SINK), chunk))
    return past + list(range(chunk, chunk + CHUNK))


def plan():
    return RecordingPlan(text_positions=POSITIONS, record_sink_stats=True, storage_dtype="float32",
                         window=FrameWindow(7, 8), store_per_head=True)


def spy(calls, kind, fn):
    def wrapped(q, k, v, *args, **kwargs):
        calls.append((kind, q.clone(), k.clone()))
        return fn(q, k, v, *args, **kwargs)
    return wrapped


def bsnd(x):
    """[B, L, N, D] -> [B, N, L, D] float64, cast to bf16 first as Wan's attention functions run it."""
    x = x if x.dtype in (torch.bfloat16, torch.float16) else x.bfloat16()
    return x.transpose(1, 2).double()


def check_recording(take, calls, chunks):
    """Every chunk's statistics against float64 from the spied q/k, and the key frames against the policy."""
    assert take.status == "complete", take.error
    assert sorted(take.chunks) == chunks and take.steps == list(range(PASSES))
    assert take.step_pass == {**{s: "denoise" for s in range(len(TIMESTEPS))}, len(TIMESTEPS): "context"}
    assert take.grid.as_list() == [FRAMES, H // 2, W // 2]
    order = [(c, p, b, kind) for c in chunks for p in range(PASSES) for b in range(2) for kind in ("self", "cross")]
    assert len(calls) == len(order)
    for (c, p, b, kind), (spied_kind, q, k) in zip(order, calls):
        assert spied_kind == kind
        part = take.chunks[c]
        qd, kd = bsnd(q), bsnd(k)
        if kind == "cross":
            want = naive_probs(naive_scores(qd, kd)[0])[..., list(POSITIONS)]
            torch.testing.assert_close(part.cross[(p, "cond")][:, b].double(), want, rtol=1e-4, atol=1e-6)
            continue
        frames = expected_cache(c)
        assert k.shape[1] == len(frames) * FT and part.key_frames[(p, b)] == tuple(frames)
        received, key_max, mass, ent, _ = naive_sink(qd, kd, FT, q_offset=kd.shape[2] - qd.shape[2])
        got = take.chunks[c].sink[(p, "cond")]
        torch.testing.assert_close(got["received"][:, b].double(), received, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["key_max"][:, b].double(), key_max, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["frame_mass"][:, b].double(), mass, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["entropy"][:, b].double(), ent, rtol=1e-4, atol=1e-4)
        if c <= 7 < c + CHUNK:  # the window: query frame 7 against every cached key, sinks included
            win = part.windows[(p, b, "cond")]
            row = (7 - c) * FT
            scores, _ = naive_scores(qd, kd)
            assert win["q_frames"] == [7] and win["k_frames"] == frames
            torch.testing.assert_close(win["scores"].double(), scores[:, :, row:row + FT], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(win["probs"].double(), naive_probs(scores)[:, :, row:row + FT],
                                       rtol=1e-4, atol=1e-6)
    # the chunks' cross maps assembled along time are the whole video's token maps
    for p in range(PASSES):
        whole = torch.cat([take.chunks[c].cross[(p, "cond")] for c in chunks], dim=3)
        assert torch.equal(take.cross[(p, "cond")], whole)


def check_event_log(take, chunks):
    events = take.kv_events
    assert len(events) == len(chunks) * PASSES * 2
    for e in events:
        c = e["chunk"]
        frames = expected_cache(c)
        assert e["key_frames"] == frames and e["unknown_key_frames"] == 0 and "anomaly" not in e
        past = [f for f in frames if f < c]
        assert e["sink_frames"] == past[:SINK]
        # every cached frame of an earlier chunk was written by that chunk's clean-context pass
        assert e["writers"][:len(past)] == ["context"] * len(past)
        assert e["writers"][len(past):] == ["context" if e["pass"] == "context" else f"step {e['step']}"] * CHUNK
        before = expected_cache(c - CHUNK) if c and e["step"] == 0 else frames
        assert e["evicted"] == sorted(set(before) - set(frames))
    assert sorted({f for e in events for f in e["evicted"]}) == [1, 2, 3, 4, 5]


def run_tiny(monkeypatch, buggy=False):
    torch.manual_seed(0)
    model = tiny_causal.CausalWanModel(dim=256, num_heads=2, num_layers=2, local_attn_size=CACHE, sink_size=SINK,
                                       frame_tokens=FT, buggy_eviction=buggy).eval()
    noise, ctx = torch.randn(1, 16, FRAMES, H, W), torch.randn(1, 20, 4096)
    go = lambda: causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE)  # noqa: E731
    plain = go()
    calls = []
    monkeypatch.setattr(tiny_causal, "attention", spy(calls, "self", tiny_causal.attention))
    monkeypatch.setattr(tiny_causal, "flash_attention", spy(calls, "cross", tiny_causal.flash_attention))
    originals = tiny_causal.attention, tiny_causal.flash_attention
    with record(model, plan()) as rec:
        out = go()
    assert (tiny_causal.attention, tiny_causal.flash_attention) == originals
    assert not model._forward_pre_hooks and not model.blocks[0].self_attn._forward_pre_hooks
    return model, rec.latest, calls, plain, out


def test_causal_tiny_model_records_exactly_bit_identical_with_event_log(monkeypatch):
    _, take, calls, plain, out = run_tiny(monkeypatch)
    assert torch.equal(out, plain), "recording changed the output"
    chunks = list(range(0, FRAMES, CHUNK))
    check_recording(take, calls, chunks)
    check_event_log(take, chunks)


def test_causal_event_log_exposes_a_cache_that_evicts_the_newest_frames(monkeypatch):
    """The bug class a related project had: the cache overwrites its newest frames instead of the oldest."""
    _, take, _, _, _ = run_tiny(monkeypatch, buggy=True)
    first = [e for e in take.kv_events if e["chunk"] == 4 and e["step"] == 0 and e["block"] == 0][0]
    assert expected_cache(4) == [0, 2, 3, 4, 5]  # the right policy evicts frame 1, the oldest
    assert first["evicted"] == [3] and first["key_frames"] == [0, 1, 2, 4, 5]


def test_causal_take_saved_read_and_drawn(monkeypatch, tmp_path):
    _, take, _, _, _ = run_tiny(monkeypatch)
    videos = save_take(take, str(tmp_path), "causal", SaveOptions(storage_dtype="float32"))
    assert videos[0].status == "complete"
    maps = str(tmp_path / "causal" / "attention_maps")
    an = AttentionAnalyzer(maps)
    v = an.list_videos()[0]
    summary = an.summary(v)
    assert an.is_causal(v) and an.list_chunks(v) == list(range(0, FRAMES, CHUNK))
    assert summary["causal"]["step_pass"][str(PASSES - 1)] == "context" and summary["latent_grid"] == [FRAMES, 2, 2]
    assert an.load_kv_cache_events(v) == json.loads(json.dumps(take.kv_events)) and an.sink_frames(v) == [0]
    # token maps: the contract's layout over the whole video, equal to the take's chunks side by side
    for p in range(PASSES):
        np.testing.assert_array_equal(an.load_step(v, "pos007", p), take.cross[(p, "cond")][0][..., 1:2].numpy())
        assert an.load_metadata(v, "pos007", p)["pass"] == ("context" if p == PASSES - 1 else "denoise")
    # per-chunk statistics read back exactly, with their absolute key frames
    for c in an.list_chunks(v):
        meta = an.load_chunk_metadata(v, 1, c)
        assert meta["key_frames"] == expected_cache(c) and meta["query_frames"] == [c, c + 1]
        np.testing.assert_array_equal(an.load_chunk_self_attention(v, 1, c, "received"),
                                      take.chunks[c].sink[(1, "cond")]["received"][0].numpy())
    win = an.load_chunk_window(v, 0, 1, 6)
    assert win["metadata"]["q_frames"] == [7] and win["metadata"]["k_frames"] == expected_cache(6)
    # the whole-video causal matrix and received attention per absolute key, built here by hand from the chunks
    step = 2
    mass = an.get_causal_self_attention(v, step, "frame_mass")
    received = an.get_causal_self_attention(v, step, "received").reshape(2, 2, FRAMES, FT)
    want_mass = np.zeros((2, 2, FRAMES, FRAMES))
    recv_lists = {f: [] for f in range(FRAMES)}
    for c in range(0, FRAMES, CHUNK):
        st = take.chunks[c].sink[(step, "cond")]
        for j, f in enumerate(expected_cache(c)):
            for i in range(CHUNK):
                want_mass[:, :, c + i, f] = st["frame_mass"][0, :, :, i, j].numpy()
            recv_lists[f].append(st["received"][0, :, :, j * FT:(j + 1) * FT].numpy())
    np.testing.assert_allclose(mass, want_mass, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-4)
    assert mass[..., 6, 1].max() == 0.0 and mass[..., 6, 0].min() > 0  # frame 1 evicted, the sink kept
    for f, parts in recv_lists.items():
        np.testing.assert_allclose(received[:, :, f], np.mean(parts, axis=0), rtol=1e-5, atol=1e-8)
    # live and saved answer the same way; the pictures come from them
    live, saved = MemoryRecording(take), FolderRecording.open(maps, v)
    for name in ("frame_mass", "received", "key_max", "entropy"):
        np.testing.assert_allclose(live.sink(step, name), saved.sink(step, name), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(sink_maps(saved, [step])[0], received.mean(axis=(0, 1)).reshape(FRAMES, 2, 2),
                               rtol=1e-5)
    img = frame_mass_images(mass[0], [0, 1], False, "gray", "t", saved.sink_frames)[0]
    assert img.ndim == 3 and img.shape[2] == 3
    w = saved.window(0, 1)
    assert w["k_frames"] == expected_cache(6)


def test_causal_demo_runs_under_a_minute(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "SELF_FORCING_PATH"}
    r = subprocess.run([sys.executable, "-m", "wan_capture", "causal-demo", "--out", str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    pics = [line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("picture: ")]
    assert len(pics) == 4 and all(os.path.getsize(p) > 0 for p in pics)
    from PIL import Image
    img = np.asarray(Image.open([p for p in pics if p.endswith("causal_frame_mass.png")][0]).convert("RGB"))
    assert img.shape[0] > 100 and img.std() > 10  # a drawn matrix, not a blank image
    assert "sink frames [0]" in r.stdout and "status complete" in r.stdout


# -- Self-Forcing's own code ----------------------------------------------------------------------------------
needs_self_forcing = pytest.mark.skipif(self_forcing_path() is None, reason=SF_NOT_FOUND)


@pytest.fixture
def self_forcing():
    with self_forcing_modules() as mods:
        yield mods


def build_self_forcing(cm):
    torch.manual_seed(0)
    return cm.CausalWanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=512,
                             freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2,
                             local_attn_size=CACHE, sink_size=SINK).eval().to(torch.bfloat16)


@needs_self_forcing
def test_self_forcing_causal_model_records_exactly_bit_identical_with_event_log(self_forcing, monkeypatch):
    cm, wm = self_forcing
    model = build_self_forcing(cm)
    noise, ctx = torch.randn(1, 16, FRAMES, H, W).bfloat16(), torch.randn(1, 20, 4096).bfloat16()
    go = lambda: causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE)  # noqa: E731
    monkeypatch.setattr(wm, "flash_attention", sdpa_attention)  # no flash-attn here: its cross-attention needs one
    plain = go()
    calls = []
    monkeypatch.setattr(cm, "attention", spy(calls, "self", cm.attention))
    monkeypatch.setattr(wm, "flash_attention", spy(calls, "cross", sdpa_attention))
    originals = cm.attention, wm.flash_attention
    with record(model, plan()) as rec:
        out = go()
    assert (cm.attention, wm.flash_attention) == originals, "the model's functions were not restored"
    assert not model._forward_pre_hooks and not model.blocks[1].cross_attn._forward_pre_hooks
    assert torch.equal(out, plain), "recording changed Self-Forcing's output"
    take = rec.latest
    assert take.model["diffusion_model"] == "CausalWanModel" and take.model["variant"] == "causal"
    chunks = list(range(0, FRAMES, CHUNK))
    check_recording(take, calls, chunks)
    check_event_log(take, chunks)


@needs_self_forcing
def test_self_forcing_restored_after_an_exception(self_forcing, monkeypatch):
    cm, wm = self_forcing
    model = build_self_forcing(cm)
    monkeypatch.setattr(wm, "flash_attention", sdpa_attention)
    originals = cm.attention, wm.flash_attention
    noise, ctx = torch.randn(1, 16, 4, H, W).bfloat16(), torch.randn(1, 5, 4096).bfloat16()
    with pytest.raises(RuntimeError, match="stop"):
        with record(model, plan()) as rec:
            causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE)
            raise RuntimeError("stop")
    assert (cm.attention, wm.flash_attention) == originals
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not b.self_attn._forward_pre_hooks and not b.cross_attn._forward_hooks for b in model.blocks)
    assert rec.latest.status == "partial" and "stop" in rec.latest.error and sorted(rec.latest.chunks) == [0, 2]


@needs_self_forcing
def test_self_forcing_demo_saves_and_draws(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "wan_capture", "causal-demo", "--out", str(tmp_path),
                        "--self-forcing", self_forcing_path()], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Self-Forcing's CausalWanModel" in r.stdout and "status complete" in r.stdout
    an = AttentionAnalyzer(str(tmp_path / "causal_demo" / "attention_maps"))
    v = an.list_videos()[0]
    mass = an.get_causal_self_attention(v, 0, "frame_mass")
    np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-3)


def test_causal_plan_fields_apply_budget_aggregation_and_downsampling(monkeypatch):
    """Every plan field goes through the same take: block/head aggregation, spatial pooling, and the memory budget
    (refused with the size it needs; the model is restored and the take marked partial)."""
    from wan_capture import BudgetError
    torch.manual_seed(0)
    model = tiny_causal.CausalWanModel(dim=256, num_heads=2, num_layers=2, local_attn_size=CACHE, sink_size=SINK,
                                       frame_tokens=16).eval()
    noise, ctx = torch.randn(1, 16, 4, 8, 8), torch.randn(1, 6, 4096)
    full = RecordingPlan(text_positions=(1,), record_sink_stats=True, storage_dtype="float32", store_per_head=True)
    small = RecordingPlan(text_positions=(1,), record_sink_stats=True, storage_dtype="float32",
                          store_per_block=False, store_per_head=False, spatial_downsample_factor=2)
    takes = []
    for p in (full, small):
        with record(model, p) as rec:
            causal_generate(model, noise, ctx, 2, TIMESTEPS, cache_frames=CACHE)
        takes.append(rec.latest)
    a, b = takes
    assert b.map_grid.as_list() == [4, 2, 2] and b.cross[(0, "cond")].shape == (1, 1, 1, 16, 1)
    pooled = a.cross[(0, "cond")].mean(dim=(1, 2)).view(1, 4, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(1, 16)
    torch.testing.assert_close(b.cross[(0, "cond")][0, 0, 0, :, 0], pooled[0], rtol=1e-5, atol=1e-7)
    for c in (0, 2):
        got, ref = b.chunks[c].sink[(1, "cond")], a.chunks[c].sink[(1, "cond")]
        torch.testing.assert_close(got["received"][:, 0, 0], ref["received"].mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["key_max"][:, 0, 0], ref["key_max"].amax(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    originals = tiny_causal.attention, tiny_causal.flash_attention
    with pytest.raises(BudgetError, match="memory_budget_mb"):
        with record(model, RecordingPlan(text_positions=(1,), record_sink_stats=True, memory_budget_mb=0.001, store_per_head=True)) as rec:
            causal_generate(model, noise, ctx, 2, TIMESTEPS, cache_frames=CACHE)
    assert (tiny_causal.attention, tiny_causal.flash_attention) == originals and rec.latest.status == "partial"


def test_causal_sink_flags_an_overwritten_sink_and_an_inert_one(monkeypatch):
    """A cache that rolls over its sink slots is flagged where it happens; a configured sink in a cache that never
    evicts (a global cache) is flagged as behaving like none."""
    torch.manual_seed(0)
    noise, ctx = torch.randn(1, 16, FRAMES, H, W), torch.randn(1, 20, 4096)
    flagged = {}
    for name, kw in (("over_sink", dict(local_attn_size=CACHE, buggy_eviction="over_sink")),
                     ("global", dict(local_attn_size=-1)), ("right", dict(local_attn_size=CACHE))):
        model = tiny_causal.CausalWanModel(dim=256, num_heads=2, num_layers=2, sink_size=SINK, frame_tokens=FT,
                                           **kw).eval()
        with record(model, plan()) as rec:
            causal_generate(model, noise, ctx, CHUNK, TIMESTEPS, cache_frames=CACHE if kw["local_attn_size"] > 0
                            else None)
        by_kind = {}
        for e in rec.latest.kv_events:
            for f in e.get("flags", ()):
                by_kind.setdefault(f.split(":")[0], set()).add(e["chunk"])
        flagged[name] = {kind: sorted(chunks) for kind, chunks in by_kind.items()}
    # the roll over the sink: the sink slot held frame 0, then another frame, from the first eviction on
    assert flagged["over_sink"]["sink overwritten"] and min(flagged["over_sink"]["sink overwritten"]) == 4
    assert set(flagged["global"]) == {"sink inert"} and flagged["global"]["sink inert"] == [2, 4, 6, 8]
    # the right policy: the sink is inert only until the first eviction (chunk 4 evicts frame 1), never overwritten
    assert set(flagged["right"]) == {"sink inert"} and flagged["right"]["sink inert"] == [2]
