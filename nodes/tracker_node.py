"""Node: Weighted Token Tracker (CLIP + prompt -> which context positions to record)."""
from __future__ import annotations

import dataclasses
import warnings
from typing import List, Tuple

from comfy_api.latest import io

from ..wan_capture.prompts.templates import TemplateError, count_variations, template_variation
from ..wan_capture.prompts.tokens import MODES, TokenTracking, TrackingError, track
from .attach_node import TokenTracking as TokenTrackingType
from .widgets import settings


def tokenizer_pieces(clip):
    """``(tokens, piece)`` of a ComfyUI CLIP: its single token batch and an id -> piece-text lookup."""
    tok = getattr(clip.tokenizer, getattr(clip.tokenizer, "clip", ""), None)
    vocab = getattr(tok, "inv_vocab", None)
    if vocab is None:
        raise TrackingError(f"cannot read the pieces of this CLIP's tokenizer ({type(clip.tokenizer).__name__}); "
                            "the Weighted Token Tracker needs Wan's umt5 text encoder")
    return tok, lambda i: vocab.get(i, "")


def track_prompt(clip, prompt: str, mode: str, words: str, prompt_id: str = "prompt_000") -> TokenTracking:
    """Tokenize with the CLIP's own tokenizer, so positions are those of the context the model attends to."""
    _, piece = tokenizer_pieces(clip)
    tokens = clip.tokenize(prompt, return_word_ids=True)
    batches = next(iter(tokens.values())) if len(tokens) == 1 else tokens.get("umt5xxl")
    if batches is None:
        raise TrackingError(f"expected Wan's umt5 tokens, got token groups {sorted(tokens)}")
    if len(batches) != 1:
        raise TrackingError(f"the prompt was split into {len(batches)} token batches; Wan attends to one context")
    listed = [w for w in words.split(",") if w.strip()]
    return track(batches[0], piece, prompt, mode, listed, prompt_id)


class WeightedTokenTracker(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanWeightedTokenTracker",
            display_name="Weighted Token Tracker",
            category="Wan Attention Capture",
            description="Finds the context positions of prompt words (weighted with (word:1.5), or listed) with the "
                        "CLIP's own tokenizer, for Attach Attention Recorder. Templates like [a|b] are expanded; "
                        "'variation' picks one, and 'prompt' outputs it for CLIP Text Encode.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder that encodes this prompt (Wan's umt5)."),
                io.String.Input("text", multiline=True, default="a beautiful (flower:2.5) near a tree",
                                tooltip="The positive prompt: the 'positive' output is its encoding, for the "
                                        "sampler. Weight words like (flower:1.5); Chinese and Japanese too, with "
                                        "ASCII brackets and colon."),
                io.Combo.Input("mode", options=list(MODES), default="weighted", optional=True,
                               tooltip="weighted: every word with a weight other than 1.0; listed: the words below; "
                                       "both: the union."),
                io.String.Input("words", default="", optional=True,
                                tooltip="Comma-separated words to track in 'listed'/'both' mode. Chinese/Japanese: "
                                        "any piece of the text (e.g. 红花). <end>: the end token; <padding>: all "
                                        "padding positions as one entry (their attention summed)."),
                io.Int.Input("variation", default=0, min=0, max=9999, optional=True,
                             tooltip="Which expansion of a [a|b] template to use (0 for a plain prompt)."),
                io.String.Input("negative_text", multiline=True, default="", optional=True,
                                tooltip="The negative prompt: its weighted words, and the listed words it "
                                        "contains, are tracked for the uncond rows, and the 'negative' output is its "
                                        "encoding. Connect 'positive' and 'negative' to the sampler: what is tracked "
                                        "is what is encoded. Empty: no negative tracking, and no encoding unless "
                                        "'negative' is connected."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],  # which outputs are connected (see _connected)
            outputs=[TokenTrackingType.Output(display_name="token_tracking"),
                     io.String.Output(display_name="prompt"), io.String.Output(display_name="prompt_id"),
                     io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, clip, text, **kw) -> io.NodeOutput:
        kw = settings(cls, kw)
        mode, words, variation = kw["mode"], kw["words"], kw["variation"]
        try:  # one variation, picked by arithmetic: a template of 2^40 prompts costs what one prompt costs
            v, total = template_variation(text, variation), count_variations(text)
        except TemplateError as e:
            raise ValueError(f"Weighted Token Tracker: {e}") from e
        negative_text = kw.get("negative_text") or ""
        listed = [w for w in words.split(",") if w.strip()]
        with warnings.catch_warnings(record=True) as said:  # shown on the node, not only in the server's console
            warnings.simplefilter("always")
            mine, theirs, both = split_listed(clip, v.prompt, negative_text, listed) if negative_text.strip() \
                else (listed, [], [])
            tracking = track_prompt(clip, v.prompt, mode, ",".join(mine), v.prompt_id) if mine or mode != "listed" \
                else track_prompt(clip, v.prompt, "listed", "<end>", v.prompt_id)  # only negative words listed
            negative = _track_negative(clip, negative_text, theirs) if negative_text.strip() else None
        positive_c = encode(clip, v.prompt)
        # the negative encoding: for the sampler where 'negative' is connected, and to check the uncond rows attend
        # to the text tracked; an empty negative_text with 'negative' unconnected costs no encoder pass
        negative_c = encode(clip, negative_text) if negative_text.strip() or _connected(cls, 4) else None
        if negative is not None:
            negative = dataclasses.replace(negative, encoded=negative_c[0][0])
        tracking = dataclasses.replace(tracking, encoded=positive_c[0][0], negative=negative)
        summary = ", ".join(f"{w.label}@{list(w.positions)} x{w.weight:g}" for w in tracking.words)
        if negative is not None:
            summary += "; negative: " + (", ".join(f"{w.label}@{list(w.positions)}" for w in negative.words) or "-")
        if both:
            summary += f" (in both prompts: {', '.join(both)})"
        if total > 1:
            summary += f" (variation {variation} of {total})"
        summary += "".join(f"\nwarning: {w.message}" for w in said)
        return io.NodeOutput(tracking, v.prompt, v.prompt_id, positive_c, negative_c, ui={"text": [summary]})


def encode(clip, text: str):
    """The CONDITIONING CLIP Text Encode makes of ``text`` (the same tokens, the same encoder)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _connected(cls, slot: int) -> bool:
    """Whether output ``slot`` of this node feeds another node of the prompt being run (unknown: True)."""
    hidden = getattr(cls, "hidden", None)  # absent where the node is called outside a prompt (Python, tests)
    prompt, me = getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)
    if not isinstance(prompt, dict) or me is None:
        return True
    return any(isinstance(v, list) and len(v) == 2 and str(v[0]) == str(me) and v[1] == slot
               for node in prompt.values() if isinstance(node, dict)
               for v in (node.get("inputs") or {}).values())


def split_listed(clip, prompt: str, negative: str, listed: List[str]) -> Tuple[List[str], List[str], List[str]]:
    """The listed words of the prompt, of the negative prompt, and those both contain; a word in neither is an error
    naming both prompts. ``<end>`` and ``<padding>`` belong to both."""
    mine, theirs, both = [], [], []
    for word in listed:
        inside = [_contains(clip, text, word) for text in (prompt, negative)]
        if not any(inside):
            raise TrackingError(f"the word {word.strip()!r} is in neither the prompt {prompt!r} nor the negative "
                                f"prompt {negative!r}")
        if inside[0]:
            mine.append(word)
        if inside[1]:
            theirs.append(word)
        if all(inside) and word.strip().lower() not in ("<end>", "<padding>"):
            both.append(word.strip())
    return mine, theirs, both


def _contains(clip, text: str, word: str) -> bool:
    try:
        track_prompt(clip, text, "listed", word)
        return True
    except TrackingError:
        return False


def _track_negative(clip, text: str, listed: List[str] = ()) -> TokenTracking:
    """The negative prompt's weighted words (``(blurry:1.3)``) and the listed words it contains; a negative prompt
    with none of either is tracked by its end token, so the uncond rows still have a map to show."""
    try:
        return track_prompt(clip, text, "both" if listed else "weighted", ",".join(listed), "negative")
    except TrackingError:
        return track_prompt(clip, text, "listed", "<end>", "negative")


NODES = [WeightedTokenTracker]
