"""Writing a take to disk in the storage contract's layout, atomically, with names kept inside the output folder.

Layout (see docs/FORMAT.md)::

    <output>/<batch_name>/attention_maps/<prompt_id>_vid<NNN>/
        summary.json
        token_<word>/step_<NNN>.npy            [blocks, heads, spatial, tokens]   (+ step_<NNN>_metadata.json)
        uncond/token_<word>/step_<NNN>.npy     the other CFG branch, when both were recorded
        self_attention/step_<NNN>_<stat>.npy   received/key_max [blocks, heads, keys], frame_mass [.., Fq, Fk], entropy [.., Fq]
        windows/step_<NNN>_block_<BB>_{scores,probs}.npy   [heads, queries, keys] float32
        kv_cache_events.json                   causal Wan: the KV-cache log (chunks' sink statistics and windows
                                               carry _chunk_<FFF> in their names, FFF the chunk's first frame)

Every file is written under a temporary name and renamed; ``summary.json`` says ``"status": "partial"`` until the
last file of the video is in place, and stays partial when the take itself was interrupted.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .grid import pool_spatial
from .recorder import IMAGE_NAMES, SINK_NAMES, Take
from .tokens import TokenTracking, TrackedWord

FORMATS = {"numpy": ".npy", "torch": ".pt"}
_UNSAFE = re.compile(r"[^\w.-]+", re.UNICODE)
# names Windows reserves for devices, in any case and with any extension: never a file or folder name
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


class StorageError(OSError):
    """Writing failed; the message names the file and what was kept."""


def safe_name(name: str, fallback: str = "unnamed", limit: int = 80) -> str:
    """One path component made of letters, digits, ``_ . -`` only: no separators, no leading dots, never empty."""
    cleaned = _UNSAFE.sub("_", str(name)).strip("._ ")[:limit]
    if _RESERVED.match(cleaned):
        cleaned = "_" + cleaned
    return cleaned or fallback


def inside(root: str, *parts: str, purpose: str = "write") -> str:
    """``root/parts...`` after checking (symlinks resolved) that it stays inside ``root`` (``purpose``: what the
    caller is about to do there, for the message: ``write`` or ``read``)."""
    path = os.path.join(root, *parts)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise StorageError(f"refusing to {purpose} {path!r}: it resolves outside the output folder {root!r}")
    return path


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it, then rename it over ``path``."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def encode_array(array: torch.Tensor, fmt: str, compress: bool) -> bytes:
    buf = io.BytesIO()
    if fmt == "numpy":
        np.save(buf, array.numpy())
    else:
        torch.save(array.clone(), buf)
    data = buf.getvalue()
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


@dataclass
class SaveOptions:
    """How to write; the seed's configuration options, applied on top of what was recorded."""

    storage_format: str = "numpy"
    compress: bool = False
    storage_interval: int = 1
    storage_dtype: str = "float16"
    spatial_downsample_factor: int = 1
    prompt_id: Optional[str] = None
    video_number: int = 1
    prompt: Optional[str] = None
    extra: dict = field(default_factory=dict)
    # an existing video folder: "replace" it as a whole, or keep it and write to "new_name" (<video>_2, _3, ...)
    if_exists: str = "replace"

    def __post_init__(self):
        if self.if_exists not in ("replace", "new_name"):
            raise ValueError(f"if_exists must be 'replace' or 'new_name', got {self.if_exists!r}")
        if self.storage_format not in FORMATS:
            raise ValueError(f"storage_format must be one of {sorted(FORMATS)}, got {self.storage_format!r}")
        if self.storage_dtype not in ("float16", "float32"):
            raise ValueError(f"storage_dtype must be float16 or float32, got {self.storage_dtype!r}")
        if self.storage_interval < 1 or self.spatial_downsample_factor < 1 or self.video_number < 0:
            raise ValueError("storage_interval and spatial_downsample_factor must be >= 1, video_number >= 0")


@dataclass
class SavedVideo:
    video_id: str
    path: str
    status: str
    files: List[str]


def tracking_of(take: Take, branch: str = "cond") -> TokenTracking:
    """The words whose maps ``branch``'s rows hold: the prompt's tracking for cond, the negative prompt's for uncond
    (each row attends to its own context); one pseudo-word per position when positions were given by hand."""
    key = "tokens" if branch == "cond" else "negative_tokens"
    data = take.plan.extra.get(key) if take.plan.extra else None
    if data:
        return TokenTracking.from_json(data)
    words = tuple(TrackedWord(label=f"pos{p:03d}", word=f"pos{p:03d}", token_ids=(), token_texts=(), positions=(p,),
                              weight=1.0) for p in take.plan.positions(branch))
    return TokenTracking(prompt="", words=words, context_length=take.text_len or 0)


class _Writer:
    def __init__(self, folder: str, opts: SaveOptions, progress: Optional[Callable[[str], None]]):
        self.folder, self.opts, self.progress = folder, opts, progress
        self.ext = FORMATS[opts.storage_format] + (".gz" if opts.compress else "")
        self.files: List[str] = []

    def write(self, rel: str, data: bytes) -> str:
        path = inside(self.folder, *rel.split("/"))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, data)
        except OSError as e:
            raise StorageError(f"could not write {path}: {e.strerror or e}. Files written before it are intact; "
                               f"the video's summary.json stays marked partial.") from e
        self.files.append(path)
        if self.progress:
            self.progress(path)
        return path

    def array(self, rel: str, t: torch.Tensor) -> str:
        return self.write(rel + self.ext, encode_array(t, self.opts.storage_format, self.opts.compress))


def plan_file_count(take: Take, opts: SaveOptions) -> int:
    """Files one video of ``take`` will take (for progress bars)."""
    steps = [s for s in take.steps if s % opts.storage_interval == 0]
    branches = take.plan.branch_names()
    per_step = sum(len(tracking_of(take, b).words) * 2 for b in branches) if take.cross else 0
    per_step += (len(IMAGE_NAMES) + 1) * len(branches) if take.image else 0
    for part in (list(take.chunks.values()) or [take]):
        per_step += (len(SINK_NAMES) + 1) * len(branches) if part.sink else 0
        per_step += 3 * len(take.blocks) * len(branches) if part.windows else 0
    return len(steps) * per_step + 2 + (1 if take.causal else 0)


def save_take(take: Take, output_root: str, batch_name: str, opts: SaveOptions = SaveOptions(),
              progress: Optional[Callable[[str], None]] = None, version: str = "",
              frames: Optional[np.ndarray] = None) -> List[SavedVideo]:
    """Write every video (batch item) of ``take``; returns where each went.

    ``frames``: the decoded videos ``[batch * T, H, W, 3]`` in [0, 1] (ComfyUI's IMAGE), kept as
    ``frames/frame_NNNN.png`` in each video folder for the viewer to draw over.
    """
    if take.grid is None:
        raise ValueError("this recording holds no attention data (nothing was recorded: check the plan's steps, "
                         "blocks and branch)")
    root = inside(output_root, safe_name(batch_name, "attention_batch"), "attention_maps")
    tracking = tracking_of(take)
    prompt_id = safe_name(opts.prompt_id or tracking.prompt_id, "prompt_000")
    batch = take.batch or 1
    if frames is not None and len(frames) % batch:
        raise ValueError(f"{len(frames)} decoded frames do not split into the recording's {batch} videos")
    per = None if frames is None else len(frames) // batch
    return [_save_video(take, tracking, root, prompt_id, b, opts, progress, version,
                        None if frames is None else frames[b * per:(b + 1) * per]) for b in range(batch)]


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.clip(frame[..., :3], 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sweep_leftovers(root: str, video_id: str) -> None:
    """Tidy what a killed save of ``video_id`` left in ``root``: unfinished folders go; a previous recording that a
    save killed between its two renames had moved aside is put back first."""
    names = sorted(os.listdir(root))
    final = os.path.join(root, video_id)
    for name in names:
        path = os.path.join(root, name)
        if name.startswith(f".{video_id}.old-") and not os.path.lexists(final) and os.path.isdir(path) \
                and not os.path.islink(path):
            os.rename(path, final)
    for name in names:
        path = os.path.join(root, name)
        if name.startswith((f".{video_id}.tmp-", f".{video_id}.old-")) and os.path.isdir(path) \
                and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def _swap_in(work: str, final: str) -> None:
    """Put the finished folder ``work`` at ``final``, replacing whatever was there as a whole."""
    old = None
    if os.path.lexists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rmdir(old)
        os.rename(final, old)
    os.rename(work, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_video(take, tracking, root, prompt_id, b, opts, progress, version, frames=None) -> SavedVideo:
    """Write one video into a fresh folder beside its final place, then swap it in: a new recording replaces an
    old one completely (no stale files), and a save killed midway leaves the previous recording untouched."""
    video_id = f"{prompt_id}_vid{opts.video_number + b:03d}"
    if opts.if_exists == "new_name" and os.path.lexists(os.path.join(root, video_id)):
        n = 2
        while os.path.lexists(os.path.join(root, f"{video_id}_{n}")):
            n += 1
        video_id = f"{video_id}_{n}"  # the earlier recording stays as it is; the report names the new one
    final = inside(root, video_id)
    os.makedirs(root, exist_ok=True)
    sweep_leftovers(root, video_id)
    folder = tempfile.mkdtemp(prefix=f".{video_id}.tmp-", dir=root)
    w = _Writer(folder, opts, progress)
    dtype = torch.float16 if opts.storage_dtype == "float16" else torch.float32
    steps = [s for s in take.steps if s % opts.storage_interval == 0]
    recorded = [br for br in ("cond", "uncond") if br in take.plan.branch_names()]
    map_grid = take.map_grid.pooled(opts.spatial_downsample_factor) if take.map_grid else None
    prompt = opts.prompt if opts.prompt is not None else tracking.prompt
    video = video_size(take)
    base = {
        "video_id": video_id, "prompt_id": prompt_id, "video_number": opts.video_number + b, "batch_index": b,
        "prompt": plain_prompt(prompt), "prompt_weighted": prompt,
        "seed": take.sampling.get("seed"), "cfg_scale": take.sampling.get("cfg"), **video,
        "total_steps": take.total_steps, "latent_grid": take.grid.as_list(), **take.time_layout.as_meta(),
        **expert_meta(take),
        "map_grid": map_grid.as_list() if map_grid else None, "model": take.model,
        "blocks": list(take.blocks), "heads": list(take.heads), "dtype": str(dtype),
        "storage_format": opts.storage_format, "compressed": opts.compress, "pack_version": version, **opts.extra,
    }
    chunks = [take.chunks[c] for c in sorted(take.chunks)]
    has_sink = bool(take.sink) or any(c.sink for c in chunks)
    has_windows = bool(take.windows) or any(c.windows for c in chunks)
    summary = {**base, "status": "partial", "partial_reason": "writing", "steps": steps,
               "branches": recorded, "tokens": [], "self_attention": has_sink, "windows": has_windows}
    if take.causal:
        summary["causal"] = {
            "chunks": sorted(take.chunks), "chunk_frames": {str(c): take.chunks[c].grid.frames for c in sorted(take.chunks)
                                                            if take.chunks[c].grid is not None},
            "step_pass": {str(k): v for k, v in sorted(take.step_pass.items())},
            "frame_tokens": take.grid.frame_tokens, "kv_cache_events": "kv_cache_events.json"}
    w.write("summary.json", _json(summary))
    if take.status != "complete":
        summary["partial_reason"] = f"recording {take.status}: {take.error}"
    try:
        for i, branch in enumerate(recorded):
            prefix = "" if branch == "cond" else f"{branch}/"
            if take.cross:
                words = tracking if branch == "cond" else tracking_of(take, branch)
                folders = token_folders(words)
                listed = summary.setdefault("tokens" if branch == "cond" else "negative_tokens", [])
                branch_base = base if branch == "cond" else {**base, "prompt": plain_prompt(words.prompt),
                                                               "prompt_weighted": words.prompt}
                for word in words.words:
                    folder_name = folders[word.label]
                    listed.append({**_word_json(word), "folder": folder_name})
                    for step in steps:
                        _save_token_step(w, take, words, word, step, branch, b, prefix + folder_name, dtype, opts,
                                         branch_base)
            for chunk in ([None] if not take.causal else sorted(take.chunks)):
                part = take if chunk is None else take.chunks[chunk]
                for step in steps:
                    _save_image_step(w, part, step, branch, b, prefix, dtype, base)
            for chunk in ([None] if not take.causal else sorted(take.chunks)):
                part = take if chunk is None else take.chunks[chunk]
                if part.sink:
                    for step in steps:
                        _save_sink_step(w, part, step, branch, b, prefix, dtype, base, chunk)
                for (step, block, br), win in sorted(part.windows.items()):
                    if br == branch and step in steps:
                        _save_window(w, step, block, branch, b, prefix, win, base, chunk)
        if take.causal:
            w.write("kv_cache_events.json", _json({"events": take.kv_events}))
        for t, frame in enumerate(frames if frames is not None else []):
            w.write(f"frames/frame_{t:04d}.png", _png(frame))
        summary["frames"] = 0 if frames is None else len(frames)
    except BaseException as e:
        summary["partial_reason"] = f"writing failed: {type(e).__name__}: {e}"
        summary["files_written"] = len(set(w.files))
        try:
            w.write("summary.json", _json(summary))
        except OSError:
            pass  # the summary written first already says partial ("writing")
        try:
            _swap_in(folder, final)  # what was written, honestly marked partial
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if take.status == "complete":
        summary["status"] = "complete"
        summary.pop("partial_reason")
    summary["files_written"] = len(set(w.files))  # summary.json is among them already
    summary["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    w.write("summary.json", _json(summary))
    _swap_in(folder, final)
    files = [final + p[len(folder):] for p in dict.fromkeys(w.files)]
    return SavedVideo(video_id, final, summary["status"], files)


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


def expert_meta(take: Take) -> dict:
    """``experts`` (name and steps of each) where different weights made one recording; two experts of Wan 2.1's
    architecture are Wan 2.2 A14B (``model_family``), which ComfyUI runs as WAN21 models."""
    experts = take.experts()
    if not experts:
        return {}
    meta = {"experts": experts}
    if len(experts) == 2 and take.model.get("model_type") == "WAN21":
        meta["model_family"] = "wan2.2_a14b"
    return meta


def expert_of(take: Take, step: int) -> Optional[str]:
    for e in take.experts():
        if e["steps"][0] <= step <= e["steps"][1]:
            return e["expert"]
    return None


def video_size(take: Take) -> dict:
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


def token_folders(tracking: TokenTracking) -> Dict[str, str]:
    """``token_<label>`` folder of each tracked word, unique within the video: labels that sanitise (or cut at 80
    characters) to the same name get ``_2``, ``_3``... (the summary's ``tokens`` records each word's folder)."""
    out: Dict[str, str] = {}
    used = set()
    for word in tracking.words:
        base = f"token_{safe_name(word.label, 'token', limit=74)}"
        name, n = base, 1
        while name.lower() in used:  # case-insensitive file systems would merge case-only differences too
            n += 1
            name = f"{base}_{n}"
        used.add(name.lower())
        out[word.label] = name
    return out


def _word_json(word: TrackedWord) -> dict:
    return {"label": word.label, "word": word.word, "token_ids": list(word.token_ids),
            "token_texts": readable(word.token_texts), "token_pieces": list(word.token_texts),
            "positions": list(word.positions), "weight": word.weight}


def _axis_meta(take: Take) -> dict:
    p = take.plan
    return {
        "block_aggregation": "per_block" if p.store_per_block else "mean",
        "head_aggregation": "per_head" if p.store_per_head else "mean",
        "block_idx": list(take.blocks) if p.store_per_block and p.blocks is not None else None,
        "head_idx": list(take.heads) if p.store_per_head and p.heads is not None else None,
    }


def _save_token_step(w, take, tracking, word, step, branch, b, folder, dtype, opts, base) -> None:
    maps = take.cross[(step, branch)][b]  # [blocks, heads, spatial, T]
    maps = maps[..., tracking.columns(word)]
    if opts.spatial_downsample_factor > 1:
        maps = pool_spatial(maps.float(), take.map_grid, opts.spatial_downsample_factor)
    maps = maps.to(dtype).contiguous()
    nb, nh, spatial, ntok = maps.shape
    w.array(f"{folder}/step_{step:03d}", maps)
    meta = {
        **base, "step": step, "timestep": take.step_timesteps.get(step), "sigma": take.step_sigmas.get(step),
        "token_word": word.word, "token_label": word.label, "token_folder": folder.rsplit("/", 1)[-1],
        "token_ids": list(word.token_ids),
        "token_texts": readable(word.token_texts), "token_pieces": list(word.token_texts),
        "token_positions": list(word.positions), "token_weight": word.weight,
        "aggregation_method": "per_step_full", "attention_shape": [nb, nh, spatial, ntok],
        "spatial_resolution": [spatial, ntok], "num_blocks": nb, "num_heads": nh, "threshold_applied": None,
        **_axis_meta(take), "branch": branch,
    }
    if take.causal:
        meta["pass"] = take.step_pass.get(step, "denoise")
    expert = expert_of(take, step)
    if expert:
        meta["expert"] = expert
    w.write(f"{folder}/step_{step:03d}_metadata.json", _json(meta))


def _chunk_suffix(chunk: Optional[int]) -> str:
    return "" if chunk is None else f"_chunk_{chunk:03d}"


def _save_statistics(w, take, stats: dict, names, stem: str, step: int, branch: str, b: int, dtype, base) -> dict:
    """Write one step's named statistics (``<stem>_<name>``); the step metadata they share, for the caller to add to."""
    shapes = {}
    for name in names:
        if name in stats:
            arr = stats[name][b].to(dtype).contiguous()
            shapes[name] = list(arr.shape)
            w.array(f"{stem}_{name}", arr)
    return {**base, "step": step, "timestep": take.step_timesteps.get(step), "sigma": take.step_sigmas.get(step),
            "shapes": shapes, **_axis_meta(take), "branch": branch}


def _save_sink_step(w, take, step, branch, b, prefix, dtype, base, chunk=None) -> None:
    stats = take.sink.get((step, branch))
    if not stats:
        return
    stem = f"{prefix}self_attention/step_{step:03d}{_chunk_suffix(chunk)}"
    meta = {**_save_statistics(w, take, stats, SINK_NAMES, stem, step, branch, b, dtype, base),
            "frame_tokens": take.grid.frame_tokens, "key_max_aggregation": "max"}
    if chunk is not None:
        parent = take.parent
        key_frames = {tuple(v) for (s, _), v in take.key_frames.items() if s == step}
        meta.update(chunk=chunk, query_frames=list(range(chunk, chunk + take.grid.frames)),
                    key_frames=list(next(iter(key_frames))) if len(key_frames) == 1 else None,
                    key_frames_per_block={str(blk): list(v) for (s, blk), v in sorted(take.key_frames.items())
                                          if s == step} if len(key_frames) > 1 else None,
                    chunk_grid=take.grid.as_list(), **{"pass": parent.step_pass.get(step, "denoise")})
    w.write(f"{stem}_metadata.json", _json(meta))


def _save_image_step(w, take, step, branch, b, prefix, dtype, base) -> None:
    stats = take.image.get((step, branch))
    if not stats:
        return
    stem = f"{prefix}image_context/step_{step:03d}"
    meta = {**_save_statistics(w, take, stats, IMAGE_NAMES, stem, step, branch, b, dtype, base),
            "share": "per query: sigmoid(lse_image - lse_text), the image tokens' share of its attention were image "
                     "and text keys one softmax",
            "received": "per image token: mean over queries of its probability in the image cross-attention"}
    w.write(f"{stem}_metadata.json", _json(meta))


def _save_window(w, step, block, branch, b, prefix, win, base, chunk=None) -> None:
    ft = base["latent_grid"][1] * base["latent_grid"][2]
    stem = f"{prefix}windows/step_{step:03d}_block_{block:02d}{_chunk_suffix(chunk)}"
    # exact windows stay float32 whatever the storage dtype: they are for precise study
    w.array(f"{stem}_scores", win["scores"][b].contiguous())
    w.array(f"{stem}_probs", win["probs"][b].contiguous())
    meta = {**base, "step": step, "block": block, "branch": branch, "dtype": "torch.float32",
            "q_range": list(win["q_range"]), "k_range": list(win["k_range"]),
            "q_frames": [win["q_range"][0] // ft, win["q_range"][1] // ft],
            "k_frames": [win["k_range"][0] // ft, win["k_range"][1] // ft], "shape": list(win["scores"][b].shape)}
    if chunk is not None:  # token ranges index this chunk's queries and the keys it attended to, in cache order
        meta.update(chunk=chunk, q_frames=list(win["q_frames"]), k_frames=list(win["k_frames"]))
    w.write(f"{stem}_metadata.json", _json(meta))
