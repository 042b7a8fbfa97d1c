"""Node: Weighted Token Tracker (CLIP + prompt -> which context positions to record)."""
from __future__ import annotations

from comfy_api.latest import io

from ..wan_capture.templates import TemplateError, expand_template
from ..wan_capture.tokens import MODES, TokenTracking, TrackingError, track
from .attach_node import TokenTracking as TokenTrackingType


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
                io.Clip.Input("clip"),
                io.String.Input("text", multiline=True, default="a beautiful (flower:2.5) near a tree"),
                io.Combo.Input("mode", options=list(MODES), default="weighted"),
                io.String.Input("words", default="", tooltip="Comma-separated words to track in 'listed'/'both' mode."),
                io.Int.Input("variation", default=0, min=0, max=9999,
                             tooltip="Which expansion of a [a|b] template to use (0 for a plain prompt)."),
            ],
            outputs=[TokenTrackingType.Output(display_name="token_tracking"),
                     io.String.Output(display_name="prompt"), io.String.Output(display_name="prompt_id")],
        )

    @classmethod
    def execute(cls, clip, text, mode, words, variation) -> io.NodeOutput:
        try:
            variations = expand_template(text)
        except TemplateError as e:
            raise ValueError(f"Weighted Token Tracker: {e}") from e
        if variation >= len(variations):
            raise ValueError(f"variation {variation} does not exist: the template has {len(variations)} "
                             f"(0..{len(variations) - 1})")
        v = variations[variation]
        tracking = track_prompt(clip, v.prompt, mode, words, v.prompt_id)
        summary = ", ".join(f"{w.label}@{list(w.positions)} x{w.weight:g}" for w in tracking.words)
        return io.NodeOutput(tracking, v.prompt, v.prompt_id, ui={"text": [summary]})


NODES = [WeightedTokenTracker]
