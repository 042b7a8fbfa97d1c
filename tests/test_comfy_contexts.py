"""What each branch and each context attends to, inside real ComfyUI with tiny models: the negative prompt's words in
the uncond rows, Chinese/Japanese prompts, the end token and padding, i2v image context, VACE reference frames."""
import importlib
import io
import json

import numpy as np
import pytest
import torch

from comfy_harness import (capture_override, conditioning, empty_latent, ksampler, load_comfy, load_model,
                           needs_comfy, recording_options, tiny_clip, tiny_spiece_model, tiny_vae, tiny_wan_checkpoint)
from reference import naive_probs, naive_scores

pytestmark = needs_comfy

MIXED = ["一朵美丽的红花在树旁", "一只猫坐在窗户旁边", "桜の花が風に揺れる", "猫が窓のそばに座っている",
         "a beautiful flower near a tree", "色调艳丽，过曝，静态，细节模糊不清", "红花和绿树", "美しい花と木",
         "a red flower and 绿树 in the garden"]


@pytest.fixture(scope="module")
def pack():
    return load_comfy()


def node(pack, module, name):
    return getattr(importlib.import_module(f"{pack.__name__}.nodes.{module}"), name)


def heads_of(x, heads):
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def mixed_spiece() -> bytes:
    """A sentencepiece model trained here on mixed Chinese, Japanese and English text (umt5's special ids)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(MIXED * 20), model_writer=buf, vocab_size=120,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cjk_clip(tmp_path_factory, pack):
    return tiny_clip(mixed_spiece(), str(tmp_path_factory.mktemp("cjk")))


def context_ids(clip, text):
    """ComfyUI's own token ids of the context the model attends to."""
    return [t[0] for t in clip.tokenize(text, return_word_ids=True)["umt5xxl"][0]]


def test_cjk_weighted_and_listed_words_point_at_comfyui_token_ids(pack, cjk_clip):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=mixed_spiece())
    tracker = node(pack, "tracker_node", "WeightedTokenTracker")
    cases = [("一朵美丽的(红花:1.5)在树旁", "weighted", "", {"红花": "红花"}),
             ("桜の(花:1.5)が風に揺れる", "weighted", "", {"花": "花"}),
             ("一朵美丽的红花在树旁", "listed", "红花, 树", {"红花": "红花", "树": "树"}),
             ("猫が窓のそばに座っている", "listed", "窓", {"窓": "窓"}),
             ("a red flower and 绿树 in the garden", "both", "绿树", {"绿树": "绿树"}),
             ("a (flower:1.5) 和 绿树", "both", "绿树", {"flower": "flower", "绿树": "绿树"})]
    for text, mode, words, expect in cases:
        spec = tracker.execute(clip=cjk_clip, text=text, mode=mode, words=words).args[0]
        ids = context_ids(cjk_clip, text)
        assert sorted(w.label for w in spec.words) == sorted(expect), (text, [w.label for w in spec.words])
        for w in spec.words:
            assert list(w.token_ids) == [ids[p] for p in w.positions], (text, w)
            # the pieces at those positions spell the word (the word marker aside)
            spelled = "".join(sp.id_to_piece(ids[p]) for p in w.positions).replace("\u2581", "")
            assert expect[w.label] in spelled and len(spelled) <= len(expect[w.label]) + 2, (text, w, spelled)
    with pytest.raises(ValueError, match="full-width"):
        tracker.execute(clip=cjk_clip, text="一朵美丽的（红花：1.5）在树旁", mode="weighted")
    with pytest.raises(ValueError, match="'蓝' is not in the prompt"):
        tracker.execute(clip=cjk_clip, text="一朵美丽的红花在树旁", mode="listed", words="蓝")


def test_special_tokens_end_and_padding_recorded_exactly(pack, tmp_path):
    """<end> is the end token's column; <padding> one column: the attention summed over every padding position."""
    import nodes
    clip = tiny_clip(tiny_spiece_model(), str(tmp_path))
    text = "a beautiful (flower:2.5) near a tree"
    spec, prompt, _ = node(pack, "tracker_node", "WeightedTokenTracker").execute(
        clip=clip, text=text, mode="both", words="<end>, <padding>").args[:3]
    ids = context_ids(clip, text)
    end, pad = spec.word("end"), spec.word("padding")
    assert len(end.positions) == 1 and ids[end.positions[0]] == 1  # umt5's </s>
    assert all(ids[p] == 0 for p in pad.positions) and pad.positions[-1] == 511 and pad.reduce == "sum"
    assert pad.positions[0] == end.positions[0] + 1
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    spy, calls = capture_override(base)
    opts = recording_options(pack, storage_dtype="float32", store_per_head=True)
    model, rec = node(pack, "attach_node", "AttachAttentionRecorder").execute(
        model=spy, token_tracking=spec, options=opts).args
    pos, neg = nodes.CLIPTextEncode().encode(clip, prompt)[0], nodes.CLIPTextEncode().encode(clip, "")[0]
    ksampler(model, pos, neg, empty_latent("t2v"))
    take = rec.latest
    q, k, heads, order = calls[1]  # step 0, block 0, text cross-attention
    r = order.index(0)
    probs = naive_probs(naive_scores(heads_of(q, heads)[r:r + 1], heads_of(k, heads)[r:r + 1])[0])
    got = take.cross[(0, "cond")][:, 0]
    assert got.shape[-1] == len(spec.positions) + 1  # the padding's ~500 positions kept as one column
    torch.testing.assert_close(got[..., spec.columns(pad)].double(), probs[..., list(pad.positions)].sum(-1, keepdim=True),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[..., spec.columns(end)].double(), probs[..., list(end.positions)],
                               rtol=1e-4, atol=1e-6)
    overlay = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    assert overlay.execute(recorder=rec, samples=ksampler(model, pos, neg, empty_latent("t2v")),
                           token="padding").args[0].shape[0] == 9


def test_negative_prompt_words_in_uncond_rows_exact_saved_and_drawn(pack, tmp_path):
    """CFG batch with a negative prompt whose words differ: every uncond map is the float64 attention at the
    negative prompt's own positions, saved under uncond/ with the negative prompt's words and metadata."""
    import folder_paths
    import nodes
    from wan_capture import AttentionAnalyzer
    folder_paths.set_output_directory(str(tmp_path / "output"))
    clip = tiny_clip(tiny_spiece_model(), str(tmp_path))
    tracker = node(pack, "tracker_node", "WeightedTokenTracker")
    spec, prompt, _ = tracker.execute(clip=clip, text="a beautiful (flower:2.5) near a tree").args[:3]
    negative, neg_prompt, _ = tracker.execute(clip=clip, text="the (snow:1.4) falls on a dark (river:1.3) mill",
                                              mode="both", words="mill").args[:3]
    assert {w.label for w in negative.words} == {"snow", "river", "mill"}
    assert set(negative.positions) != set(spec.positions)
    attach = node(pack, "attach_node", "AttachAttentionRecorder")
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    with pytest.raises(ValueError, match="negative_text"):  # uncond maps without the negative prompt's words
        attach.execute(model=base, token_tracking=spec, options=recording_options(pack, branch="both"))
    # sink statistics of uncond need no words
    attach.execute(model=base, token_tracking=spec, record="sink statistics", options=recording_options(pack, branch="uncond"))
    pos, neg = nodes.CLIPTextEncode().encode(clip, prompt)[0], nodes.CLIPTextEncode().encode(clip, neg_prompt)[0]
    plain = ksampler(base, pos, neg, empty_latent("t2v", batch=2))
    spy, calls = capture_override(base)
    opts = recording_options(pack, branch="both", storage_dtype="float32", store_per_head=True)
    model, rec = attach.execute(model=spy, token_tracking=spec, negative_tracking=negative, options=opts).args
    out = ksampler(model, pos, neg, empty_latent("t2v", batch=2))
    assert torch.equal(out["samples"], plain["samples"]), "recording changed the sampled latent"
    take = rec.latest
    cross_calls = [c for i, c in enumerate(calls) if i % 2 == 1]  # self, cross per block
    assert len(cross_calls) == 3 * 2
    for i, (q, k, heads, order) in enumerate(cross_calls):
        step, block = i // 2, i % 2
        first = order.index(1) * 2  # ComfyUI: 1 = uncond, rows grouped per branch (2 videos each)
        for b in range(2):
            r = first + b
            probs = naive_probs(naive_scores(heads_of(q, heads)[r:r + 1], heads_of(k, heads)[r:r + 1])[0])
            got = take.cross[(step, "uncond")][b, block]
            for w in negative.words:
                torch.testing.assert_close(got[..., negative.columns(w)].double(), probs[0][..., list(w.positions)],
                                           rtol=1e-4, atol=1e-6)
    save = node(pack, "save_node", "SaveAttentionMaps").PREPARE_CLASS_CLONE({})
    path = save.execute(recorder=rec, samples=out, batch_name="neg").args[0]
    an = AttentionAnalyzer(str(tmp_path / "output" / path))
    video = an.list_videos()[1]
    assert an.list_tokens(video) == ["flower"] and an.list_tokens(video, "uncond") == ["mill", "river", "snow"]
    meta = an.load_metadata(video, "snow", 2, branch="uncond")
    assert meta["prompt"] == "the snow falls on a dark river mill" and meta["branch"] == "uncond"
    assert meta["token_positions"] == list(negative.word("snow").positions)
    np.testing.assert_array_equal(an.load_step(video, "snow", 2, branch="uncond"),
                                  take.cross[(2, "uncond")][1][..., negative.columns(negative.word("snow"))].numpy())
    summary = an.summary(video)
    assert [t["label"] for t in summary["negative_tokens"]] == ["snow", "river", "mill"]
    overlay = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    live = overlay.execute(recorder=rec, samples=out, branch="uncond", token="river", batch_index=1).args[0]
    loaded = node(pack, "source_node", "LoadAttentionMaps").execute(attention_maps_path=path).args[0]
    saved = overlay.execute(recorder=loaded, branch="uncond", token="river", batch_index=1).args[0]
    assert (live - saved).abs().max() < 1e-3
    with pytest.raises(ValueError, match="no tracked word 'flower' of the negative prompt"):
        overlay.execute(recorder=rec, samples=out, branch="uncond", token="flower")


def test_image_context_statistics_equal_float64_from_captured_q_k(pack, tmp_path):
    """i2v with CLIP vision (257 image tokens): the image share and each image token's received attention equal a
    recomputation from the q/k the model's own calls carried; the sampled latent is bit-identical."""
    import folder_paths
    from wan_capture import AttentionAnalyzer
    folder_paths.set_output_directory(str(tmp_path / "output"))
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "i2v.safetensors"), "i2v"))
    pos, neg = conditioning("i2v", 1), conditioning("i2v", 2)
    latent = empty_latent("i2v")
    plain = ksampler(base, pos, neg, latent)
    spy, calls = capture_override(base)
    opts = recording_options(pack, text_positions="0,5", image_context=True, storage_dtype="float32",
                             store_per_head=True)
    model, rec = node(pack, "attach_node", "AttachAttentionRecorder").execute(model=spy, options=opts).args
    out = ksampler(model, pos, neg, latent)
    assert torch.equal(out["samples"], plain["samples"]), "recording changed the sampled latent"
    take = rec.latest
    assert len(calls) == 3 * 2 * 3  # steps x blocks x (self, image cross, text cross)
    for i in range(0, len(calls), 3):
        step, block = i // 6, (i // 3) % 2
        (qi, ki, heads, order), (qt, kt, _, _) = calls[i + 1], calls[i + 2]
        assert ki.shape[1] == 257 and kt.shape[1] == 512
        r = order.index(0)
        s_img, _ = naive_scores(heads_of(qi, heads)[r:r + 1], heads_of(ki, heads)[r:r + 1])
        s_txt, _ = naive_scores(heads_of(qt, heads)[r:r + 1], heads_of(kt, heads)[r:r + 1])
        share = torch.sigmoid(torch.logsumexp(s_img, -1) - torch.logsumexp(s_txt, -1))  # [1, H, L]
        received = naive_probs(s_img).mean(dim=2)  # [1, H, 257]
        st = take.image[(step, "cond")]
        torch.testing.assert_close(st["share"][:, block].double(), share, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st["received"][:, block].double(), received, rtol=1e-4, atol=1e-7)
    save = node(pack, "save_node", "SaveAttentionMaps").PREPARE_CLASS_CLONE({})
    path = save.execute(recorder=rec, samples=out, batch_name="i2v").args[0]
    an = AttentionAnalyzer(str(tmp_path / "output" / path))
    video = an.list_videos()[0]
    assert an.list_image_context_steps(video) == [0, 1, 2]
    np.testing.assert_array_equal(an.load_image_context(video, 1, "share"), take.image[(1, "cond")]["share"][0].numpy())
    np.testing.assert_array_equal(an.load_image_context(video, 2, "received"),
                                  take.image[(2, "cond")]["received"][0].numpy())
    view = node(pack, "view_nodes", "AttentionStatisticOverlay").PREPARE_CLASS_CLONE({})
    img = view.execute(recorder=rec, samples=out, statistic="image share (i2v)").args[0]
    assert img.shape[0] == 9 and float(img.std()) > 0


def test_vace_reference_frame_is_left_out_of_the_overlay_after_trim(pack, tmp_path):
    """VACE with a reference image: the model sees one more latent frame in front; after TrimVideoLatent the
    overlay's frame i is the map of the latent frame that decodes to frame i, and the metadata says so."""
    import folder_paths
    import nodes
    from devtools.tiny_comfy import core_nodes
    TrimVideoLatent, WanVaceToVideo = core_nodes("nodes_wan").TrimVideoLatent, core_nodes("nodes_wan").WanVaceToVideo
    from wan_capture import AttentionAnalyzer
    from wan_capture.grid import latent_frame_of
    from wan_capture.views.masks import attention_masks
    from wan_capture.recording import MemoryRecording
    from wan_capture.views.maps import token_maps
    folder_paths.set_output_directory(str(tmp_path / "output"))
    base = load_model(tiny_wan_checkpoint(str(tmp_path / "vace.safetensors"), "vace"))
    assert type(base.model.diffusion_model).__name__ == "VaceWanModel"
    vae = tiny_vae("t2v")
    reference = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    pos, neg, latent, trim = WanVaceToVideo.execute(conditioning("t2v", 1), conditioning("t2v", 2), vae, 64, 64, 9, 1,
                                                    1.0, reference_image=reference).args
    assert trim == 1 and latent["samples"].shape[2] == 4  # 3 video latent frames + the reference in front
    plain = ksampler(base, pos, neg, latent)
    model, rec = node(pack, "attach_node", "AttachAttentionRecorder").execute(
        model=base, options=recording_options(pack, text_positions="0,3", storage_dtype="float32")).args
    out = ksampler(model, pos, neg, latent)
    assert torch.equal(out["samples"], plain["samples"]), "recording changed the sampled latent"
    take = rec.latest
    assert take.grid.frames == 4 and take.time_layout.reference == 1
    images = vae.decode(TrimVideoLatent.execute(out, trim).args[0]["samples"])
    images = images.reshape(-1, *images.shape[-3:])
    assert images.shape[0] == 9
    # the mask node decides per latent cell: its frame i must be latent frame 1 + (the frame that decodes to i)
    mask = node(pack, "mask_node", "AttentionMask").execute(recorder=rec, samples=out, images=images,
                                                            method="top_percent", value=30.0).args[0]
    maps = token_maps(MemoryRecording(take), "pos000")[0]  # [4, h, w] over every latent frame the model saw
    per_latent = attention_masks(maps, "top_percent", 30.0)
    for i in range(9):
        want = per_latent[1 + latent_frame_of(i, 3)]
        want = np.repeat(np.repeat(want, 16, axis=0), 16, axis=1)
        assert np.array_equal(mask[i].numpy() > 0.5, want), i
    assert not np.array_equal(per_latent[0], per_latent[1])  # the shift would show
    # untrimmed frames (13 = the reference decoded too) are understood; anything else is an error
    overlay = node(pack, "view_nodes", "AttentionOverlay").PREPARE_CLASS_CLONE({})
    assert overlay.execute(recorder=rec, samples=out, images=torch.rand(13, 64, 64, 3)).args[0].shape[0] == 13
    with pytest.raises(ValueError, match="time mismatch: 11 frames .* 9 after TrimVideoLatent"):
        overlay.execute(recorder=rec, samples=out, images=torch.rand(11, 64, 64, 3))
    path = node(pack, "save_node", "SaveAttentionMaps").PREPARE_CLASS_CLONE({}).execute(
        recorder=rec, samples=out, batch_name="vace").args[0]
    an = AttentionAnalyzer(str(tmp_path / "output" / path))
    summary = an.summary(an.list_videos()[0])
    assert summary["reference_latent_frames"] == 1 and summary["video_frames"] == 9
    assert an.get_spatial_attention_map(an.list_videos()[0], "pos000", step=0).shape == (1, 9, 64, 64)
    json.dumps(summary)


def test_a14b_experts_are_named_per_step(pack, tmp_path):
    """Two Attach nodes sharing a recorder over two different models (Wan 2.2 A14B's high and low noise experts,
    which ComfyUI runs as WAN21): the metadata names the experts and which one evaluated each step."""
    import folder_paths
    from comfy_harness import ksampler_advanced
    from wan_capture import AttentionAnalyzer
    folder_paths.set_output_directory(str(tmp_path / "output"))
    attach = node(pack, "attach_node", "AttachAttentionRecorder")
    high_model = load_model(tiny_wan_checkpoint(str(tmp_path / "high.safetensors"), seed=0))
    low_model = load_model(tiny_wan_checkpoint(str(tmp_path / "low.safetensors"), seed=1))
    high, rec = attach.execute(model=high_model, options=recording_options(pack, text_positions="2")).args
    low, _ = attach.execute(model=low_model, share_recorder=rec).args
    pos, neg = conditioning("t2v", 1), conditioning("t2v", 2)
    first = ksampler_advanced(high, pos, neg, empty_latent("t2v"), 0, 2, 4, leftover=True)
    second = ksampler_advanced(low, pos, neg, first, 2, 10000, 4, leftover=False, add_noise=False)
    take = rec.find(pack.wan_capture.fingerprint(second["samples"]))
    assert take.experts() == [{"expert": "high_noise", "steps": [0, 1]}, {"expert": "low_noise", "steps": [2, 3]}]
    path = node(pack, "save_node", "SaveAttentionMaps").PREPARE_CLASS_CLONE({}).execute(
        recorder=rec, samples=second, batch_name="a14b").args[0]
    an = AttentionAnalyzer(str(tmp_path / "output" / path))
    video = an.list_videos()[0]
    summary = an.summary(video)
    assert summary["model_family"] == "wan2.2_a14b" and summary["model"]["model_type"] == "WAN21"
    assert [an.load_metadata(video, "pos002", s)["expert"] for s in range(4)] == ["high_noise"] * 2 + ["low_noise"] * 2
    same, rec2 = attach.execute(model=high_model, options=recording_options(pack, text_positions="2")).args
    again, _ = attach.execute(model=high_model.clone(), share_recorder=rec2).args  # the same weights: no experts
    out = ksampler_advanced(again, pos, neg, ksampler_advanced(same, pos, neg, empty_latent("t2v"), 0, 2, 4, True),
                            2, 10000, 4, leftover=False, add_noise=False)
    assert rec2.find(pack.wan_capture.fingerprint(out["samples"])).experts() == []
