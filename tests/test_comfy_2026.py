"""The ComfyUI of 2026 around the recorder: other writers of the attention hook (either order), attention modules that
carry their own backend, tensor containers, token streams beside the video's, context windows. On ComfyUI's real
Wan classes where the tree has them (HuMo, S2V, Animate), and on faithful stand-ins of 0.38.1's dispatch
(``devtools/comfy_0381.py``). Outputs are compared bit for bit with the same graph without the recorder; statistics
against float64 recomputed from the q/k each kernel received."""
import importlib
import types

import pytest
import torch

from comfy_harness import (capture_override, conditioning, empty_latent, ksampler, load_comfy, load_model,
                           needs_comfy, tiny_wan_checkpoint)
from reference import naive_probs, naive_scores, naive_sink

pytestmark = needs_comfy
TRACKED = (0, 5, 511)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pack = load_comfy()
    import devtools.comfy_0381 as c381
    ckpt = tiny_wan_checkpoint(str(tmp_path_factory.mktemp("c2026") / "t2v.safetensors"), "t2v", seed=5)
    return pack, c381, ckpt


def attach(pack, model, **plan):
    wc = pack.wan_capture
    rec = wc.Recorder(wc.RecordingPlan(**{"text_positions": TRACKED, "record_sink_stats": True, "store_per_head": True,
                                          "storage_dtype": "float32", **plan}))
    return pack.nodes.comfy_attach.attach_recorder(model, rec), rec


def run(model, cfg=1.0):
    return ksampler(model, conditioning("t2v", 1), conditioning("t2v", 2), empty_latent("t2v"), cfg=cfg)["samples"]


def kernels_run(c381, model):
    """Sample with every kernel call noted: (latent, [notes])."""
    c381.SEEN = []
    try:
        return run(model), c381.SEEN
    finally:
        c381.SEEN = None


def assert_exact(take, seen, blocks=2):
    """Each (self, cross) call of each step and block, as the kernel received it, against the take (cond rows)."""
    assert len(seen) == 3 * blocks * 2, len(seen)
    for n, note in enumerate(seen):
        step, block, kind = n // (2 * blocks), (n // 2) % blocks, ("self", "cross")[n % 2]
        q, k = note["q"], note["k"]
        h = take.model["num_heads"]
        qh, kh = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k))
        if kind == "cross":
            want = naive_probs(naive_scores(qh, kh)[0])[..., list(TRACKED)]
            torch.testing.assert_close(take.cross[(step, "cond")][:, block].double(), want, rtol=1e-4, atol=1e-6)
        else:
            received, key_max, mass, ent, _ = naive_sink(qh, kh, 16)
            st = take.sink[(step, "cond")]
            torch.testing.assert_close(st["received"][:, block].double(), received, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st["frame_mass"][:, block].double(), mass, rtol=1e-4, atol=1e-6)


# -- hook_order: writers of the hook before or after Attach ------------------------------------------------------
WRITERS = {"model_attention_backend": lambda c381, m: c381.model_attention_backend(m),
           "sparse_attention": lambda c381, m: c381.sparse_attention(m)}


@pytest.mark.parametrize("order", ["after", "before"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_hook_order_another_writer_records_and_keeps_the_output(env, writer, order):
    pack, c381, ckpt = env
    with c381.emulate():
        base = c381.wan_patcher(ckpt)
        node = WRITERS[writer]
        plain, plain_seen = kernels_run(c381, node(c381, base))
        if order == "after":  # Attach, then the other node: it replaces (or chains over) the recorder's override
            model, rec = attach(pack, base)
            model = node(c381, model)
        else:
            model, rec = attach(pack, node(c381, base))
        out, seen = kernels_run(c381, model)
    assert torch.equal(out, plain), "recording changed the sampled latent"
    assert [s["kernel"] for s in seen] == [s["kernel"] for s in plain_seen]  # the same kernel for every call
    assert c381.INT8 in {s["kernel"] for s in seen}
    take = rec.latest
    assert take.status == "complete" and take.steps == [0, 1, 2] and not take.skipped  # each call once
    assert_exact(take, seen)
    assert any("another attention override" in k for k in take.log.sampling["attention"]["kernels"])


def test_hook_order_two_graphs_sharing_one_attach_node_keep_their_own_kernels(env):
    """The Attach node's MODEL sampled with a backend node after it, then on its own: the second sampling runs the
    model's own kernel (the first graph's backend never leaks into it)."""
    pack, c381, ckpt = env
    with c381.emulate():
        base = c381.wan_patcher(ckpt)
        plain, plain_seen = kernels_run(c381, base)
        model, rec = attach(pack, base)
        kernels_run(c381, c381.model_attention_backend(model))
        out, seen = kernels_run(c381, model)
    assert torch.equal(out, plain) and {s["kernel"] for s in seen} == {"global"}
    assert_exact(rec.latest, seen)


def test_hook_order_reasserted_at_prepare_state_with_model_options(env):
    """ComfyUI 2026 calls ON_PREPARE_STATE with the evaluation's model_options: the recorder goes back on top of an
    override put there after sampling started, calling it."""
    pack, c381, ckpt = env
    model, rec = attach(pack, load_model(ckpt))
    (callback,) = [c for cs in model.callbacks["on_prepare_state"].values() for c in cs]
    calls = []
    theirs = lambda func, *a, **kw: calls.append(1) or func(*a, **kw)  # noqa: E731
    options = {"transformer_options": {"optimized_attention_override": theirs}}
    callback(model, torch.tensor([1.0]), options)
    ours = options["transformer_options"]["optimized_attention_override"]
    assert ours is not theirs and ours in rec_dispatch(model).installed
    callback(model, torch.tensor([1.0]), options)  # idempotent once on top
    assert options["transformer_options"]["optimized_attention_override"] is ours
    q = torch.randn(1, 4, 256)
    ours(lambda *a, **kw: "kernel", q, q, q, 2, transformer_options={})
    assert calls == [1]  # the override under the recorder computes the call
    callback(model, torch.tensor([1.0]))  # 0.3.64's call (no model_options) changes nothing
    assert options["transformer_options"]["optimized_attention_override"] is ours


def rec_dispatch(model):
    override = model.model_options["transformer_options"]["optimized_attention_override"]
    return override.__closure__[[c.cell_contents.__class__.__name__ for c in override.__closure__].index("Dispatch")
                                ].cell_contents


# -- module_attention: attention modules with their own backend, tensor containers ---------------------------------
def test_module_attention_per_module_backends_keep_the_output_and_containers_are_not_held(env):
    pack, c381, ckpt = env
    backends = {"blocks.0.self_attn", "blocks.1.cross_attn"}
    with c381.emulate():
        base = c381.wan_patcher(ckpt, backends)
        dm = base.model.diffusion_model
        assert dm.blocks[0].self_attn.comfy_attention.function is not None
        plain, plain_seen = kernels_run(c381, base)
        model, rec = attach(pack, base)
        out, seen = kernels_run(c381, model)
    assert torch.equal(out, plain), "recording changed the sampled latent"
    kernels = [s["kernel"] for s in seen]
    assert kernels == [s["kernel"] for s in plain_seen]
    assert kernels[:4] == [c381.INT8, "global", "global", c381.INT8]  # step 0: block 0 self, cross; block 1 ...
    # the containers' tensors are freed when the kernel takes them, as on the model's own path
    assert [s["held"] for s in seen] == [s["held"] for s in plain_seen]
    assert not any(s["held"] for s in seen if s["held"] is not None)
    take = rec.latest
    assert take.status == "complete" and not take.skipped
    assert_exact(take, seen)
    assert any("own backend" in k for k in take.log.sampling["attention"]["kernels"])


def test_module_attention_global_container_path_is_taken_whole(env):
    """Without module backends, containers go to the global kernel's container path when it has one."""
    pack, c381, ckpt = env
    with c381.emulate():
        import comfy.ldm.modules.attention as attention
        attention.optimized_attention.container_function = c381._takes_containers("global", False)
        try:
            base = c381.wan_patcher(ckpt)
            plain, plain_seen = kernels_run(c381, base)
            model, rec = attach(pack, base)
            out, seen = kernels_run(c381, model)
        finally:
            attention.optimized_attention.container_function = None
    assert torch.equal(out, plain) and all(s["held"] is False for s in seen)
    assert_exact(rec.latest, seen)


# -- extra_streams: tokens beside the video's ---------------------------------------------------------------------
def variant_patcher(ckpt, model_class: str):
    """A tiny ComfyUI Wan model of ``comfy.model_base.<model_class>`` with the checkpoint's weights (new layers
    random)."""
    import comfy.model_base
    import comfy.model_patcher
    plain = load_model(ckpt)
    model = getattr(comfy.model_base, model_class)(plain.model.model_config, device=torch.device("cpu"))
    dm = model.diffusion_model
    sd = plain.model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name in sd:
                p.copy_(sd[name])
            else:
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight") or "norm" in name and name.endswith("weight")
                        else torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def humo_conditioning(seed, frames=3):
    g = torch.Generator().manual_seed(seed)
    c = conditioning("t2v", seed)
    c[0][1].update(reference_latents=[torch.randn(1, 16, 1, 8, 8, generator=g)],
                   audio_embed=torch.randn(1, frames, 8, 5, 1280, generator=g) * 0.1)
    return c


def test_extra_streams_humo_reference_recorded_exactly_and_labelled(env, tmp_path):
    pack, c381, ckpt = env
    base = variant_patcher(ckpt, "WAN21_HuMo")
    pos, neg = humo_conditioning(1), humo_conditioning(2)
    plain = ksampler(base, pos, neg, empty_latent("t2v"), cfg=1.0)["samples"]
    spy, calls = capture_override(base)
    model, rec = attach(pack, spy)
    out = ksampler(model, pos, neg, empty_latent("t2v"), cfg=1.0)["samples"]
    assert torch.equal(out, plain)
    take = rec.latest
    assert take.status == "complete" and not take.skipped
    assert take.grid.as_list() == [4, 4, 4]  # 3 video frames and the reference after them
    assert take.time_layout.trail == 1 and take.time_layout.trail_stream == "HuMo reference frames"
    assert "cross_audio" in take.not_recorded
    assert len(calls) == 3 * 2 * 3  # self, text cross, audio cross per block and step
    for n in range(0, len(calls), 3):
        step, block = n // 6, (n // 3) % 2
        (q, k, h, _), (cq, ck, _, _) = calls[n], calls[n + 1]
        qh, kh, cqh, ckh = (t.reshape(1, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, cq, ck))
        assert q.shape[1] == 64  # the reference's 16 tokens are keys and queries of self-attention
        received, _, mass, _, _ = naive_sink(qh, kh, 16)
        st = take.sink[(step, "cond")]
        torch.testing.assert_close(st["received"][:, block].double(), received, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st["frame_mass"][:, block].double(), mass, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(take.cross[(step, "cond")][:, block].double(),
                                   naive_probs(naive_scores(cqh, ckh)[0])[..., list(TRACKED)], rtol=1e-4, atol=1e-6)
    # saved: the summary names the stream; the views show the video's 3 frames (9 decoded), not the reference
    import folder_paths
    folder_paths.set_output_directory(str(tmp_path))
    save = importlib.import_module(f"{pack.__name__}.nodes.save_node").SaveAttentionMaps.PREPARE_CLASS_CLONE({})
    save.execute(recorder=rec, samples={"samples": out}, batch_name="humo")
    from attention_analyzer import AttentionAnalyzer
    an = AttentionAnalyzer(str(tmp_path / "humo" / "attention_maps"))
    summary = an.summary(an.list_videos()[0])
    assert summary["context_latent_frames"] == [0, 1] and summary["context_streams"] == ["", "HuMo reference frames"]
    assert "cross_audio" in summary["not_recorded"]
    images = torch.rand(9, 64, 64, 3)
    heat = importlib.import_module(f"{pack.__name__}.nodes.view_nodes").AttentionOverlay.PREPARE_CLASS_CLONE({})
    frames = heat.execute(recorder=rec, samples={"samples": out}, images=images, token="pos005").args[0]
    assert tuple(frames.shape) == (9, 64, 64, 3)


def test_extra_streams_unknown_stream_refused_at_the_first_call(env):
    """Bernini's context_latents (0.38.1): tokens after the video's that no layout explains: the first call stops
    with an error naming the model and the input; the take is partial, nothing labelled as video."""
    pack, c381, ckpt = env
    import comfy.patcher_extension as pe
    with c381.emulate():
        base = c381.wan_patcher(ckpt)

        def with_context_latents(executor, *args, **kwargs):  # as 0.38.1's extra_conds hand them to the DiT
            return executor(*args, context_latents=[torch.randn(1, 16, 1, 8, 8)], **kwargs)
        base.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "bernini_test", with_context_latents)
        model, rec = attach(pack, base)
        with pytest.raises(ValueError, match=r"WAN21 / WanModel: its self attention carries 64 query tokens, but the "
                                             r"latent grid .*3x4x4.* has 48: \+16 tokens .*context_latents"):
            run(model)
    assert rec.latest.status == "partial"


@pytest.mark.parametrize("model_class,why", [("WAN22_S2V", "S2V calls its blocks without transformer_options"),
                                             ("WAN22_Animate", "reference image's frames in front")])
def test_extra_streams_models_refused_at_attach(env, model_class, why):
    pack, c381, ckpt = env
    import comfy.model_base
    if not hasattr(comfy.model_base, model_class):
        pytest.skip(f"this ComfyUI has no {model_class}")
    base = variant_patcher(ckpt, model_class)
    node = importlib.import_module(f"{pack.__name__}.nodes.attach_node").AttachAttentionRecorder
    with pytest.raises(TypeError, match=f"does not support {model_class} / .*{why}"):
        node.execute(model=base, record="sink statistics")


def test_extra_streams_blocks_without_transformer_options_refused_at_the_first_evaluation(env):
    """A model whose blocks get no transformer_options (as S2V's): no call reaches the recorder, and the first
    evaluation says so, naming the model, instead of a save that later says 'check the plan'."""
    pack, c381, ckpt = env
    import comfy.ldm.wan.model as wan
    base = load_model(ckpt)
    dm = base.model.diffusion_model

    def forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):
        return wan.WanModel.forward_orig(self, x, t, context, clip_fea=clip_fea, freqs=freqs, transformer_options={})
    future = type("FutureWanModel", (wan.WanModel,), {"forward_orig": forward_orig, "__module__": "comfy.ldm.wan.future"})
    original = dm.__class__
    dm.__class__ = future
    try:
        model, rec = attach(pack, base)
        with pytest.raises(TypeError, match="FutureWanModel: none of its attention calls reached Attach Attention"):
            run(model)
    finally:
        dm.__class__ = original


# -- context_windows -----------------------------------------------------------------------------------------------
def test_context_windows_refused_clearly(env):
    pack, c381, ckpt = env
    from devtools.tiny_comfy import core_nodes
    nodes = core_nodes("nodes_context_windows")
    base = load_model(ckpt)
    import inspect
    extra = {"freenoise": False} if "freenoise" in inspect.signature(nodes.WanContextWindowsManualNode.execute).parameters \
        else {}  # hiddenswitch 0.12.1's node has a freenoise input
    windowed = nodes.WanContextWindowsManualNode.execute(base, 5, 1, "standard_static", 1, False, "pyramid",
                                                         **extra).args[0]
    plain = run(windowed)  # the tree samples it in windows of 2 latent frames
    model, rec = attach(pack, windowed)
    with pytest.raises(ValueError, match="cannot record a sampling with context windows"):
        run(model)
    assert rec.latest.status == "partial" and plain.shape[2] == 3


# -- current_comfyui: the pack on each ComfyUI tree the tests find ---------------------------------------------------
def test_current_comfyui_starts_without_an_error_line_and_lists_every_node(comfy_server):
    """On 0.3.64 and on hiddenswitch 0.12.1 (make test runs both where found): the server's start log has no ERROR
    line from the pack, and /object_info lists every node of the pack under its display name."""
    from api_util import get
    log = open(comfy_server.log, encoding="utf-8", errors="replace").read()
    ours = [line for line in log.splitlines() if "ERROR" in line and ("wan_attention_capture" in line
                                                                      or "wan_capture" in line)]
    assert not ours, ours
    info = get(comfy_server.url + "/object_info")
    names = {"WanAttachRecorder": "Attach Attention Recorder", "WanWeightedTokenTracker": "Weighted Token Tracker",
             "WanSaveAttention": "Save Attention Maps", "WanAttentionOverlay": "Attention Heatmap"}
    for node_id, display in names.items():
        assert info[node_id]["display_name"] == display
    assert "TinyCausalWanModel" in info and "SamplerARVideo" in info  # the test helpers (and 2026's AR nodes)
