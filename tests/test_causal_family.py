"""The causal Wan family through ``record()``, each project's own model code unchanged: CausVid, Causal-Forcing (its
Self-Forcing layout ``wan/`` and its rolling layout ``long_video/wan/``), LongLive (sinks, a pinned chunk, CFG on a
positive and a negative cache, absolute and relative RoPE) and Rolling Forcing (an anchor block re-roped on every
call), driven through each project's KV-cache loop (:mod:`devtools.causal_loops`).

Independent of the recorder, spies under its taps capture every q and k the model's attention receives and every
call of the model's RoPE function. From them:

* every statistic and cross map equals a float64 recomputation from the spied q/k;
* every key frame the log names is checked by content: the spied keys of that slot equal the project's own RoPE of
  the frame's un-rotated keys (as its writer computed them) at the position the log gives. That is the cache the
  project really kept, frame by frame, with the position RoPE really gave it;
* outputs are bit-identical with and without recording.
"""
import os

import numpy as np
import pytest
import torch

from causal_projects import modules, needs, tiny
from devtools.causal_loops import causvid_generate, longlive_generate, rolling_generate
from devtools.tiny_causal import causal_generate
from reference import naive_probs, naive_scores, naive_sink
from wan_capture import AttentionAnalyzer, MemoryRecording, RecordingPlan, SaveOptions, record, save_take
from wan_capture.recording import FolderRecording
from wan_capture.views.sink_report import sink_table, write_sink_report

H = W = 4  # latent 4x4 -> 2x2 tokens per frame
FT = 4
POSITIONS = (0, 5, 300)
TIMESTEPS = (1000.0, 750.0, 500.0)


def plan():
    return RecordingPlan(text_positions=POSITIONS, negative_positions=POSITIONS, record_sink_stats=True,
                         storage_dtype="float32", store_per_head=True, branch="both")


class Spies:
    """What the model's own functions received, in call order."""

    def __init__(self, cm, wm, monkeypatch):
        self.calls, self.ropes = [], []
        attention, flash, rope = cm.attention, wm.flash_attention, cm.causal_rope_apply

        def spy_attention(q, k, v, *a, **kw):
            self.calls.append(("self", q.clone(), k.clone(), self.ropes))
            self.ropes = []
            return attention(q, k, v, *a, **kw)

        def spy_flash(q, k, v, *a, **kw):
            self.calls.append(("cross", q.clone(), k.clone(), None))
            return flash(q, k, v, *a, **kw)

        def spy_rope(x, grid_sizes, freqs, start_frame=0, *a, **kw):
            out = rope(x, grid_sizes, freqs, start_frame, *a, **kw)
            self.ropes.append((x.clone(), out.clone(), int(start_frame)))
            return out

        self.rope = rope
        monkeypatch.setattr(cm, "attention", spy_attention)
        monkeypatch.setattr(wm, "flash_attention", spy_flash)
        monkeypatch.setattr(cm, "causal_rope_apply", spy_rope)


def bsnd(x):
    x = x if x.dtype in (torch.bfloat16, torch.float16) else x.bfloat16()
    return x.transpose(1, 2).double()


def frames_of(x):
    """[1, L, n, d] -> list of [FT, n, d] frames."""
    return list(x[0].split(FT))


def run(model, go, spies_factory):
    plain = go()
    spies = spies_factory()
    with record(model, plan()) as rec:
        out = go()
    assert torch.equal(out, plain), "recording changed the project's output"
    assert len(rec.takes) == 1
    take = rec.latest
    assert take.status == "complete", take.error
    return take, spies


def check(take, spies, model, rope_kwargs=None) -> int:
    """Every statistic against float64 from the spied q/k; every logged key frame against its content. Returns how
    many (call, chunk) pairs were checked."""
    by_call = {}
    for e in take.kv_events:
        by_call.setdefault(e["call"], []).append(e)
    self_calls = [c for c in spies.calls if c[0] == "self"]
    cross_calls = [c for c in spies.calls if c[0] == "cross"]
    assert len(self_calls) == len(cross_calls) == len(by_call) and sorted(by_call) == list(range(len(by_call)))
    raw = {}  # (block, branch) -> absolute frame -> its un-rotated keys as its writer computed them
    checked, seen = 0, set()
    for i, ((_, q, k, ropes), (_, cq, ck, _)) in enumerate(zip(self_calls, cross_calls)):
        parts = by_call[i]
        first = parts[0]
        block, branch, kf, rf = first["block"], first["branch"], first["key_frames"], first["rope_frames"]
        assert all((p["block"], p["branch"], p["key_frames"], p["rope_frames"]) == (block, branch, kf, rf)
                   for p in parts)
        assert k.shape[1] == len(kf) * FT and first["unknown_key_frames"] == 0 and "anomaly" not in first
        n_new = q.shape[1] // FT
        assert sum(len(p["query_frames"]) for p in parts) == n_new
        assert first["reasons"][len(kf) - n_new:] == ["current"] * n_new
        assert kf[len(kf) - n_new:] == [f for p in parts for f in p["query_frames"]]
        # the call's own frames: their un-rotated keys are the input of the RoPE call that produced them
        slot = raw.setdefault((block, branch), {})
        for j, frame in enumerate(frames_of(k)[len(kf) - n_new:]):
            slot[kf[len(kf) - n_new + j]] = _unrotated(frame, ropes)
        # every key frame is what the log says: the project's RoPE of that frame's keys at the logged position
        for j, frame in enumerate(frames_of(k)):
            again = _rope(spies.rope, model, slot[kf[j]], rf[j], rope_kwargs)
            assert torch.equal(again, frame), f"call {i} key frame {j}: not frame {kf[j]} at position {rf[j]}"
        qd, kd, cqd, ckd = bsnd(q), bsnd(k), bsnd(cq), bsnd(ck)
        for p in parts:
            if (p["chunk"], p["step"], branch, block) in seen:
                # evaluated again at the same timestep (Rolling Forcing refills its first block once per window
                # while the window grows): every call is in the log, the statistics are the first call's
                continue
            seen.add((p["chunk"], p["step"], branch, block))
            lo = (p["query_frames"][0] - parts[0]["query_frames"][0]) * FT
            rows = slice(lo, lo + len(p["query_frames"]) * FT)
            chunk = take.chunks[p["chunk"]]
            received, key_max, mass, ent, _ = naive_sink(qd[:, :, rows], kd, FT,
                                                         q_offset=kd.shape[2] - qd.shape[2] + lo)
            got = chunk.sink[(p["step"], branch)]
            torch.testing.assert_close(got["received"][:, block].double(), received, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["key_max"][:, block].double(), key_max, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got["frame_mass"][:, block].double(), mass, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["entropy"][:, block].double(), ent, rtol=1e-4, atol=1e-4)
            assert chunk.key_frames[(p["step"], block)] == tuple(kf)
            want = naive_probs(naive_scores(cqd[:, :, rows], ckd)[0])[..., list(POSITIONS)]
            if cq.shape[0] != q.shape[0]:  # a pass given every prompt block at once: its cross-attention is not
                assert (p["step"], branch) not in chunk.cross  # recorded (the take says so), never half-recorded
            else:
                torch.testing.assert_close(chunk.cross[(p["step"], branch)][:, block].double(), want, rtol=1e-4,
                                           atol=1e-6)
            checked += 1
    return checked


def _unrotated(frame, ropes):
    for x, out, _ in ropes:
        for a, b in zip(frames_of(x), frames_of(out)):
            if torch.equal(b, frame):
                return a
    return frame  # no RoPE call produced it: the model attends to it as computed


def _rope(rope, model, frame, position, rope_kwargs):
    if position < 0:
        return frame
    grid = torch.tensor([[1, H // 2, W // 2]])
    return rope(frame[None], grid, model.freqs, position, **(rope_kwargs or {}))[0].type_as(frame)


def _noise(frames):
    torch.manual_seed(1)
    return torch.randn(1, 16, frames, H, W).bfloat16(), torch.randn(1, 20, 4096).bfloat16()


# -- CausVid -----------------------------------------------------------------------------------------------------
@needs("causvid")
def test_causvid_records_exactly_bit_identical_with_the_cache_it_kept(monkeypatch):
    with modules("causvid", monkeypatch) as (cm, wm):
        model = tiny(cm)  # CausVid's self-attention has no sink or window settings: a cache of every frame
        noise, ctx = _noise(6)
        take, spies = run(model, lambda: causvid_generate(model, noise, ctx, 2, TIMESTEPS),
                          lambda: Spies(cm, wm, monkeypatch))
        assert check(take, spies, model) == 3 * (len(TIMESTEPS) + 1) * 2
    assert take.kv_design["design"] == "global cache" and take.model["variant"] == "causal"
    for e in take.kv_events:
        assert e["key_frames"] == list(range(e["chunk"] + 2)) == e["rope_frames"] and not e["sink_frames"]
        assert e["evicted"] == [] and "flags" not in e
    assert take.step_pass == {0: "denoise", 1: "denoise", 2: "denoise", 3: "context"}


@needs("causvid")
def test_causvid_with_sink_size_refusal_names_the_failing_rule(monkeypatch):
    """CausVid's self-attention given a ``sink_size`` (which its code never reads) fits no design: the refusal names,
    per design, the rule that failed, CausVid's first (it breaks one rule), and nothing runs."""
    with modules("causvid", monkeypatch) as (cm, wm):
        model = tiny(cm)
        for block in model.blocks:
            block.self_attn.sink_size = 1
        calls = []
        monkeypatch.setattr(cm, "attention", lambda *a, **k: calls.append(1))
        with pytest.raises(TypeError) as err:
            with record(model, plan()):
                pass
    msg = str(err.value)
    assert "matches no known KV-cache design: not CausVid" in msg
    assert "(global cache): the module has ['sink_size'], which this design's code never sets" in msg
    assert "not Self-Forcing (wan/), Causal-Forcing (wan/) (sink and rolling window): forward lacks " \
           "['cache_start'], the module lacks the attributes ['local_attn_size']" in msg
    assert not calls


# -- Causal-Forcing -------------------------------------------------------------------------------------------------
CACHE, SINK = 5, 1


def sink_and_window(chunk, chunk_frames):
    """Self-Forcing's policy (Causal-Forcing keeps it): every earlier frame while they fit, else the sink frames
    and the most recent ones; the chunk last."""
    room = CACHE - chunk_frames
    past = list(range(chunk)) if chunk <= room else list(range(SINK)) + list(range(chunk - (room - SINK), chunk))
    return past + list(range(chunk, chunk + chunk_frames))


@needs("causal-forcing")
def test_causal_forcing_framewise_records_exactly_bit_identical(monkeypatch):
    """Causal-Forcing's ``wan/``: Self-Forcing's design, frame-wise (one latent frame per chunk)."""
    with modules("causal-forcing", monkeypatch) as (cm, wm):
        model = tiny(cm, local_attn_size=CACHE, sink_size=SINK)
        noise, ctx = _noise(8)
        take, spies = run(model, lambda: causal_generate(model, noise, ctx, 1, TIMESTEPS, cache_frames=CACHE),
                          lambda: Spies(cm, wm, monkeypatch))
        assert check(take, spies, model) == 8 * (len(TIMESTEPS) + 1) * 2
    assert take.kv_design["design"] == "sink and rolling window"
    for e in take.kv_events:
        assert e["key_frames"] == sink_and_window(e["chunk"], 1) == e["rope_frames"]
        assert e["sink_frames"] == ([0] if e["chunk"] else [])
    assert {f for e in take.kv_events for f in e["evicted"]} == {1, 2, 3}
    # the sink matters only once something was evicted: before, it is flagged as an ordinary cached frame
    inert = [e["chunk"] for e in take.kv_events if any("sink inert" in f for f in e.get("flags", ()))]
    assert inert and max(inert) < 5 and all(e["chunk"] >= 5 for e in take.kv_events if e["evicted"])


def rolling_model(cm):
    model = tiny(cm)
    for block in model.blocks:  # the projects write 1560 tokens per frame and 21 frames into these attributes
        attn = block.self_attn
        attn.frame_length, attn.block_length, attn.max_attention_size = FT, 3 * FT, 15 * FT
    model.num_frame_per_block = 3
    return model


def check_rolling(take):
    assert take.kv_design["design"] == "rolling anchor"
    assert set(take.step_pass.values()) == {"denoise", "context"}
    assert sorted(take.chunks) == list(range(0, 18, 3))
    # windows past the first block read the cache: the anchor block is kept as the sink and re-roped just before
    # the working cache (Rolling Forcing's rope_start_frame = window start - working cache frames - 3)
    anchors = [e for e in take.kv_events if e["call_start"] >= 3 and e["pass"] == "denoise"]
    for e in anchors:
        working = e["key_frames"].index(e["call_start"]) - 3
        assert e["key_frames"][:3] == [0, 1, 2] == e["sink_frames"] and e["reasons"][:3] == ["sink"] * 3
        assert e["rope_frames"][:3] == [e["call_start"] - working - 3 + i for i in range(3)]
    assert any(e["rope_frames"][:3] != [0, 1, 2] for e in anchors), "no call re-roped the anchor"
    assert {f for e in take.kv_events for f in e["evicted"]} >= {3, 4, 5}
    assert not any("sink overwritten" in f for e in take.kv_events for f in e.get("flags", ()))


def _rolling(project, monkeypatch):
    with modules(project, monkeypatch) as (cm, wm):
        model = rolling_model(cm)
        noise, ctx = _noise(18)
        take, spies = run(model, lambda: rolling_generate(model, noise, ctx, 3, TIMESTEPS, cache_frames=12),
                          lambda: Spies(cm, wm, monkeypatch))
        # 8 windows of up to 3 blocks, each block its own chunk, and one refill per block; 2 blocks each
        assert check(take, spies, model) == (1 + 2 + 3 + 3 + 3 + 3 + 2 + 1 + 6) * 2
    for e in take.kv_events:
        e["call_start"] = min(f for f, r in zip(e["key_frames"], e["reasons"]) if r == "current")
    check_rolling(take)
    return take


@needs("causal-forcing-long")
def test_causal_forcing_long_video_records_exactly_with_the_re_roped_anchor(monkeypatch):
    """Causal-Forcing's ``long_video/wan/``: Rolling Forcing's design."""
    _rolling("causal-forcing-long", monkeypatch)


# -- Rolling Forcing ------------------------------------------------------------------------------------------------
@needs("rolling-forcing")
def test_rolling_forcing_records_exactly_with_the_re_roped_anchor(monkeypatch, tmp_path):
    take = _rolling("rolling-forcing", monkeypatch)
    # saved and read back: the log, the chunks, the sink report with the anchor as the sink
    for e in take.kv_events:
        del e["call_start"]
    save_take(take, str(tmp_path), "rolling", SaveOptions(storage_dtype="float32"))
    maps = str(tmp_path / "rolling" / "attention_maps")
    an = AttentionAnalyzer(maps)
    v = an.list_videos()[0]
    assert an.list_chunks(v) == list(range(0, 18, 3)) and an.sink_frames(v) == [0, 1, 2]
    assert an.summary(v)["causal"]["kv_cache_design"]["design"] == "rolling anchor"
    rec = FolderRecording.open(maps, v)
    assert rec.kv_events() == take.kv_events
    table = sink_table(rec)
    late = [r for r in table.rows if r["chunk"] == 12 and r["pass"] == "denoise" and r["branch"] == "cond"]
    assert late and all(r["sink_frames"] == [0, 1, 2] and r["mass_sink"] > 0 for r in late)
    assert all(r["uniform_sink"] == pytest.approx(3 / len(r["key_frames"])) for r in late)
    # a block refilled once per window: the table's geometry (key frames, RoPE positions) is the first call's, as
    # its statistics are
    first = {}
    for e in take.kv_events:
        first.setdefault((e["chunk"], e["step"], e["block"], e["branch"]), e)
    repeated = [k for k in first if sum(1 for e in take.kv_events
                                        if (e["chunk"], e["step"], e["block"], e["branch"]) == k) > 1]
    assert repeated
    for r in table.rows:
        e = first[(r["chunk"], r["step"], r["block"], r["branch"])]
        assert r["key_frames"] == list(take.chunks[r["chunk"]].key_frames[(r["step"], r["block"])]) == e["key_frames"]
        assert r["key_rope_positions"] == e["rope_frames"]
    files = write_sink_report([table], str(tmp_path / "report"))
    assert os.path.getsize(files["eviction_timeline.png"]) > 0


# -- LongLive -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", [False, True], ids=["absolute_rope", "relative_rope"])
@needs("longlive")
def test_longlive_records_both_cfg_caches_sinks_and_a_pinned_chunk(monkeypatch, relative):
    """LongLive's multi-shot geometry as its pipeline builds it: a cache of ``local_attn_size`` frames (the modules'
    ``max_attention_size`` the same), ``multi_shot_sink`` making the sink frame global, and the chunk at the scene
    cut (generated chunk 2, latent frames 4-5) pinned beside it while the window rolls."""
    with modules("longlive", monkeypatch) as (cm, wm):
        model = tiny(cm, local_attn_size=CACHE, sink_size=SINK, num_frame_per_block=2)
        model.use_relative_rope = relative
        noise, ctx = _noise(10)
        negative = torch.randn(1, 7, 4096).bfloat16()
        go = lambda: longlive_generate(model, noise, ctx, negative, 2, TIMESTEPS, multi_shot_sink=True,  # noqa: E731
                                       scene_cuts=(2,))
        take, spies = run(model, go, lambda: Spies(cm, wm, monkeypatch))
        assert check(take, spies, model) == 5 * (len(TIMESTEPS) + 1) * 2 * 2
        assert model.blocks[0].self_attn.global_sink_size == 0  # the loop restores the modules, as the pipeline
    assert take.kv_design["design"] == "global, pinned and rolling sinks"
    assert {e["branch"] for e in take.kv_events} == {"cond", "uncond"} and (0, "uncond") in take.chunks[4].sink
    for e in take.kv_events:
        past = [f for f, r in zip(e["key_frames"], e["reasons"]) if r != "current"]
        assert len(e["key_frames"]) <= CACHE  # the pipeline's cache: local_attn_size frames
        if relative:  # keys are stored un-rotated and rotated at window positions on every call
            assert e["rope_frames"] == list(range(len(e["key_frames"])))
        else:
            assert e["rope_frames"] == e["key_frames"]
        if e["chunk"] >= 2:  # the global sink frame, kept while the cache rolls
            assert e["sink_frames"] == [0] and past[0] == 0
        if e["chunk"] >= 6:  # the chunk pinned at the scene cut, beside the sink, while frames 2, 3, 5, 6 go
            assert e["pinned_frames"] == [4] and past[:2] == [0, 4]
            assert e["key_frames"] == [0, 4, e["chunk"] - 1, e["chunk"], e["chunk"] + 1]
        assert "unattended_slot_frames" not in e
    assert not any("sink overwritten" in f for e in take.kv_events for f in e.get("flags", ()))
    # the sink table: the log's RoPE positions on the key axis (window positions under relative RoPE), the pinned
    # chunk its own class with its own uniform share, both CFG branches
    table = sink_table(MemoryRecording(take))
    events = {(e["chunk"], e["step"], e["block"], e["branch"]): e for e in take.kv_events}
    assert {r["branch"] for r in table.rows} == {"cond", "uncond"}
    for r in table.rows:
        e = events[(r["chunk"], r["step"], r["block"], r["branch"])]
        assert r["key_rope_positions"] == e["rope_frames"] and r["pinned_frames"] == e["pinned_frames"]
        if r["chunk"] >= 6:
            assert r["key_classes"] == ["sink", "pinned", "window", "chunk", "chunk"]
            assert r["uniform_pinned"] == pytest.approx(1 / 5) and r["mass_pinned"] > 0


@needs("longlive")
def test_longlive_i2v_and_extension_recorded_with_per_chunk_prompts(monkeypatch):
    """LongLive image-to-video / video extension: ``initial_latent`` passes give every prompt block at once (4 prompt
    embeddings for 1 video). The generation runs exactly as without the pack; the self-attention and KV log of those
    passes are recorded and checked against float64; their cross-attention is not, and the take says so; every
    chunk is labelled with the prompt block it used (the i2v pass with all four)."""
    with modules("longlive", monkeypatch) as (cm, wm):
        model = tiny(cm, local_attn_size=CACHE, sink_size=SINK, num_frame_per_block=2)
        noise, _ = _noise(8)
        g = torch.Generator().manual_seed(3)
        blocks = [torch.randn(1, 7, 4096, generator=g).bfloat16() for _ in range(4)]  # one prompt per chunk
        negative = torch.randn(1, 7, 4096, generator=g).bfloat16()
        image = torch.randn(1, 16, 2, H, W, generator=g).bfloat16()  # 2 latent frames given: extended by 8
        go = lambda: longlive_generate(model, noise, blocks, negative, 2, TIMESTEPS, initial_latent=image)  # noqa
        take, spies = run(model, go, lambda: Spies(cm, wm, monkeypatch))
        # 4 generated chunks x (3 steps + the clean pass), the given chunk 1 pass; x 2 branches x 2 blocks
        assert check(take, spies, model) == (4 * (len(TIMESTEPS) + 1) + 1) * 2 * 2
    assert "several prompts per video" in " ".join(take.not_recorded)
    assert "4 prompt embeddings for 1 video" in " ".join(take.not_recorded.values())
    # the given chunk: self-attention recorded; the positive pass's cross-attention (4 prompts) not, the negative
    # pass's (one prompt) is
    assert {(0, "cond"), (0, "uncond")} <= set(take.chunks[0].sink) and set(take.chunks[0].cross) == {(0, "uncond")}
    assert all(take.chunks[c].cross for c in (2, 4, 6, 8))
    prompts = MemoryRecording(take).summary["causal"]["chunk_prompts"]
    assert prompts == {"0": {"cond": [0, 1, 2, 3], "uncond": [4]}, **{str(2 + 2 * i): {"cond": [i], "uncond": [4]}
                                                                      for i in range(4)}}
    assert [e["key_frames"] for e in take.kv_events if e["block"] == 0 and e["branch"] == "cond"
            and e["pass"] == "context"] == [[0, 1], [0, 1, 2, 3], [0, 2, 3, 4, 5], [0, 4, 5, 6, 7], [0, 6, 7, 8, 9]]


# -- what no design covers, and missing packages -------------------------------------------------------------------
@needs("longlive")
def test_longlive_quantized_cache_refused_before_attention(monkeypatch):
    with modules("longlive", monkeypatch) as (cm, wm):
        model = tiny(cm, local_attn_size=CACHE, sink_size=SINK, num_frame_per_block=2)
        noise, ctx = _noise(2)
        calls = []
        monkeypatch.setattr(cm, "attention", lambda *a, **k: calls.append(1))
        from devtools.causal_loops import kv_caches
        kv = kv_caches(model, 1, 6 * FT, torch.bfloat16, "cpu", pinned=True)
        for c in kv:
            c["quantized"] = True
        with pytest.raises(ValueError, match="quantized KV cache"):
            with record(model, plan()) as rec:
                model(noise, t=torch.full((1, 2), 1000.0), context=ctx, seq_len=2 * FT, kv_cache=kv,
                      crossattn_cache=[{"is_init": False}] * 2, current_start=0, cache_start=0)
        assert not calls and rec.latest.status == "partial"


def test_causal_model_no_design_fits_refused_with_what_did_not_fit():
    from devtools import tiny_causal

    class Attn(torch.nn.Module):
        def forward(self, x, kv_cache=None, start=0):
            return x

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.cross_attn = Attn(), Attn()

    class CausalWanModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])
    del tiny_causal
    with pytest.raises(TypeError, match=r"matches no known KV-cache design.*Self-Forcing.*CausalRecorder"):
        with record(CausalWanModel(), plan()):
            pass


@needs("causvid")
def test_causvid_missing_package_named_with_the_install_command(monkeypatch):
    from causal_projects import project_path
    from wan_capture.adapters.projects import project_modules
    import sys
    for name in [n for n in sys.modules if n.split(".")[0] in ("diffusers", "einops")] + ["diffusers", "einops"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportError, match=r"CausVid's model code needs the package 'diffusers'.*pip install diffusers"):
        with project_modules(project_path("causvid"), "causvid"):
            pass


@pytest.mark.skipif(__import__("causal_projects").project_path("self-forcing") is None,
                    reason=__import__("causal_projects").not_found("self-forcing"))
def test_causal_demo_self_forcing_without_einops_says_what_to_install(monkeypatch, capsys):
    import sys
    from causal_projects import project_path
    from devtools.causal_demo import main
    for name in [n for n in sys.modules if n.split(".")[0] == "einops"] + ["einops"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as e:
        main(["--out", "/nonexistent", "--self-forcing", project_path("self-forcing")])
    assert e.value.code == 2 and "pip install diffusers einops" in capsys.readouterr().err
