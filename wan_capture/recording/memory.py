"""The memory backend of :class:`~.recording.Recording`: one video (batch item) of a take held by a recorder.

It answers with the keys, arrays and metadata a save of the take would write, so a live recording and the same
recording saved and loaded read the same.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np

from ..prompts.tokens import TokenTracking, TrackedWord
from ..capture.store import ALL_COLUMNS
from ..keys import ArrayKey
from .recording import Recording

_WEIGHT = re.compile(r"(?<!\\):\s*-?\d+(?:\.\d*)?\s*(?=\))")


def plain_prompt(prompt: str) -> str:
    r"""The prompt as text, without ComfyUI's weight syntax: ``a (flower:2.5) near ((a tree))`` -> ``a flower near a
    tree`` (escaped ``\(`` ``\)`` kept as parentheses). The written prompt is kept as ``prompt_weighted``."""
    text = _WEIGHT.sub("", prompt or "")
    text = re.sub(r"(?<!\\)[()]", "", text)
    return re.sub(r"\\([()])", r"\1", text)


def readable(pieces) -> List[str]:
    r"""Sentencepiece pieces as text: the word-start marker ``\u2581`` dropped (``\u2581flower`` -> ``flower``)."""
    return [p.replace("\u2581", "") for p in pieces]


def word_json(word: TrackedWord) -> dict:
    return {"label": word.label, "word": word.word, "token_ids": list(word.token_ids),
            "token_texts": readable(word.token_texts), "token_pieces": list(word.token_texts),
            "positions": list(word.positions), "weight": word.weight}


def tracking_of(take, branch: str = "cond") -> TokenTracking:
    """The words whose maps ``branch``'s rows hold: the prompt's tracking for cond, the negative prompt's for uncond
    (each row attends to its own context); one pseudo-word per position when positions were given by hand."""
    key = "tokens" if branch == "cond" else "negative_tokens"
    data = take.plan.extra.get(key) if take.plan.extra else None
    if data:
        return TokenTracking.from_json(data)
    words = tuple(TrackedWord(label=f"pos{p:03d}", word=f"pos{p:03d}", token_ids=(), token_texts=(), positions=(p,),
                              weight=1.0) for p in take.plan.positions(branch))
    return TokenTracking(prompt="", words=words, context_length=take.text_len or 0)


def expert_meta(take) -> dict:
    """``experts`` (name and steps of each) where different weights made one recording; two experts of Wan 2.1's
    architecture are Wan 2.2 A14B (``model_family``), which ComfyUI runs as WAN21 models."""
    experts = take.experts()
    if not experts:
        return {}
    meta = {"experts": experts}
    pair = len(experts) == 2 or take.log.attached.expected == 2  # or the first expert of two
    if pair and take.model.get("model_type") == "WAN21":
        meta["model_family"] = "wan2.2_a14b"
    return meta


def expert_of(take, step: int) -> Optional[str]:
    for e in take.experts():
        if e["steps"][0] <= step <= e["steps"][1]:
            return e["expert"]
    return None


def video_size(take) -> dict:
    """Decoded video size the latent grid stands for: ``video_frames`` (latent frame 0 is frame 0, each further latent
    frame covers 4), ``video_height``/``video_width`` (patch x VAE stride pixels per token)."""
    if take.grid is None:
        return {}
    stride = take.model.get("vae_stride", [4, 8, 8])
    patch = take.model.get("patch_size", [1, 2, 2])
    layout = take.time_layout  # reference (VACE, trimmed before decoding) and context frames are not video frames
    frames = (take.grid.frames - layout.reference - layout.lead - layout.trail) * patch[0]
    return {"video_frames": stride[0] * (frames - 1) + 1 if frames else 0,
            "video_height": take.grid.height * patch[1] * stride[1],
            "video_width": take.grid.width * patch[2] * stride[2]}


def axis_meta(take) -> dict:
    p = take.plan
    return {
        "block_aggregation": "per_block" if p.store_per_block else "mean",
        "head_aggregation": "per_head" if p.store_per_head else "mean",
        "block_idx": list(take.blocks) if p.store_per_block and p.blocks is not None else None,
        "head_idx": list(take.heads) if p.store_per_head and p.heads is not None else None,
    }


def _known(value: Optional[float]) -> Optional[float]:
    """A number for metadata: None where it is not known (NaN: a hand-driven recording gives no sigma)."""
    return None if value is None or value != value else float(value)


class MemoryRecording(Recording):
    """Video ``batch_index`` of a take in memory."""

    live = True

    def __init__(self, take, batch_index: int = 0):
        if take.grid is None:
            raise ValueError("the recording holds no attention data (nothing was recorded: check the plan's steps, "
                             "blocks and branch)")
        if not 0 <= batch_index < (take.batch or 1):
            raise ValueError(f"batch_index {batch_index} is outside the recording's {take.batch} videos")
        self.take, self.b = take, batch_index
        self.trackings: Dict[str, TokenTracking] = {b: tracking_of(take, b) for b in take.plan.branch_names()}
        self.summary = self._summary()

    # -- the summary ---------------------------------------------------------------------------------------
    def _summary(self) -> dict:
        take = self.take
        tracking = self.trackings.get("cond") or tracking_of(take)
        out = {
            "prompt_id": tracking.prompt_id, "prompt": plain_prompt(tracking.prompt), "prompt_weighted": tracking.prompt,
            "seed": take.log.sampling.get("seed"), "cfg_scale": take.log.sampling.get("cfg"), **video_size(take),
            "total_steps": take.log.total_steps, "latent_grid": take.grid.as_list(), **take.time_layout.as_meta(),
            **expert_meta(take), "map_grid": take.map_grid.as_list(), "model": take.model,
            "blocks": list(take.blocks), "heads": list(take.heads), "dtype": str(take.plan.torch_dtype),
            "status": take.status, "branches": [b for b in ("cond", "uncond") if b in take.plan.branch_names()],
        }
        if take.status != "complete":
            out["partial_reason"] = f"recording {take.status}: {take.error}"
        if take.not_recorded:  # attention calls the model made that no array holds (HuMo's audio), and why
            out["not_recorded"] = dict(take.not_recorded)
        if take.log.sampling.get("attention"):
            out["attention"] = dict(take.log.sampling["attention"])
        if take.store.keys("cross"):
            for branch, tracking in self.trackings.items():
                out["tokens" if branch == "cond" else "negative_tokens"] = [word_json(w) for w in tracking.words]
        else:
            out["tokens"] = []
        if take.causal:
            grids = take.store.chunk_grids
            out["causal"] = {
                "chunks": sorted(grids), "chunk_frames": {str(c): grids[c].frames for c in sorted(grids)},
                "step_pass": {str(k): v for k, v in sorted(take.step_pass.items())},
                "frame_tokens": take.grid.frame_tokens, "kv_cache_events": "kv_cache_events.json",
                **({"kv_cache_design": dict(take.kv_design)} if take.kv_design else {}),
                **({"chunk_prompts": {str(c): dict(v) for c, v in sorted(take.chunk_prompts.items())}}
                   if take.chunk_prompts else {})}
        return out

    # -- keys and arrays: the take's store, its cross-attention columns named by word ----------------------
    def keys(self) -> List[ArrayKey]:
        out = []
        for k in self.take.store.keys():
            if k.stat != "cross":
                out.append(k)
            elif k.chunk is None:  # the whole video's token maps; a causal chunk's own are not saved apart
                out += [ArrayKey("cross", w.label, k.step, k.branch) for w in self.trackings[k.branch].words]
        return out

    def get(self, key: ArrayKey) -> np.ndarray:
        arrays = self.take.store.arrays
        if key.stat == "cross":
            tracking = self.trackings[key.branch]
            maps = arrays[ArrayKey("cross", ALL_COLUMNS, key.step, key.branch)]
            return maps[self.b][..., tracking.columns(tracking.word(key.name))].numpy()
        return arrays[key][self.b].numpy()

    def _step_meta(self, step: int, branch: str) -> dict:
        take = self.take
        meta = {"step": step, "timestep": _known(take.log.step_timesteps.get(step)),
                "sigma": _known(take.log.step_sigmas.get(step)),
                **axis_meta(take), "branch": branch}
        if take.causal:
            meta["pass"] = take.step_pass.get(step, "denoise")
        expert = expert_of(take, step)
        if expert:
            meta["expert"] = expert
        return meta

    def metadata(self, key: ArrayKey) -> dict:
        take, base = self.take, {k: v for k, v in self.summary.items()
                                 if k not in ("status", "partial_reason", "tokens", "negative_tokens", "branches",
                                              "causal", "arrays")}
        meta = {**base, **self._step_meta(key.step, key.branch)}
        if key.branch == "uncond" and key.stat == "cross":
            prompt = self.trackings["uncond"].prompt
            meta.update(prompt=plain_prompt(prompt), prompt_weighted=prompt)
        if key.stat == "cross":
            word = self.trackings[key.branch].word(key.name)
            meta.update(token_word=word.word, token_label=word.label, token_ids=list(word.token_ids),
                        token_texts=readable(word.token_texts), token_pieces=list(word.token_texts),
                        token_positions=list(word.positions), token_weight=word.weight,
                        aggregation_method="per_step_full", threshold_applied=None)
            absent = self._absent_frames(key.step, key.branch)
            if absent:
                meta["absent_frames"] = absent  # causal: frames of chunks without this step (NaN in the maps)
            return meta
        store = take.store
        if key.stat == "sink":
            meta.update(frame_tokens=take.grid.frame_tokens, key_max_aggregation="max")
            if key.chunk is not None:
                grid = store.chunk_grids[key.chunk]
                per_block = {blk: v for (c, s, blk), v in sorted(store.key_frames.items())
                             if c == key.chunk and s == key.step}
                same = len(set(per_block.values())) == 1
                meta.update(chunk=key.chunk, query_frames=list(range(key.chunk, key.chunk + grid.frames)),
                            key_frames=list(next(iter(per_block.values()))) if same else None,
                            key_frames_per_block=None if same else {str(b): list(v) for b, v in per_block.items()},
                            chunk_grid=grid.as_list())
        elif key.stat == "image":
            meta.update(share="per query: sigmoid(lse_image - lse_text), the image tokens' share of its attention "
                              "were image and text keys one softmax",
                        received="per image token: mean over queries of its probability in the image "
                                 "cross-attention")
        else:
            win = store.window_meta[key.group()]
            ft = take.grid.frame_tokens
            meta.update(block=key.block, dtype="torch.float32", q_range=list(win["q_range"]),
                        k_range=list(win["k_range"]), q_frames=[win["q_range"][0] // ft, win["q_range"][1] // ft],
                        k_frames=[win["k_range"][0] // ft, win["k_range"][1] // ft])
            if key.chunk is not None:  # ranges index the chunk's queries and its cached keys, in cache order
                meta.update(chunk=key.chunk, q_frames=list(win["q_frames"]), k_frames=list(win["k_frames"]))
            for name in ("block_aggregation", "head_aggregation", "block_idx", "head_idx", "timestep", "sigma"):
                meta.pop(name, None)
        return meta

    def _absent_frames(self, step: int, branch: str) -> List[int]:
        """Causal Wan: the frames of the chunks that have no token maps at ``step`` (NaN in the whole video's)."""
        store = self.take.store
        return [f for c, grid in sorted(store.chunk_grids.items())
                if ArrayKey("cross", ALL_COLUMNS, step, branch, chunk=c) not in store.arrays
                for f in range(c, c + grid.frames)]

    def kv_events(self) -> List[dict]:
        return list(self.take.kv_events)
