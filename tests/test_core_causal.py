"""ComfyUI's own causal Wan (``CausalWanModel`` sampled by ``ar_video``, 2026) recorded by the Attach node: every
statistic exact against float64 recomputed from the q/k the attention kernel received, the KV-cache log checked
against the real cache frame by frame, the sampled latent bit-identical with and without recording. On upstream's
real files where ``COMFY_AR_SOURCES`` has them (both ``end`` variants), and on the stand-in everywhere."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from comfy_harness import capture_override, conditioning, load_comfy, needs_comfy, tiny_vae, tiny_wan_checkpoint
from reference import naive_probs, naive_scores, naive_sink

pytestmark = needs_comfy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = ("a41ffd2", "b05044d")
SOURCES = ("standin-int", "standin-tensor") + REAL
STEPS, FRAMES, SIZE = 3, 9, 64  # 3 latent frames of 4x4 tokens: 3 chunks of 1 frame (framewise, the template's)
FT = (SIZE // 16) ** 2
ERRORS = {}  # statistic -> worst relative error seen, printed at the end of the module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pack = load_comfy()
    import devtools.comfy_ar as car
    ckpt = tiny_wan_checkpoint(str(tmp_path_factory.mktemp("ar") / "t2v.safetensors"), "t2v", seed=3)
    yield pack, car, ckpt
    if ERRORS:
        print("\ncore_causal max relative error vs float64: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(ERRORS.items())))


def real_or_skip(car, source):
    if source in REAL and car.ar_sources() is None:
        pytest.skip(car.AR_NOT_FOUND)
    return source in REAL


def sample(car, model, real: bool, i2v: bool, seed: int = 7):
    """The template's sampling, in process: (ARVideoI2V ->) CFGGuider at cfg 1 -> SamplerARVideo(1) -> simple 3."""
    import comfy.sample
    import comfy.samplers
    car.install_sampler(real)
    latent = torch.zeros(1, 16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    if i2v:
        image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(11))
        model, lat = car.nodes_module(real).ARVideoI2V.execute(model, tiny_vae("t2v"), image, SIZE, SIZE, FRAMES, 1).args
        latent = lat["samples"]
    sampler = car.nodes_module(real).SamplerARVideo.execute(1).args[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, conditioning("t2v", 1), conditioning("t2v", 2),
                                      latent, disable_pbar=True, seed=seed), model


def attach(pack, model, **plan):
    wc = pack.wan_capture
    rec = wc.Recorder(wc.RecordingPlan(**{"store_per_head": True, "storage_dtype": "float32", **plan}))
    return pack.nodes.comfy_attach.attach_recorder(model, rec), rec


def schedule(i2v: bool):
    """(chunk, step, pass) of every model evaluation, in ar_video's order, with steps numbered as the sigmas first
    appear (an initial image's context pass at sigma 0 comes first)."""
    out = [(0, 0, "context")] if i2v else []
    for chunk in range(1 if i2v else 0, (FRAMES - 1) // 4 + 1):
        out += [(chunk, i + i2v, "denoise") for i in range(STEPS)] + [(chunk, 0 if i2v else STEPS, "context")]
    return out


def cache_ends(dm):
    """The real cache's ``end`` before each self-attention call (a LongTensor at a41ffd2, an int at b05044d)."""
    ends, handles = [], []
    for block in dm.blocks:
        handles.append(block.self_attn.register_forward_pre_hook(
            lambda m, a, kw: ends.append(int(kw["kv_cache"]["end"]) if kw.get("kv_cache") is not None else None),
            with_kwargs=True))
    return ends, handles


def close(name, got, want, atol):
    got, want = got.double(), want.double()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    ERRORS[name] = max(ERRORS.get(name, 0.0), err)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("source", SOURCES)
def test_core_causal_exact_kv_log_and_identical_output(env, source, i2v):
    pack, car, ckpt = env
    real = real_or_skip(car, source)
    base = car.causal_patcher(ckpt, source)
    plain, _ = sample(car, base, real, i2v)
    spy, calls = capture_override(base)
    tracked = (0, 5, 511)
    model, rec = attach(pack, spy, text_positions=tracked, record_sink_stats=True)
    dm = base.model.diffusion_model
    ends, handles = cache_ends(dm)
    try:
        out, _ = sample(car, model, real, i2v)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out, plain), "recording changed the sampled latent"
    take = rec.latest
    assert take.status == "complete" and not take.skipped and take.kv_design["design"] == "global cache"
    evaluations = schedule(i2v)
    blocks, heads = dm.num_layers, dm.num_heads
    assert len(calls) == len(evaluations) * blocks * 2 and len(ends) == len(evaluations) * blocks
    assert {s: p for _, s, p in evaluations} == take.step_pass
    assert sorted(take.chunks) == sorted({c for c, _, _ in evaluations})
    own = {}  # (frame, block) -> the keys the frame's last writer put into the cache (what later chunks read)
    events = {(e["chunk"], e["step"], e["block"]): e for e in take.kv_events}
    assert len(events) == len(take.kv_events) == len(evaluations) * blocks  # one event per call, none twice
    for n, (chunk, step, kind) in enumerate(evaluations):
        view = take.chunks[chunk]
        for block in range(blocks):
            (q, k, h, order), (cq, ck, _, _) = calls[2 * (n * blocks + block)], calls[2 * (n * blocks + block) + 1]
            lq, lk = q.shape[1], k.shape[1]
            # the real cache: it held `end` tokens before the call, the chunk's keys were written after them
            assert ends[n * blocks + block] == lk - lq == chunk * FT
            qh = q.view(1, lq, h, -1).transpose(1, 2)
            kh = k.view(1, lk, h, -1).transpose(1, 2)
            received, key_max, mass, ent, _ = naive_sink(qh, kh, FT, q_offset=lk - lq)
            st = view.sink[(step, "cond")]
            close("received", st["received"][:, block], received, 1e-6)
            close("key_max", st["key_max"][:, block], key_max, 1e-4)
            close("frame_mass", st["frame_mass"][:, block], mass, 1e-6)
            close("entropy", st["entropy"][:, block], ent, 1e-4)
            cqh = cq.view(1, cq.shape[1], h, -1).transpose(1, 2)
            ckh = ck.view(1, ck.shape[1], h, -1).transpose(1, 2)
            close("cross", view.cross[(step, "cond")][:, block], naive_probs(naive_scores(cqh, ckh)[0])[..., list(tracked)],
                  1e-6)
            # the KV log, frame by frame against the cache's keys
            e = events[(chunk, step, block)]
            frames = list(range(chunk + 1))
            assert e["key_frames"] == frames and e["rope_frames"] == frames and e["query_frames"] == [chunk]
            assert e["reasons"] == ["window"] * chunk + ["current"] and e["pass"] == kind
            assert e["writers"] == ["context"] * chunk + ["context" if kind == "context" else f"step {step}"]
            assert e["evicted"] == [] and e["unknown_key_frames"] == 0 and "anomaly" not in e
            assert view.key_frames[(step, block)] == tuple(frames)
            for f in range(chunk):  # each cached frame holds the keys its chunk's context pass wrote
                assert torch.equal(k[:, f * FT:(f + 1) * FT], own[(f, block)])
            if kind == "context":
                own[(chunk, block)] = k[:, chunk * FT:].clone()
    assert heads == take.model["num_heads"]


def test_core_causal_later_comfyui_passing_options_records_once(env):
    """A later ComfyUI that passes transformer_options down to the blocks: every call still recorded once, the same
    arrays and log as today's path."""
    pack, car, ckpt = env
    takes = []
    for pass_options in (False, True):
        base = car.causal_patcher(ckpt, "standin-int", pass_options=pass_options)
        spy, calls = capture_override(base)
        model, rec = attach(pack, spy, text_positions=(1, 2), record_sink_stats=True)
        sample(car, model, False, True)
        takes.append((rec.latest, len(calls)))
    (a, na), (b, nb) = takes
    assert na == nb and not b.skipped and b.kv_events == a.kv_events
    assert set(a.store.arrays) == set(b.store.arrays) and a.store.arrays
    for key, arr in a.store.arrays.items():
        # bit for bit (NaN where a step's whole-video map has frames of chunks without that step)
        torch.testing.assert_close(torch.as_tensor(b.store.arrays[key]), torch.as_tensor(arr), rtol=0, atol=0,
                                   equal_nan=True, msg=str(key))


@pytest.mark.parametrize("source", REAL)
def test_core_causal_stand_in_matches_the_real_files(env, source):
    pack, car, ckpt = env
    real_or_skip(car, source)
    stand_in = "standin-tensor" if source == "a41ffd2" else "standin-int"
    for i2v in (False, True):
        want, _ = sample(car, car.causal_patcher(ckpt, source), True, i2v)
        got, _ = sample(car, car.causal_patcher(ckpt, stand_in), False, i2v)
        assert torch.equal(got, want), (source, i2v)


@pytest.mark.parametrize("source", SOURCES)
def test_core_causal_full_sequence_sampler_records_each_call_once(env, source):
    """The same model under an ordinary sampler (no ar_state: the whole video at once, bidirectional): recorded as
    bidirectional Wan, each call once (a41ffd2's own forward passes no per-block patch, b05044d's is WanModel's)."""
    pack, car, ckpt = env
    real_or_skip(car, source)
    from comfy_harness import empty_latent, ksampler
    base = car.causal_patcher(ckpt, source)
    pos, neg, latent = conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v")
    plain = ksampler(base, pos, neg, latent, cfg=1.0)
    spy, calls = capture_override(base)
    model, rec = attach(pack, spy, text_positions=(0, 5))
    out = ksampler(model, pos, neg, latent, cfg=1.0)
    assert torch.equal(out["samples"], plain["samples"])
    take = rec.latest
    assert take.status == "complete" and take.steps == [0, 1, 2] and not take.causal and not take.skipped
    assert len(calls) == 3 * 2 * 2
    for n in range(0, len(calls), 2):  # each block's text cross-attention against float64
        q, k, h, _ = calls[n + 1]
        qh, kh = (t.view(1, t.shape[1], h, -1).transpose(1, 2) for t in (q, k))
        close("cross (full sequence)", take.cross[(n // 4, "cond")][:, (n // 2) % 2],
              naive_probs(naive_scores(qh, kh)[0])[..., [0, 5]], 1e-6)

def test_core_causal_record_points_to_the_attach_node(env):
    pack, car, ckpt = env
    dm = car.causal_patcher(ckpt).model.diffusion_model
    with pytest.raises(TypeError, match="Attach Attention Recorder"):
        with pack.wan_capture.record(dm, pack.wan_capture.RecordingPlan(text_positions=(1,))):
            pass


def test_core_causal_saved_viewed_and_reported_like_the_other_causal_models(env, tmp_path):
    pack, car, ckpt = env
    import folder_paths
    folder_paths.set_output_directory(str(tmp_path))
    real = car.ar_sources() is not None
    base = car.causal_patcher(ckpt, "b05044d" if real else "standin-int")
    attach_node = importlib.import_module(f"{pack.__name__}.nodes.attach_node").AttachAttentionRecorder
    options = importlib.import_module(f"{pack.__name__}.nodes.attach_node").AttentionRecordingOptions
    opts = options.execute(text_positions="0,5", store_per_head=True).args[0]
    model, rec = attach_node.execute(model=base, options=opts, record="cross attention + sink statistics").args
    out, _ = sample(car, model, real, True)
    with torch.no_grad():
        images = tiny_vae("t2v").decode(out)
    images = images.reshape(-1, *images.shape[-3:])
    save = importlib.import_module(f"{pack.__name__}.nodes.save_node").SaveAttentionMaps.PREPARE_CLASS_CLONE({})
    ui = save.execute(recorder=rec, samples={"samples": out}, images=images, batch_name="core_causal").ui
    saved = ui["attention_maps"]
    assert len(saved) == 1 and saved[0]["status"] == "complete"
    folder = tmp_path / "core_causal" / "attention_maps"
    from attention_analyzer import AttentionAnalyzer
    an = AttentionAnalyzer(str(folder))
    video = an.list_videos()[0]
    take = rec.latest
    assert an.is_causal(video) and an.list_chunks(video) == sorted(take.chunks) == [0, 1, 2]
    steps = an.chunk_steps(video)
    assert {int(c): list(v) for c, v in steps.items()} == {c: take.chunks[c].steps for c in take.chunks}
    assert [{k: e[k] for k in ("chunk", "step", "block", "key_frames", "rope_frames", "writers")}
            for e in an.load_kv_cache_events(video)] == [
        {k: e[k] for k in ("chunk", "step", "block", "key_frames", "rope_frames", "writers")} for e in take.kv_events]
    for chunk in take.chunks:  # every chunk's arrays read back as recorded (float16 storage)
        for step in take.chunks[chunk].steps:
            got = an.load_chunk_self_attention(video, step, chunk, "frame_mass")
            want = take.chunks[chunk].sink[(step, "cond")]["frame_mass"][0].numpy()
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)
    # step 1 is a denoising step of chunks 1 and 2: their rows of the whole-video matrix are theirs, and the frames
    # after a chunk (not in its cache) hold 0, the probability the model gives them (wan_capture.stats.causal)
    mass = an.get_causal_self_attention(video, 1, "frame_mass")
    assert mass.shape[-2:] == (3, 3)
    for chunk in (1, 2):
        row = take.chunks[chunk].sink[(1, "cond")]["frame_mass"][0].numpy()[..., 0, :]
        np.testing.assert_allclose(mass[..., chunk, :chunk + 1], row, rtol=2e-3, atol=1e-4)
        assert (mass[..., chunk, chunk + 1:] == 0).all()
    entropy = an.get_causal_self_attention(video, 1, "entropy")
    assert np.isnan(entropy[..., 0]).all() and not np.isnan(entropy[..., 1:]).any()  # chunk 0: the image, step 0 only
    heat = importlib.import_module(f"{pack.__name__}.nodes.view_nodes").AttentionOverlay.PREPARE_CLASS_CLONE({})
    frames = heat.execute(recorder=rec, samples={"samples": out}, images=images, token="pos000").args[0]
    assert tuple(frames.shape) == tuple(images.shape)
    report = tmp_path / "report"
    command = [sys.executable, "-m", "wan_capture", "sink-report", str(folder), "--out", str(report)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("matplotlib") is None:  # a ComfyUI Python without the report's extra: told how
        assert done.returncode == 2 and "pip install 'wan-attention-capture[report]'" in done.stderr, done.stderr
        assert not report.exists()
        done = subprocess.run(command + ["--tables-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert (report / "frame_mass_chunks.png").stat().st_size > 0
    assert (report / "series.csv").stat().st_size > 0 and (report / "frames.csv").stat().st_size > 0


TEMPLATE = "video_causal_forcing_i2v"
PROMPT = "a girl rides a (wolf:1.2) at night"  # the same text with and without the pack: the same conditioning
# the template's nodes the twin leaves out: model files and the image become tiny nodes, the video container nodes
# and the length arithmetic are not part of the sampling
NOT_IN_TWIN = {"UNETLoader", "CLIPLoader", "VAELoader", "LoadImage", "CreateVideo", "SaveVideo", "ComfyMathExpression",
               "PrimitiveFloat", "MarkdownNote"}


def template_nodes() -> dict:
    """node type -> widget values of the template's subgraph (comfyui-workflow-templates-json)."""
    import importlib.resources
    path = importlib.resources.files("comfyui_workflow_templates_json") / "templates" / f"{TEMPLATE}.json"
    wf = json.loads(path.read_text())
    subgraphs = wf.get("definitions", {}).get("subgraphs", [])
    nodes = [n for g in subgraphs for n in g["nodes"]] + wf["nodes"]
    return {n["type"]: n.get("widgets_values") for n in nodes if n["type"] not in {g["id"] for g in subgraphs}}


def twin(source: str, with_pack: bool, prefix: str) -> dict:
    """The template's graph at tiny size (3 latent frames of 64x64, 3 steps), optionally with the pack wired in as a
    user would: the tracker encodes both prompts, Attach sits between ARVideoI2V and the guider and scheduler, Save
    takes the sampler's LATENT and the decoded frames."""
    g = {
        "1": {"class_type": "TinyCausalWanModel", "inputs": {"source": source, "blocks": 2, "seed": 0}},
        "2": {"class_type": "TinyWanModels", "inputs": {"variant": "t2v", "blocks": 2, "seed": 0}},  # CLIP, VAE
        "18": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3355443}},
        "8": {"class_type": "ARVideoI2V", "inputs": {"model": ["1", 0], "vae": ["2", 2], "start_image": ["18", 0],
                                                      "width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 4831}},
        "12": {"class_type": "SamplerARVideo", "inputs": {"num_frame_per_block": 1}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["8", 0], "scheduler": "simple", "steps": STEPS,
                                                          "denoise": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": PROMPT}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry, static"}},
        "14": {"class_type": "CFGGuider", "inputs": {"model": ["8", 0], "positive": ["4", 0], "negative": ["9", 0],
                                                     "cfg": 1.0}},
        "15": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["14", 0],
                                                                 "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                 "latent_image": ["8", 1]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["2", 2]}},
        "30": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": prefix}},
    }
    if with_pack:
        g["40"] = {"class_type": "WanWeightedTokenTracker",
                   "inputs": {"clip": ["2", 1], "text": PROMPT, "negative_text": "blurry, static"}}
        g["41"] = {"class_type": "WanAttachRecorder", "inputs": {"model": ["8", 0], "token_tracking": ["40", 0],
                                                                "record": "cross attention + sink statistics"}}
        g["13"]["inputs"]["model"] = g["14"]["inputs"]["model"] = ["41", 0]
        g["14"]["inputs"].update(positive=["40", 3], negative=["40", 4])
        g["42"] = {"class_type": "WanSaveAttention", "inputs": {"recorder": ["41", 1], "samples": ["15", 0],
                                                                "images": ["6", 0], "batch_name": prefix}}
    return g


def test_core_causal_template_twin_on_a_real_server(comfy_server):
    """The video_causal_forcing_i2v template's tiny twin through POST /prompt: the same latent with and without the
    pack, the maps saved and read back by AttentionAnalyzer."""
    import safetensors.torch
    from api_util import run_prompt
    from attention_analyzer import AttentionAnalyzer
    import devtools.comfy_ar as car
    source = "b05044d" if car.ar_sources() is not None else "standin-int"
    template = template_nodes()
    assert template["SamplerARVideo"] == [1] and template["CFGGuider"] == [1] and template["BasicScheduler"][0] == "simple"
    for with_pack in (False, True):
        graph = twin(source, with_pack, f"core_causal_{int(with_pack)}")
        assert set(template) - NOT_IN_TWIN <= {n["class_type"] for n in graph.values()}
        entry = run_prompt(comfy_server.url, graph)
        assert entry["status"]["status_str"] == "success", entry["status"]
    latents = [safetensors.torch.load_file(next(comfy_server.output.glob(f"core_causal_{i}_*.latent")))
               ["latent_tensor"] for i in (0, 1)]
    assert latents[0].shape == (1, 16, 3, 8, 8) and torch.equal(latents[0], latents[1])
    saved = [r for out in entry["outputs"].values() for r in out.get("attention_maps", [])]
    assert len(saved) == 1 and saved[0]["status"] == "complete"
    an = AttentionAnalyzer(str(comfy_server.output / "core_causal_1" / "attention_maps"))
    video = an.list_videos()[0]
    assert an.is_causal(video) and an.list_chunks(video) == [0, 1, 2]
    causal = an.summary(video)["causal"]
    assert causal["kv_cache_design"]["design"] == "global cache"
    assert causal["step_pass"] == {"0": "context", "1": "denoise", "2": "denoise", "3": "denoise"}
    assert "wolf" in an.list_tokens(video)
    wolf = an.load_step(video, "wolf", 1)  # the whole video's map: chunks 1 and 2 denoised at step 1
    # [blocks, heads, spatial, pieces]: the 3x4x4 latent grid; frame 0 (the image: context pass only) is absent
    assert wolf.shape[-2] == 48 and np.isfinite(wolf[..., 16:, :]).all() and np.isnan(wolf[..., :16, :]).all()
    assert an.load_metadata(video, "wolf", 1)["absent_frames"] == [0]
    events = an.load_kv_cache_events(video)
    assert [e["key_frames"] for e in events if e["chunk"] == 2 and e["step"] == 1] == [[0, 1, 2]] * 2


def test_kv_log_flags_an_unattended_pinned_slot():
    """A pinned slot whose frame the call does not attend to is flagged (kept, yet given no attention); a pinned
    frame among the keys is not."""
    from wan_capture.capture.kv_cache import KVCacheObserver
    ft, obs = 2, KVCacheObserver()
    g = torch.Generator().manual_seed(0)
    frames = [torch.randn(1, ft, 2, 8, generator=g).bfloat16() for _ in range(4)]
    slot = (0, "cond")
    obs.observe(slot, torch.cat(frames[:2], 1), 2 * ft, 0, ft, ["step 0"] * 2)  # frames 0, 1 written
    # frame 1 is in the pinned slot and attended: nothing flagged
    _, ok = obs.observe(slot, torch.cat([frames[0], frames[1], frames[2]], 1), ft, 2 * ft, ft, ["step 0"],
                        sink_keys=frames[0], pinned_keys=frames[1])
    assert ok["pinned_frames"] == [1] and "unattended_slot_frames" not in ok and "flags" not in ok
    # the cache still pins frame 1, but this call's keys are the sink and frame 2 only
    _, bad = obs.observe(slot, torch.cat([frames[0], frames[2], frames[3]], 1), ft, 3 * ft, ft, ["step 0"],
                         sink_keys=frames[0], pinned_keys=frames[1])
    assert bad["unattended_slot_frames"] == [1] and bad["pinned_frames"] == []
    assert any(f.startswith("pinned slot not attended: the cache holds frames [1]") for f in bad["flags"])
