"""Token tracking against ComfyUI's real WanT5Tokenizer (sentencepiece trained here) and end to end in KSampler."""
import importlib

import pytest
import torch

from comfy_harness import (empty_latent, ksampler, load_comfy, load_model, needs_comfy, tiny_clip, tiny_spiece_model,
                           recording_options, tiny_wan_checkpoint)
from reference import naive_probs, naive_scores

pytestmark = needs_comfy


@pytest.fixture(scope="module")
def pack():
    return load_comfy()


@pytest.fixture(scope="module")
def clip(pack, tmp_path_factory):
    return tiny_clip(tiny_spiece_model(), str(tmp_path_factory.mktemp("te")))


def tracker(pack):
    return importlib.import_module(pack.__name__ + ".nodes.tracker_node")


CASES = [
    # prompt, mode, words, expected [(label, weight)]
    ("a beautiful (flower:2.5) near a tree", "weighted", "", [("flower", 2.5)]),
    ("a ((red flower:1.2):1.1) by the sea", "weighted", "", [("red", 1.2), ("flower", 1.2)]),
    ("a (flower) in a garden", "weighted", "", [("flower", 1.1)]),
    (r"a \(flower\) in a garden", "listed", "flower", [("flower", 1.0)]),
    ("embedding:foo a (flower:1.3)", "weighted", "", [("flower", 1.3)]),
    ("A Flowerpot, a (Teapot:1.4) and a Sunflower!", "listed", "flowerpot, sunflower",
     [("flowerpot", 1.0), ("sunflower", 1.0)]),
    ("a Flower near a flower, and FLOWER.", "listed", "flower", [("flower", 1.0), ("flower_2", 1.0), ("flower_3", 1.0)]),
    ("a (tree:1.5) next to a flower", "both", "flower", [("tree", 1.5), ("flower", 1.0)]),
]


@pytest.mark.parametrize("prompt,mode,words,expected", CASES)
def test_positions_point_at_comfyui_token_ids(pack, clip, prompt, mode, words, expected):
    spec = tracker(pack).track_prompt(clip, prompt, mode, words)
    assert [(w.label, round(w.weight, 6)) for w in spec.words] == expected
    tokens = clip.tokenize(prompt, return_word_ids=True)["umt5xxl"][0]
    assert spec.context_length == len(tokens) == 512
    vocab = {v: k for k, v in getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer.get_vocab().items()}
    for w in spec.words:
        assert list(w.token_ids) == [tokens[p][0] for p in w.positions]
        assert all(abs(tokens[p][1] - w.weight) < 1e-6 for p in w.positions)
        assert "".join(vocab[t] for t in w.token_ids).replace("\u2581", "").lower() == w.word
        assert w.positions == tuple(range(w.positions[0], w.positions[-1] + 1))  # contiguous pieces


def test_multi_piece_word_keeps_every_piece(pack, clip):
    spec = tracker(pack).track_prompt(clip, "a Flowerpot here", "listed", "flowerpot")
    w = spec.words[0]
    assert len(w.token_ids) >= 2 and "".join(w.token_texts).replace("\u2581", "") == "Flowerpot"


def test_missing_listed_word_names_the_words_present(pack, clip):
    with pytest.raises(ValueError, match="'rose' is not in the prompt .* its words are: a, beautiful, flower"):
        tracker(pack).track_prompt(clip, "a beautiful flower", "listed", "rose")


def test_node_expands_templates_and_picks_a_variation(pack, clip):
    node = tracker(pack).WeightedTokenTracker
    text = "a beautiful [(flower:2.5) near a tree|(tree:3) next to a flower]"
    out = node.execute(clip=clip, text=text, mode="weighted", words="", variation=1)
    spec, prompt, prompt_id = out.args[:3]
    assert prompt == "a beautiful (tree:3) next to a flower" and prompt_id == "prompt_001" == spec.prompt_id
    assert [(w.label, w.weight) for w in spec.words] == [("tree", 3.0)]
    with pytest.raises(ValueError, match="variation 2 does not exist"):
        node.execute(clip=clip, text=text, mode="weighted", words="", variation=2)
    with pytest.raises(ValueError, match="unclosed"):
        node.execute(clip=clip, text="a [b|c", mode="weighted", words="", variation=0)


def test_tracked_word_cross_attention_end_to_end(pack, clip, tmp_path):
    """CLIPTextEncode -> KSampler with the recorder fed by the tracker: maps equal a recomputation from q and k."""
    import nodes
    attach_node = importlib.import_module(pack.__name__ + ".nodes.attach_node").AttachAttentionRecorder
    model = load_model(tiny_wan_checkpoint(str(tmp_path / "t2v.safetensors")))
    spec, prompt, _ = tracker(pack).WeightedTokenTracker.execute(
        clip=clip, text="a beautiful (flower:2.5) near a (tree:1.5)", mode="weighted", words="", variation=0).args[:3]
    positive = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    calls = []
    spy = model.clone()

    def override(func, *args, **kwargs):
        calls.append((args[0].clone(), args[1].clone(), kwargs["heads"], tuple(kwargs["transformer_options"]["cond_or_uncond"])))
        return func(*args, **kwargs)
    spy.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    opts = recording_options(pack, storage_dtype="float32", store_per_head=True)
    recorded, rec = attach_node.execute(model=spy, token_tracking=spec, options=opts).args
    ksampler(recorded, positive, negative, empty_latent("t2v"))
    take = rec.latest
    assert take.plan.text_positions == spec.positions and take.plan.extra["tokens"]["words"][0]["label"] == "flower"
    q, k, heads, order = calls[1]  # step 0, block 0, text cross-attention
    r = order.index(0)
    qh = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)[r:r + 1]
    kh = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)[r:r + 1]
    probs = naive_probs(naive_scores(qh, kh)[0])
    for word in spec.words:
        got = take.cross[(0, "cond")][:, 0][..., spec.columns(word)]
        torch.testing.assert_close(got.double(), probs[..., list(word.positions)], rtol=1e-4, atol=1e-6)
