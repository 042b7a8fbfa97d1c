"""The recorder inside real ComfyUI samplers, with tiny random Wan checkpoints built at test time."""
import importlib
import math

import pytest
import torch

from comfy_harness import (capture_override, conditioning, empty_latent, ksampler, ksampler_advanced, load_comfy,
                           load_model, needs_comfy, tiny_wan_checkpoint)
from reference import naive_probs, naive_scores, naive_sink

pytestmark = needs_comfy


@pytest.fixture(scope="module")
def pack():
    return load_comfy()


@pytest.fixture(scope="module")
def models(pack, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {v: load_model(tiny_wan_checkpoint(str(d / f"{v}.safetensors"), v, seed=i))
            for i, v in enumerate(("t2v", "i2v", "ti2v"))}


def recording(pack):
    return importlib.import_module(pack.__name__ + ".nodes.recording")


def core(pack):
    return pack.wan_capture


def attach(pack, model, **plan):
    wc = core(pack)
    rec = wc.Recorder(wc.RecordingPlan(**{"store_per_head": True, **plan}))
    return pack.nodes.comfy_attach.attach_recorder(model, rec), rec


def test_t2v_records_every_step_block_head_and_matches_naive(pack, models):
    base = models["t2v"]
    pos, neg = conditioning("t2v", 1), conditioning("t2v", 2)
    latent = empty_latent("t2v")
    plain = ksampler(base, pos, neg, latent)
    spy, calls = capture_override(base)
    tracked = (0, 5, 511)
    model, rec = attach(pack, spy, text_positions=tracked, negative_positions=tracked, record_sink_stats=True, branch="both",
                        storage_dtype="float32", window=core(pack).FrameWindow(1, 2, 0, None))
    out = ksampler(model, pos, neg, latent)
    assert torch.equal(out["samples"], plain["samples"]), "recording changed the sampled latent"
    take = rec.latest
    assert take.status == "complete" and take.steps == [0, 1, 2] and take.total_steps == 3
    assert take.grid.as_list() == [3, 4, 4] and take.text_len == 512
    # 3 steps x 1 batched cond+uncond forward x 2 blocks x (self, text cross)
    assert len(calls) == 3 * 2 * 2
    for i, (q, k, heads, order) in enumerate(calls):
        step, block, kind = i // 4, (i // 2) % 2, ("self", "cross")[i % 2]
        qh = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        kh = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        rows = {"cond": order.index(0), "uncond": order.index(1)}  # ComfyUI: 0 = cond, 1 = uncond
        for branch in ("cond", "uncond"):
            r = rows[branch]
            if kind == "cross":
                want = naive_probs(naive_scores(qh[r:r + 1], kh[r:r + 1])[0])[..., list(tracked)]
                got = take.cross[(step, branch)][:, block]
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
            else:
                received, key_max, mass, ent, _ = naive_sink(qh[r:r + 1], kh[r:r + 1], 16)
                st = take.sink[(step, branch)]
                torch.testing.assert_close(st["received"][:, block].double(), received, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(st["key_max"][:, block].double(), key_max, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(st["frame_mass"][:, block].double(), mass, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(st["entropy"][:, block].double(), ent, rtol=1e-4, atol=1e-4)
                s, _ = naive_scores(qh[r:r + 1], kh[r:r + 1])
                w = take.windows[(step, block, branch)]
                assert w["q_range"] == (16, 32) and w["k_range"] == (0, 48)
                torch.testing.assert_close(w["scores"].double(), s[:, :, 16:32], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(w["probs"].double(), naive_probs(s)[:, :, 16:32], rtol=1e-4, atol=1e-6)


def test_cross_rows_sum_to_one_over_text_keys_and_aggregation(pack, models):
    pos, neg = conditioning("t2v", 3), conditioning("t2v", 4)
    model, rec = attach(pack, models["t2v"], text_positions=tuple(range(512)), storage_dtype="float32",
                        store_per_block=False, store_per_head=False)
    ksampler(model, pos, neg, empty_latent("t2v"))
    maps = rec.latest.cross[(2, "cond")]
    assert maps.shape == (1, 1, 1, 48, 512) and rec.latest.blocks == (-1,) and rec.latest.heads == (-1,)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 1, 1, 48), rtol=1e-5, atol=1e-5)


def test_unattached_model_afterwards_is_unaffected(pack, models):
    base = models["t2v"]
    pos, neg = conditioning("t2v", 5), conditioning("t2v", 6)
    before = ksampler(base, pos, neg, empty_latent("t2v"), seed=7)
    model, rec = attach(pack, base, text_positions=(1,), record_sink_stats=True)
    ksampler(model, pos, neg, empty_latent("t2v"), seed=7)
    assert "optimized_attention_override" not in base.model_options.get("transformer_options", {})
    takes = len(rec.takes)
    after = ksampler(base, pos, neg, empty_latent("t2v"), seed=7)
    assert torch.equal(before["samples"], after["samples"])
    assert len(rec.takes) == takes, "the unattached model fed the recorder"


def test_stale_latent_never_gets_another_recording(pack, models):
    take_for_latent = recording(pack).take_for_latent
    model, rec = attach(pack, models["t2v"], text_positions=(1,))
    pos, neg = conditioning("t2v", 1), conditioning("t2v", 2)
    a = ksampler(model, pos, neg, empty_latent("t2v"), seed=1)
    b = ksampler(model, pos, neg, empty_latent("t2v"), seed=2)
    ta, tb = take_for_latent(rec, a), take_for_latent(rec, b)
    assert ta is not tb and ta.id < tb.id
    assert not torch.equal(ta.cross[(0, "cond")], tb.cross[(0, "cond")])
    with pytest.raises(ValueError, match="no attention recording matches this LATENT"):
        take_for_latent(rec, {"samples": a["samples"] + 1})
    fresh = core(pack).Recorder(core(pack).RecordingPlan(text_positions=(1,), store_per_head=True))
    with pytest.raises(ValueError, match="recorded nothing yet"):
        take_for_latent(fresh, a)


def test_two_samplers_number_steps_across_both(pack, models):
    """Wan 2.2 A14B style: two models (here the same weights twice) in two KSamplerAdvanced, one recording."""
    pos, neg = conditioning("t2v", 1), conditioning("t2v", 2)
    high, rec = attach(pack, models["t2v"], text_positions=(2,), steps=(0, 1, 2, 3))
    low = pack.nodes.comfy_attach.attach_recorder(models["t2v"].clone(), rec)
    first = ksampler_advanced(high, pos, neg, empty_latent("t2v"), 0, 2, 4, leftover=True)
    second = ksampler_advanced(low, pos, neg, first, 2, 10000, 4, leftover=False, add_noise=False)
    assert len(rec.takes) == 1
    take = recording(pack).take_for_latent(rec, second)
    assert take.total_steps == 4 and take.steps == [0, 1, 2, 3] and [p[0] for p in take.passes] == [0, 2]
    sig = [take.step_sigmas[s] for s in range(4)]
    assert sig == sorted(sig, reverse=True) and len(set(sig)) == 4


@pytest.mark.parametrize("variant,spatial,grid", [("i2v", 8, [3, 4, 4]), ("ti2v", 16, [3, 4, 4])])
def test_i2v_and_ti2v_record_text_cross_attention(pack, models, variant, spatial, grid):
    spy, calls = capture_override(models[variant])
    model, rec = attach(pack, spy, text_positions=(0, 4), storage_dtype="float32", record_sink_stats=True)
    latent = empty_latent(variant, height=8 * spatial, width=8 * spatial, spatial=spatial)
    ksampler(model, conditioning(variant, 1), conditioning(variant, 2), latent)
    take = rec.latest
    assert take.grid.as_list() == grid and take.text_len == 512
    assert take.cross[(0, "cond")].shape == (1, 2, 2, 48, 2)
    per_block = 3 if variant == "i2v" else 2
    key_lens = [c[1].shape[1] for c in calls[:per_block]]
    assert key_lens == ([48, 257, 512] if variant == "i2v" else [48, 512])
    q, k, heads, order = calls[per_block - 1]  # step 0, block 0, text cross-attention
    r = order.index(0)
    qh = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)[r:r + 1]
    kh = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)[r:r + 1]
    want = naive_probs(naive_scores(qh, kh)[0])[..., [0, 4]]
    torch.testing.assert_close(take.cross[(0, "cond")][:, 0].double(), want, rtol=1e-4, atol=1e-6)


def test_batch_two_with_cond_and_uncond_in_separate_forwards(pack, models):
    spy, calls = capture_override(models["t2v"])
    model, rec = attach(pack, spy, text_positions=(0,), negative_positions=(0,), branch="both", storage_dtype="float32")
    # contexts of different lengths cannot be concatenated, so ComfyUI runs cond and uncond as separate forwards
    out = ksampler(model, conditioning("t2v", 1), conditioning("t2v", 2, text_len=520), empty_latent("t2v", batch=2))
    take = rec.latest
    assert {c[3] for c in calls} == {(0,), (1,)} and {c[0].shape[0] for c in calls} == {2}
    assert take.batch == 2 and take.cross[(1, "uncond")].shape == (2, 2, 2, 48, 1)
    assert take.cross[(1, "cond")].shape == (2, 2, 2, 48, 1)
    assert not torch.equal(take.cross[(1, "cond")][0], take.cross[(1, "cond")][1])
    assert not torch.equal(take.cross[(1, "cond")], take.cross[(1, "uncond")])
    assert out["samples"].shape[0] == 2


def test_budget_refused_before_sampling_records(pack, models):
    wc = core(pack)
    model, rec = attach(pack, models["t2v"], text_positions=tuple(range(64)), record_sink_stats=True,
                        storage_dtype="float32", memory_budget_mb=0.01)
    with pytest.raises(wc.BudgetError, match=r"needs .* MiB of host memory.*memory_budget_mb"):
        ksampler(model, conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v"))
    take = rec.latest
    assert take.status == "partial" and "BudgetError" in take.error and not take.cross and not take.sink


def test_interrupted_sampling_leaves_partial_take(pack, models):
    import comfy.samplers
    model, rec = attach(pack, models["t2v"], text_positions=(0,))
    calls = {"n": 0}

    def boom(executor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("user pressed cancel")
        return executor(*args, **kwargs)
    import comfy.patcher_extension as pe
    model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, "boom", boom)
    with pytest.raises(KeyboardInterrupt):
        ksampler(model, conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v"))
    take = rec.latest
    assert take.status == "partial" and take.steps == [0] and "KeyboardInterrupt" in take.error
    assert comfy.samplers is not None


def test_non_wan_model_is_refused_by_name(pack):
    import types
    fake = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="works on Wan video models.*Linear"):
        pack.nodes.comfy_attach.attach_recorder(fake, core(pack).Recorder(core(pack).RecordingPlan(text_positions=(0,), store_per_head=True)))


def test_node_schema_and_execute(pack, models):
    an = pack.nodes.attach_node
    node = an.AttachAttentionRecorder
    assert node.GET_SCHEMA().node_id == "WanAttachRecorder"
    opts = an.AttentionRecordingOptions.execute(text_positions="0-7").args[0]  # the rest at their defaults
    model, rec = node.execute(model=models["t2v"], options=opts).args
    ksampler(model, conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v"))
    assert rec.latest.cross[(0, "cond")].shape == (1, 2, 1, 48, 8)  # positions 0-7, mean over heads (the default)
    assert math.isfinite(float(rec.latest.cross[(0, "cond")].float().sum()))
    with pytest.raises(core(pack).PlanError, match="blocks"):
        node.execute(model=models["t2v"], options=opts, blocks="3-1")
    with pytest.raises(core(pack).PlanError, match="text_positions"):  # cross maps of nothing: said, not guessed
        node.execute(model=models["t2v"])
    _, rec = node.execute(model=models["t2v"], options=opts, steps="every 2", record="sink statistics").args
    assert rec.plan.storage_interval == 2 and rec.plan.steps is None and rec.plan.record_sink_stats
    assert not rec.plan.record_cross


def test_sampler_custom_advanced_records_and_returns_the_same_latent(pack, models):
    from devtools.tiny_comfy import core_nodes
    cs = core_nodes("nodes_custom_sampler")
    pos, neg = conditioning("t2v", 1), conditioning("t2v", 2)
    latent = empty_latent("t2v")

    def run(model):
        guider = cs.CFGGuider().get_guider(model, pos, neg, 3.0)[0]
        sigmas = cs.BasicScheduler().get_sigmas(model, "simple", 4, 1.0)[0]
        sampler = cs.KSamplerSelect().get_sampler("euler")[0]
        return cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(5)[0], guider, sampler, sigmas, latent)[0]
    plain = run(models["t2v"])
    model, rec = attach(pack, models["t2v"], text_positions=(0, 3), negative_positions=(0, 3), branch="both",
                        storage_dtype="float32")
    out = run(model)
    assert torch.equal(out["samples"], plain["samples"])
    take = recording(pack).take_for_latent(rec, out)
    assert take.steps == [0, 1, 2, 3] and take.sampling["cfg"] == 3.0 and take.cross[(3, "uncond")].shape == (1, 2, 2, 48, 2)
    torch.testing.assert_close(take.cross[(0, "cond")].sum(-1) <= 1.0 + 1e-6, torch.ones(1, 2, 2, 48, dtype=torch.bool))


def test_install_recorder_on_transformer_options_drives_the_dit_directly(pack, models):
    """The public install function the GPU benchmark uses: the DiT called directly with a transformer_options dict
    records the same statistics as the Attach node's clone inside a sampler."""
    wc = core(pack)
    dm = models["t2v"].model.diffusion_model
    info = wc.describe_model(dm, model_type="WAN21")
    assert (info.num_blocks, info.num_heads, info.patch_size) == (2, 2, (1, 2, 2)) and not info.causal
    plan = wc.RecordingPlan(record_cross=False, record_sink_stats=True, storage_dtype="float32", store_per_head=True)
    rec = wc.Recorder(plan)
    to = {"cond_or_uncond": [0]}
    calls = []
    to["optimized_attention_override"] = lambda func, *a, **k: (calls.append((a[0].clone(), a[1].clone())),
                                                                 func(*a, **k))[1]
    pack.nodes.comfy_attach.install_recorder(to, rec, info)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8)
    ctx = torch.randn(1, 512, 4096)
    rec.begin_pass([0.9, 0.5, 0.0], info)
    to["sigmas"] = torch.tensor([0.9])
    with torch.no_grad():
        out = dm(x, torch.tensor([900.0]), ctx, transformer_options=to)
    rec.end_pass()
    with torch.no_grad():
        plain = dm(x, torch.tensor([900.0]), ctx, transformer_options={"cond_or_uncond": [0]})
    assert torch.equal(out, plain)
    take = rec.latest
    assert take.steps == [0] and take.model["model_type"] == "WAN21" and len(calls) == 4
    for block in range(2):
        q, k = calls[2 * block]
        qh, kh = q.view(1, 48, 2, -1).transpose(1, 2), k.view(1, 48, 2, -1).transpose(1, 2)
        received, _, mass, _, _ = naive_sink(qh, kh, 16)
        torch.testing.assert_close(take.sink[(0, "cond")]["received"][:, block].double(), received, rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(take.sink[(0, "cond")]["frame_mass"][:, block].double(), mass, rtol=1e-4,
                                   atol=1e-6)


def test_out_of_range_blocks_refused_at_the_attach_node(pack, models):
    """blocks='5' on a 2-block model: refused when the recorder is attached, before any sampling, naming the range."""
    wc = core(pack)
    with pytest.raises(wc.PlanError, match=r"blocks \[5\] do not exist: the model has 2 blocks \(0..1\)"):
        attach(pack, models["t2v"], text_positions=(0,), blocks=(0, 5))
    model, rec = attach(pack, models["t2v"], text_positions=(0,), steps=(0, 7))
    with pytest.raises(wc.PlanError, match=r"steps \[7\] do not exist: the sampling has 3 steps"):
        ksampler(model, conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v"))
    assert not rec.takes  # refused before a take was begun


def test_partial_rerun_of_the_second_expert_continues_the_cached_first(pack, models):
    """Wan 2.2 A14B in a re-queued graph: the first KSamplerAdvanced comes from ComfyUI's cache, only the second runs
    again (another cfg). Its recording continues the first expert's steps (2, 3 after 0, 1), never restarts at 0."""
    pos, neg = conditioning("t2v", 1), conditioning("t2v", 2)
    high, rec = attach(pack, models["t2v"], text_positions=(2,))
    low = pack.nodes.comfy_attach.attach_recorder(models["t2v"].clone(), rec)
    first = ksampler_advanced(high, pos, neg, empty_latent("t2v"), 0, 2, 4, leftover=True)
    second = ksampler_advanced(low, pos, neg, first, 2, 10000, 4, leftover=False, add_noise=False)
    whole = recording(pack).take_for_latent(rec, second)
    import nodes
    again = nodes.KSamplerAdvanced().sample(low, "disable", 1, 4, 5.5, "euler", "simple", pos, neg, first, 2, 10000,
                                            "disable")[0]  # the cached first expert is not run again
    take = recording(pack).take_for_latent(rec, again)
    assert take is not whole and take.status == "complete"
    assert take.steps == [0, 1, 2, 3] and take.total_steps == 4 and [p[0] for p in take.passes] == [0, 2]
    for s in (0, 1):  # the first expert's steps are the cached recording's
        assert take.cross[(s, "cond")] is whole.cross[(s, "cond")]
    assert not torch.equal(take.cross[(3, "cond")], whole.cross[(3, "cond")])  # the new cfg's own last step
    assert recording(pack).take_for_latent(rec, second) is whole  # the earlier result still finds its recording
