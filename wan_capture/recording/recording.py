"""One read interface for a video's recording, live or saved.

A :class:`Recording` is one video (one batch item of one sampling): its ``summary`` (the fields ``summary.json``
holds that do not depend on where or how it was saved), its :class:`~.keys.ArrayKey` s, ``get(key)`` (the array as
stored: float16 or float32) and ``metadata(key)`` (the metadata file the key's group shares). Two backends answer:
:class:`~.memory.MemoryRecording` (a take in a recorder) and :class:`FolderRecording` (a saved video folder). Views,
masks, the viewer's routes and ``save`` read a ``Recording``, so live and saved recordings answer the same way.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..stats.causal import assemble_chunks, sink_frames_of
from ..capture.time_layout import TimeLayout
from ..keys import SINK_NAMES, ArrayKey, key_path, metadata_path
from .reader import ArrayTooLarge, AttentionFolder, DamagedFileError, load_cells

MAX_ASSEMBLED_BYTES = 64 << 20  # one causal map assembled for a view (a real 14B 720p one: about 1.3 MiB)


class NotRecorded(FileNotFoundError, KeyError):
    """The recording holds no such array (a KeyError for mappings, FileNotFoundError for file readers); the message
    says what it holds instead."""


# summary fields that say where and how a copy was written, not what was recorded
PROVENANCE = ("video_id", "prompt_id", "video_number", "batch_index", "storage_format", "compressed", "pack_version",
              "saved_at", "files_written", "frames", "status", "partial_reason")


class Recording:
    """A video's recording. Backends implement ``keys``, ``get``, ``metadata``, ``kv_events`` and ``frame_pngs``;
    everything else reads through them."""

    summary: dict
    live: bool = False

    # -- what a backend answers ---------------------------------------------------------------------------
    def keys(self) -> List[ArrayKey]:
        """Every array of the recording."""
        raise NotImplementedError

    def get(self, key: ArrayKey) -> np.ndarray:
        """The array of ``key`` as stored (float16 or float32); KeyError when the recording has none."""
        raise NotImplementedError

    def metadata(self, key: ArrayKey) -> dict:
        """The metadata of ``key``'s group (what its ``*_metadata.json`` holds, provenance aside)."""
        raise NotImplementedError

    def kv_events(self) -> List[dict]:
        """Causal Wan: the KV-cache log (empty otherwise)."""
        return []

    def absent(self) -> List[str]:
        """The arrays the recording's summary lists but it does not hold (what an interrupted save never wrote), as
        paths in its folder; empty for a complete recording."""
        return []

    def frame_pngs(self) -> List[bytes]:
        """The decoded frames kept with the recording, as PNG files (empty when none were)."""
        return []

    def frame_count(self) -> int:
        """How many decoded frames are kept with the recording."""
        return len(self.frame_pngs())

    # -- derived readers ----------------------------------------------------------------------------------
    @property
    def steps(self) -> List[int]:
        return sorted({k.step for k in self._keys()})

    @property
    def blocks(self) -> List[int]:
        return list(self.summary["blocks"])

    @property
    def heads(self) -> List[int]:
        return list(self.summary["heads"])

    @property
    def causal(self) -> bool:
        return bool(self.summary.get("causal"))

    @property
    def meta(self) -> dict:
        """What drawing needs: the grids, the model and the time layout."""
        s = self.summary
        return {"latent_grid": s["latent_grid"], "map_grid": s["map_grid"], "model": s["model"],
                **TimeLayout.from_meta(s).as_meta()}

    @property
    def sink_frames(self) -> List[int]:
        return sink_frames_of(self.kv_events()) if self.causal else []

    def _keys(self) -> List[ArrayKey]:
        cached = getattr(self, "_key_cache", None)
        if cached is None:
            cached = self._key_cache = sorted(self.keys(), key=ArrayKey.order)
        return cached

    def has(self, key: ArrayKey) -> bool:
        """Whether the recording holds ``key`` (its keys are read once)."""
        cached = getattr(self, "_key_set", None)
        if cached is None:
            cached = self._key_set = set(self._keys())
        return key in cached

    def keys_of(self, stat: str, branch: Optional[str] = None) -> List[ArrayKey]:
        return [k for k in self._keys() if k.stat == stat and (branch is None or k.branch == branch)]

    def words(self, branch: str = "cond") -> List[dict]:
        """The tracked words of ``branch``'s prompt in prompt order (uncond: the negative prompt's)."""
        return list(self.summary.get("tokens" if branch == "cond" else "negative_tokens") or [])

    def labels_of(self, branch: str = "cond") -> List[str]:
        return [w["label"] for w in self.words(branch)]

    @property
    def labels(self) -> List[str]:
        return self.labels_of("cond")

    def stored(self, key: ArrayKey, what: str) -> np.ndarray:
        """The array of ``key`` in its stored dtype (NotRecorded, saying which steps there are, when it is not):
        for readers that reduce it first and convert only what is left."""
        if not self.has(key):
            steps = sorted({k.step for k in self.keys_of(key.stat, key.branch)})
            raise NotRecorded(f"no {what} for step {key.step} ({key.branch}); recorded steps: {steps}")
        return self.get(key)

    def _float(self, key: ArrayKey, what: str) -> np.ndarray:
        return np.asarray(self.stored(key, what), dtype=np.float32)

    def cross(self, label: str, step: int, branch: str = "cond") -> np.ndarray:
        """``[blocks, heads, spatial, pieces]`` of a word at one step."""
        return self._float(ArrayKey("cross", label, step, branch), f"cross-attention maps of {label!r}")

    def cross_cell(self, label: str, step: int, cell: int, branch: str = "cond") -> np.ndarray:
        """``[blocks, heads, pieces]``: a word's maps at one map cell of one step (a saved recording reads just that
        cell from an uncompressed file)."""
        return self.cross(label, step, branch)[:, :, cell]

    def image(self, step: int, name: str, branch: str = "cond") -> np.ndarray:
        """i2v image context: ``share`` ``[blocks, heads, tokens]`` or ``received`` ``[blocks, heads, 257]``."""
        if not self.keys_of("image"):
            raise NotRecorded(f"no image-context statistics for step {step} ({branch}): record an i2v model with "
                           "image_context on")
        return self._float(ArrayKey("image", name, step, branch), "image-context statistics")

    def chunks(self) -> List[int]:
        """Causal Wan: the first latent frame of each chunk."""
        return sorted({k.chunk for k in self.keys_of("sink") + self.keys_of("window") if k.chunk is not None}
                      | set((self.summary.get("causal") or {}).get("chunks") or []))

    def chunk_steps(self, branch: str = "cond") -> Dict[int, List[int]]:
        """Causal Wan: the steps each chunk's self-attention statistics hold (chunks need not share steps: an input
        chunk of ``initial_latent`` only has the context pass)."""
        out: Dict[int, set] = {c: set() for c in self.chunks()}
        for k in self.keys_of("sink", branch):
            if k.chunk is not None:
                out.setdefault(k.chunk, set()).add(k.step)
        return {c: sorted(s) for c, s in out.items()}

    def sink(self, step: int, name: str, branch: str = "cond",
             pick: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
        """A sink statistic of one step (``[blocks, heads, ...]``); causal recordings give it over the whole video
        in absolute frames, from the chunks that have the step (see :mod:`wan_capture.stats.causal`).

        ``pick``: reduces the blocks and heads axes (a selection's mean); for causal recordings it is applied to each
        chunk before the assembly (it commutes with it, but for ``key_max``), so what is assembled is one map, and
        the assembly is refused (ArrayTooLarge) past ``assembly_limit`` bytes.
        """
        pick = pick or (lambda a: np.asarray(a, dtype=np.float32))
        if name == "key_max" and self.keys_of("sink") and not any(k.name == "key_max" for k in self.keys_of("sink")):
            raise NotRecorded(f"no key_max for step {step} ({branch}): it was recorded with record_key_max off")
        if not self.causal:
            return pick(self.stored(ArrayKey("sink", name, step, branch), "self-attention statistics"))
        held = self.chunk_steps(branch)
        parts = [self.chunk_part(c, step, branch) for c, steps in held.items() if step in steps]
        if not parts:
            raise NotRecorded(f"no self-attention statistics for step {step} ({branch}) in any chunk; steps per chunk: "
                              f"{held}")
        if name not in parts[0]:  # the key max, recorded with record_key_max off
            raise NotRecorded(f"no {name} for step {step} ({branch}): it was recorded with record_key_max off")
        early = name != "key_max"
        if early:
            parts = [{**p, **{n: pick(p[n]) for n in SINK_NAMES if n in p}} for p in parts]
        frames, ft = self._video_frames(parts)
        self._check_assembly(parts[0]["received"].shape[:-1], frames, ft)
        whole = assemble_chunks(parts, frames, ft)[name]
        return whole if early else pick(whole)

    def _video_frames(self, parts) -> Tuple[int, int]:
        """The whole video's latent frames and tokens per frame, checked against the chunks (a summary.json whose grid
        does not hold them is damaged, not a reason to allocate)."""
        grid = self.summary.get("latent_grid")
        if not (isinstance(grid, list) and len(grid) == 3 and all(type(v) is int and v > 0 for v in grid)):
            raise ValueError(f"summary.json of {getattr(self, 'video', 'the recording')!r}: latent_grid is not three "
                             "positive whole numbers")
        needed = 1 + max(max(list(p["query_frames"]) + list(p["key_frames"])) for p in parts)
        if grid[0] < needed:
            raise ValueError(f"summary.json's latent_grid has {grid[0]} frames, but its chunks reach frame {needed - 1}")
        return grid[0], grid[1] * grid[2]

    assembly_limit: Optional[int] = None  # bytes a causal whole-video assembly may take (None: no bound)

    def _check_assembly(self, lead, frames: int, frame_tokens: int) -> None:
        cells = int(np.prod(lead, dtype=np.int64)) if lead else 1
        need = cells * (frames * frames * 4 + frames * 4 + frames * frame_tokens * (8 + 4 + 4))
        if self.assembly_limit is not None and need > self.assembly_limit:
            raise ArrayTooLarge(f"assembling {frames} frames of {frame_tokens} tokens takes {need} bytes, over the "
                                f"{self.assembly_limit} allowed")

    def cached(self, step: int, branch: str = "cond") -> np.ndarray:
        """Causal Wan: ``[F, F]`` True where query frame ``q``'s chunk held key frame ``k`` in its cache at ``step``
        (from the chunks' metadata); where it is False the assembled frame x frame mass is 0 because the key was
        absent (evicted, or later), not because it was given no attention."""
        frames = self.summary["latent_grid"][0]
        out = np.zeros((frames, frames), dtype=bool)
        for c, steps in self.chunk_steps(branch).items():
            if step in steps:
                meta = self.metadata(ArrayKey("sink", SINK_NAMES[0], step, branch, chunk=c))
                q = [f for f in meta["query_frames"] if 0 <= f < frames]
                k = [f for f in chunk_key_frames(meta) if 0 <= f < frames]
                out[np.ix_(q, k)] = True
        return out

    def chunk_part(self, chunk: int, step: int, branch: str = "cond") -> dict:
        """One chunk's sink statistics of one step with its absolute ``query_frames`` and ``key_frames``."""
        key = ArrayKey("sink", SINK_NAMES[0], step, branch, chunk=chunk)
        meta = self.metadata(key)
        arrays = {n: np.asarray(self.get(ArrayKey("sink", n, step, branch, chunk=chunk)), np.float32)
                  for n in SINK_NAMES if self.has(ArrayKey("sink", n, step, branch, chunk=chunk))}
        return {**arrays, "query_frames": meta["query_frames"], "key_frames": chunk_key_frames(meta)}

    def window(self, step: int, block: int, branch: str = "cond") -> dict:
        """An exact window: ``scores``/``probs`` ``[heads, queries, keys]`` and its token ranges (causal: the chunk
        whose queries hold it, with the absolute ``q_frames``/``k_frames``)."""
        found = [k for k in self.keys_of("window", branch) if k.step == step and k.block == block and k.name == "scores"]
        if not found:
            recorded = sorted({(k.step, k.block) for k in self.keys_of("window", branch)})
            raise NotRecorded(f"no exact window for step {step}, block {block} ({branch}); recorded (step, block): "
                           f"{recorded}")
        key = found[0]
        meta = self.metadata(key)
        probs = ArrayKey("window", "probs", step, branch, block, key.chunk)
        out = {"scores": np.asarray(self.get(key), np.float32), "probs": np.asarray(self.get(probs), np.float32),
               "q_range": list(meta["q_range"]), "k_range": list(meta["k_range"])}
        if key.chunk is not None:
            out.update(q_frames=list(meta["q_frames"]), k_frames=list(meta["k_frames"]))
        return out


IMAGE_TOKENS_MAX = 257 * 2  # CLIP-vision tokens an i2v/FLF2V call can have (first and last frame)
HEADER_SLACK = 4096  # an .npy header, or a .pt container's own bytes


def array_bound(summary: dict, key: ArrayKey) -> Optional[int]:
    """The most bytes ``key``'s array can hold given the recording's geometry (blocks, heads, the latent and map
    grids, the word's pieces; float32), or None where the summary does not give it (older layouts): what a reader
    decompresses or loads is bounded by it, whatever a planted file or its metadata says."""
    if not all(isinstance(summary.get(k), list) for k in ("blocks", "heads", "latent_grid", "map_grid")):
        return None
    bh = len(summary["blocks"]) * len(summary["heads"])
    f, h, w = (int(x) for x in summary["latent_grid"])
    lead, trail = (summary.get("context_latent_frames") or [0, 0])[:2]
    frames = f + int(summary.get("reference_latent_frames") or 0) + int(lead) + int(trail)  # keys of every stream
    tokens = frames * h * w
    cells = int(np.prod(summary["map_grid"], dtype=np.int64))
    if key.stat == "cross":
        words = (summary.get("tokens") or []) + (summary.get("negative_tokens") or [])
        pieces = max([len(w.get("positions") or [1]) for w in words if w.get("label") == key.name] or [512])
        values = bh * cells * min(pieces, 512)
    elif key.stat == "sink":
        values = bh * {"frame_mass": frames * frames, "entropy": frames}.get(key.name, tokens)
    elif key.stat == "image":
        values = bh * (tokens if key.name == "share" else IMAGE_TOKENS_MAX)
    else:  # an exact window: heads x queries x keys at most
        values = len(summary["heads"]) * tokens * tokens
    return int(values) * 4 + HEADER_SLACK


MAX_EVENT_FRAMES = 1 << 16  # latent frames an event may name where the summary gives none
FRAME_LISTS = ("key_frames", "sink_frames", "pinned_frames", "unattended_slot_frames", "evicted",
               "query_frames")  # absolute latent frames (-1: not known)


def _bad_event(event, frames: int) -> str:
    """What is wrong with one KV-cache event read from a file ('' when nothing): its frame lists must be whole
    numbers naming frames of the video (-1: not known), RoPE positions whole numbers."""
    if not isinstance(event, dict):
        return "is not an object"
    for name in FRAME_LISTS + ("rope_frames",):
        value = event.get(name, [])
        if not isinstance(value, list) or len(value) > MAX_EVENT_FRAMES:
            return f"has a {name!r} that is not a list of frames"
        low, high = (-1, frames) if name in FRAME_LISTS else (-MAX_EVENT_FRAMES, MAX_EVENT_FRAMES)
        if not all(type(f) is int and low <= f < high for f in value):
            return f"has {name!r} {str(value)[:80]} that are not frames of its {frames}-frame video"
    return ""


def chunk_key_frames(meta: dict) -> List[int]:
    """The absolute frame of each group of keys a chunk attended to, from its metadata."""
    if meta.get("key_frames") is not None:
        return list(meta["key_frames"])
    per_block = meta.get("key_frames_per_block") or {}
    firsts = sorted(per_block.items(), key=lambda kv: int(kv[0]))
    if not firsts:
        raise ValueError(f"chunk metadata of step {meta.get('step')} names no key frames")
    return list(firsts[0][1])


class FolderRecording(Recording):
    """A saved video folder (``<attention_maps>/<video_id>``), read through an
    :class:`~wan_capture.recording.reader.AttentionFolder` (which confines every read and bounds every array)."""

    def __init__(self, reader: AttentionFolder, video_id: str):
        self.an, self.video = reader, video_id
        self.summary = reader.summary(video_id)
        self.folder = reader._video(video_id)
        self._folders = {b: {w["label"]: w.get("folder") for w in self.words(b)} for b in ("cond", "uncond")}

    @classmethod
    def open(cls, attention_maps: str, video_id: str, confine_to: Optional[str] = None) -> "FolderRecording":
        return cls(AttentionFolder(attention_maps, confine_to=confine_to), video_id)

    def _folder_of(self, key: ArrayKey) -> Optional[str]:
        return self._folders[key.branch].get(key.name) if key.stat == "cross" else None

    def folder_of(self, key: ArrayKey) -> Optional[str]:
        """The token folder a word's arrays are in (words may share one); None for other statistics. A word this
        recording did not track is NotRecorded."""
        if key.stat == "cross" and not self._folder_of(key):
            raise NotRecorded(f"no tracked word {key.name!r} ({key.branch}) in {self.video!r}")
        return self._folder_of(key)

    def array_file(self, key: ArrayKey) -> str:
        """The file that holds ``key``'s array (checked to lie in the output folder); NotRecorded where there is
        none."""
        if not self.has(key):
            raise NotRecorded(f"no {key.stat} array {key.name!r} at step {key.step} ({key.branch}) in {self.video!r}")
        return self.an._checked_file(self.an._find(self._path(key_path(key, self.folder_of(key)))))

    def keys(self) -> List[ArrayKey]:
        listed = self._listed()
        if listed is None:
            return list(self._keys_from_files())
        if self.summary.get("status", "complete") == "complete":
            return listed
        # a partial recording lists what its save meant to write: only the arrays that are there, with their group's
        # metadata (written after the group), are its arrays
        return [k for k in listed if self._held(k)]

    def absent(self) -> List[str]:
        listed = self._listed()
        if listed is None or self.summary.get("status", "complete") == "complete":
            return []
        return [key_path(k, self._folder_of(k)) for k in listed if not self._held(k)]

    def _listed(self) -> Optional[List[ArrayKey]]:
        listed = self.summary.get("arrays")
        if listed is None:
            return None
        if not isinstance(listed, list):
            raise ValueError(f"summary.json of {self.video!r}: 'arrays' is not a list")
        return [ArrayKey.from_list(v) for v in listed]

    def _held(self, key: ArrayKey) -> bool:
        """Whether the array of a listed key is on disk with its group's metadata (an untracked word's never is)."""
        folder = self._folder_of(key)
        if key.stat == "cross" and not folder:
            return False
        return self._exists(key) and os.path.isfile(self._path(metadata_path(key.group(), folder)))

    def _keys_from_files(self) -> Iterable[ArrayKey]:
        """Recordings saved before ``summary.json`` listed its arrays: the steps ``summary.json`` lists, the
        statistics whose files are there (a stray file of another step never counts)."""
        steps = [int(s) for s in self.summary.get("steps") or []]
        branches = self.summary.get("branches") or ["cond"]
        chunks = [None] + [int(c) for c in (self.summary.get("causal") or {}).get("chunks", [])]
        for branch in branches:
            for word in self.words(branch):
                for step in steps:
                    yield ArrayKey("cross", word["label"], step, branch)
            for step in steps:
                for chunk in chunks:
                    for stat, names in (("sink", SINK_NAMES), ("image", ("share", "received"))):
                        for name in names:
                            key = ArrayKey(stat, name, step, branch, chunk=chunk)
                            if self._exists(key):
                                yield key
            yield from self._listed_windows(branch, steps)

    def _listed_windows(self, branch: str, steps: List[int]) -> Iterable[ArrayKey]:
        import re
        folder = os.path.join(self.folder, *(["uncond"] if branch == "uncond" else []), "windows")
        pattern = re.compile(r"step_(\d+)_block_(\d+)(?:_chunk_(\d+))?_(scores|probs)\.(?:npy|pt)(?:\.gz)?")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            m = pattern.fullmatch(name)
            if m and int(m.group(1)) in steps:
                yield ArrayKey("window", m.group(4), int(m.group(1)), branch, int(m.group(2)),
                               None if m.group(3) is None else int(m.group(3)))

    def _exists(self, key: ArrayKey) -> bool:
        stem = os.path.join(self.folder, *key_path(key, self._folder_of(key)).split("/"))
        return any(os.path.isfile(stem + ext) for ext in (".npy", ".npy.gz", ".pt", ".pt.gz"))

    def _path(self, rel: str) -> str:
        return os.path.join(self.folder, *rel.split("/"))

    def get(self, key: ArrayKey) -> np.ndarray:
        stem = self._path(key_path(key, self.folder_of(key)))
        return self.an._array(self.an._find(stem), keep_dtype=True, bound=array_bound(self.summary, key))

    def cross_cell(self, label: str, step: int, cell: int, branch: str = "cond") -> np.ndarray:
        key = ArrayKey("cross", label, step, branch)
        if not self.has(key):
            self.cross(label, step, branch)  # the same NotRecorded as a whole read
        path = self.array_file(key)
        s = self.summary
        expect = (len(s["blocks"]), len(s["heads"]), int(np.prod(s["map_grid"]))) \
            if all(k in s for k in ("blocks", "heads", "map_grid")) else None  # older layouts: the header's own
        return load_cells(path, cell, self.an.max_bytes, expect=expect)

    def metadata(self, key: ArrayKey) -> dict:
        return self.an._json(self._path(metadata_path(key, self._folder_of(key))))

    def kv_events(self) -> List[dict]:
        if not self.causal:
            return []
        path = self._path("kv_cache_events.json")
        events = self.an._json(path)
        if not isinstance(events, dict) or not isinstance(events.get("events"), list):
            raise DamagedFileError(f"damaged metadata file {path}: it does not hold an 'events' list", path)
        frames = (self.summary.get("latent_grid") or [MAX_EVENT_FRAMES])[0]
        for n, event in enumerate(events["events"]):
            bad = _bad_event(event, frames)
            if bad:
                raise DamagedFileError(f"damaged metadata file {path}: event {n} {bad}", path)
        return events["events"]

    def _frame_names(self) -> List[str]:
        folder = self._path("frames")
        if not os.path.isdir(folder):
            return []
        return sorted(n for n in os.listdir(folder) if n.startswith("frame_") and n.endswith(".png"))

    def frame_count(self) -> int:
        return len(self._frame_names())

    def frame_pngs(self) -> List[bytes]:
        folder = self._path("frames")
        out = []
        for name in self._frame_names():
            with open(self.an._checked(os.path.join(folder, name)), "rb") as f:
                out.append(f.read())
        return out
