"""Reading a saved ``attention_maps`` folder: the bounded, confined file readers (arrays, metadata, summaries) and
:class:`AttentionFolder`, which finds videos, words and files in it. :class:`~wan_capture.recording.FolderRecording`
and the contract's :class:`~wan_capture.recording.analyzer.AttentionAnalyzer` both read through it.

Arrays come back as float32 ``numpy.ndarray`` whatever the stored format (``.npy``, ``.pt``, gzip or not).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import warnings
import zlib
from typing import List, Optional

import numpy as np

from .confine import OutsideRoot, confined, safe_name  # noqa: F401  (OutsideRoot: raised here)

_EXTS = (".npy", ".npy.gz", ".pt", ".pt.gz")
_STEP = re.compile(r"^step_(\d+)(\.npy|\.npy\.gz|\.pt|\.pt\.gz)$")
_NESTED_PROMPT = re.compile(r"[^.].*")  # a prompt folder of the nested layout (hidden folders are writes under way)
_NESTED_VIDEO = re.compile(r"vid\d+")


class DamagedFileError(ValueError):
    """A saved file cannot be read; the message names it (``file``: its name, without the folders)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.file = os.path.basename(path)


class ArrayTooLarge(ValueError):
    """A saved array is larger than the reader allows; refused before it is decompressed or loaded."""


NPY_HEAD_BYTES = 4096  # what is decompressed of a compressed .npy before its header is read and its size checked


def _bounded_gunzip(data: bytes, max_bytes: int, path: str) -> bytes:
    """The file decompressed, never past ``max_bytes``. A compressed ``.npy`` is decompressed only as far as its header
    (``NPY_HEAD_BYTES``) before the size the header gives is held to ``max_bytes``; then exactly that size, and a
    stream that goes on past it is damaged: a planted bomb costs a few KB unless its header is the recording's own."""
    d = zlib.decompressobj(wbits=31)
    limit = max_bytes
    out = b""
    if path.endswith(".npy.gz"):
        out = d.decompress(data, NPY_HEAD_BYTES)
        try:
            shape, _, dtype, start = _read_npy_header(io.BytesIO(out))
        except (ValueError, EOFError) as e:
            raise DamagedFileError(f"damaged attention file {path}: {type(e).__name__}: {e}", path) from None
        limit = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if limit > max_bytes:
            raise ArrayTooLarge(f"{os.path.basename(path)}: its header's shape {list(shape)} ({dtype}) is more than "
                                f"{max_bytes} bytes")
        data = d.unconsumed_tail
    out += d.decompress(data, limit - len(out) + 1)
    if len(out) > limit or d.unconsumed_tail:
        if limit < max_bytes:
            raise DamagedFileError(f"damaged attention file {path}: it decompresses past its header's shape", path)
        raise ArrayTooLarge(f"{os.path.basename(path)} decompresses to more than {max_bytes} bytes")
    return out + d.flush()


def load_array(path: str, max_bytes: Optional[int] = None, keep_dtype: bool = False) -> np.ndarray:
    """One saved array as float32 numpy, from any of the stored formats (a damaged file raises DamagedFileError).

    ``max_bytes``: refuse (ArrayTooLarge) a file whose size, or decompressed size, is above it, before allocating.
    ``keep_dtype``: the array in the dtype it was stored in (float16 or float32), e.g. to copy it.
    """
    if max_bytes is not None and os.path.getsize(path) > max_bytes:
        raise ArrayTooLarge(f"{os.path.basename(path)} is larger than {max_bytes} bytes")
    with open(path, "rb") as f:
        data = f.read()
    try:
        if path.endswith(".gz"):
            data = gzip.decompress(data) if max_bytes is None else _bounded_gunzip(data, max_bytes, path)
        if path.endswith((".pt", ".pt.gz")):
            import torch
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            array = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        return array if keep_dtype else array.astype(np.float32)
    except (ArrayTooLarge, DamagedFileError):
        raise
    except (OSError, EOFError, ValueError, zlib.error, RuntimeError, KeyError, AttributeError, TypeError,
            pickle.UnpicklingError) as e:
        raise DamagedFileError(f"damaged attention file {path}: {type(e).__name__}: {e}", path) from None


_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[fiu][1248])', 'fortran_order': (False|True), "
                         r"'shape': \(((?:\d+, )*\d*)\), \} *\n")


def _read_npy_header(f) -> tuple:
    """``(shape, fortran_order, dtype, data_offset)`` of the ``.npy`` file ``f`` is positioned at the start of, by
    numpy's own parser."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, fortran, dtype, f.tell()


def _npy_header(head: bytes, fd: int) -> tuple:
    """``(shape, fortran_order, dtype, data_offset)`` of an ``.npy`` file from its first bytes ``head``. The header
    numpy writes is read with one pattern (numpy's own parser, ``ast.literal_eval``, costs more than a probe's
    reads); anything else goes to numpy's parser."""
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise ValueError("not an .npy file")
    size = 2 if head[6] == 1 else 4
    length = int.from_bytes(head[8:8 + size], "little")
    start = 8 + size + length
    m = _NPY_HEADER.fullmatch(head[8 + size:start].decode("latin1")) if start <= len(head) else None
    if m is None:
        with os.fdopen(os.dup(fd), "rb") as f:
            return _read_npy_header(f)
    shape = tuple(int(d) for d in m.group(3).split(",") if d.strip())
    return shape, m.group(2) == "True", np.dtype(m.group(1)), start


def load_cells(path: str, index: int, max_bytes: Optional[int] = None,
               expect: Optional[tuple] = None) -> np.ndarray:
    """``array[:, :, index]`` of one saved ``[blocks, heads, spatial, ...]`` array as float32. From an uncompressed
    ``.npy`` only the bytes of those cells are read (a point probe reads one cell of every step of every word: a
    whole read would be the recording's size); the other formats, and Fortran order, are loaded whole (bounded by
    ``max_bytes``). ``expect``: the ``(blocks, heads, cells)`` the recording's summary gives: a header saying other
    dimensions is a DamagedFileError, before anything is read by it."""
    if path.endswith(".npy"):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                shape, fortran, dtype, start = _npy_header(os.pread(fd, 4096, 0), fd)
                if len(shape) < 3 or not 0 <= index < shape[2] or dtype.hasobject:
                    raise ValueError(f"shape {shape} ({dtype}) has no cell {index}")
                if expect is not None and tuple(shape[:3]) != tuple(expect):
                    raise ValueError(f"its header's shape {list(shape)} is not the recording's [blocks, heads, "
                                     f"cells] {list(expect)}")
                outer, inner = int(np.prod(shape[:2])), int(np.prod(shape[3:], dtype=np.int64))
                run = inner * dtype.itemsize  # one cell's values of one block and head: contiguous
                stride = shape[2] * run
                if os.fstat(fd).st_size < start + outer * stride:
                    raise ValueError(f"the file is shorter than its header's shape {shape}")
                data = None if fortran else b"".join(
                    os.pread(fd, run, start + i * stride + index * run) for i in range(outer))
            finally:
                os.close(fd)
        except (OSError, ValueError) as e:
            raise DamagedFileError(f"damaged attention file {path}: {type(e).__name__}: {e}", path) from None
        if data is not None:
            return np.frombuffer(data, dtype=dtype).reshape(shape[:2] + shape[3:]).astype(np.float32)
    array = load_array(path, max_bytes)
    if expect is not None and tuple(array.shape[:3]) != tuple(expect):
        raise DamagedFileError(f"damaged attention file {path}: shape {list(array.shape)} is not the recording's "
                               f"[blocks, heads, cells] {list(expect)}", path)
    if array.ndim < 3 or not 0 <= index < array.shape[2]:
        raise DamagedFileError(f"damaged attention file {path}: shape {array.shape} has no cell {index}", path)
    return array[:, :, index]


def _finite(text: str) -> float:
    """A JSON number or constant: NaN passes (a value not known), infinities are refused (``1e999999``)."""
    value = float(text)
    if np.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


MAX_JSON_BYTES = 32 << 20  # the largest metadata file read (a long causal recording's summary or KV log: a few MB)


def _read_json(path: str) -> dict:
    """A metadata file: a JSON object of finite numbers (a damaged or tampered one is a DamagedFileError naming it);
    one over MAX_JSON_BYTES is refused before it is read."""
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise DamagedFileError(f"damaged metadata file {path}: {size} bytes, over the {MAX_JSON_BYTES} a metadata file "
                               "can be", path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f, parse_float=_finite, parse_constant=_finite)
        except (ValueError, RecursionError) as e:
            raise DamagedFileError(f"damaged metadata file {path}: {type(e).__name__}: {str(e)[:200]}", path) from None
    if not isinstance(data, dict):
        raise DamagedFileError(f"damaged metadata file {path}: a JSON object was expected, got {type(data).__name__}",
                               path)
    return data


MAX_GRID_FRAMES = 1 << 16  # latent frames a recording may have (an hour of causal video is ~22,500)
MAX_GRID_TOKENS = 1 << 26  # latent tokens (frames x height x width; 81 frames at 720p: 75,600)


def _grid(value) -> bool:
    """A latent grid readers may size arrays by: bounded before anything is allocated from it."""
    return _ints(value, 3, 1) and value[0] <= MAX_GRID_FRAMES and int(np.prod(value, dtype=np.int64)) <= MAX_GRID_TOKENS


_SUMMARY_FIELDS = {  # what readers rely on: name -> (check, what it must be)
    "latent_grid": (lambda v: _grid(v), f"three positive whole numbers of at most {MAX_GRID_TOKENS} tokens"),
    "map_grid": (lambda v: _grid(v), f"three positive whole numbers of at most {MAX_GRID_TOKENS} tokens"),
    "blocks": (lambda v: _ints(v, None, -1), "a list of block indices"),
    "heads": (lambda v: _ints(v, None, -1), "a list of head indices"),
    "steps": (lambda v: _ints(v, None, 0), "a list of steps"),
    "tokens": (lambda v: isinstance(v, list) and all(isinstance(t, dict) and isinstance(t.get("label"), str)
                                                     for t in v), "a list of words with labels"),
    "negative_tokens": (lambda v: isinstance(v, list) and all(isinstance(t, dict) and isinstance(t.get("label"), str)
                                                              for t in v), "a list of words with labels"),
    "arrays": (lambda v: isinstance(v, list), "a list of array keys"),
    "causal": (lambda v: isinstance(v, dict) and _ints(v.get("chunks"), None, 0), "a causal description"),
}


def _ints(value, length, low) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(type(v) is int and v >= low for v in value))


def checked_summary(summary: dict, path: str) -> dict:
    """``summary.json`` with the fields readers rely on of the right types, else a DamagedFileError naming it."""
    for name, (ok, what) in _SUMMARY_FIELDS.items():
        if name in summary and not ok(summary[name]):
            raise DamagedFileError(f"damaged metadata file {path}: {name!r} is not {what}", path)
    return summary


class AttentionFolder:
    """A ``<batch>/attention_maps`` folder: its videos, their summaries, words and files, every read confined and
    bounded.

    ``confine_to``: a folder every file read must resolve inside (symlinks included), else OutsideRoot; the viewer's
    routes confine reads to ComfyUI's output folder. ``max_bytes``: the largest array it loads (ArrayTooLarge).
    """

    def __init__(self, path: str, confine_to: Optional[str] = None, max_bytes: Optional[int] = None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no attention_maps folder at {path!r}")
        self.path = path
        self._warned: set = set()
        self._root = None if confine_to is None else os.path.realpath(confine_to)
        self.max_bytes = max_bytes

    def _checked(self, path: str) -> str:
        if self._root is not None:
            confined(self._root, os.path.relpath(os.path.realpath(path), self._root))
        return path

    def _checked_file(self, path: str) -> str:
        """``_checked`` for many files of few folders (a point probe's 120 steps x words): a folder is resolved once;
        a file in it that is not a symlink is inside with it, a symlink is resolved in full."""
        if self._root is None:
            return path
        folder = os.path.dirname(path)
        known = self.__dict__.setdefault("_folders_checked", set())
        if folder not in known:
            self._checked(folder)
            known.add(folder)
        return self._checked(path) if os.path.islink(path) else path

    def _array(self, path: str, keep_dtype: bool = False, bound: Optional[int] = None) -> np.ndarray:
        """One array; ``bound``: the most bytes the recording's geometry allows it (with ``max_bytes``, the lower)."""
        limit = min(b for b in (self.max_bytes, bound) if b is not None) if (self.max_bytes or bound) else None
        return load_array(self._checked(path), limit, keep_dtype)

    def _json(self, path: str) -> dict:
        return _read_json(self._checked(path))

    # -- discovery -----------------------------------------------------------------------------------
    def list_videos(self) -> List[str]:
        """Video ids: the seed's flat ``<prompt_id>_vidNNN/`` folders and the nested ``<prompt_id>/vidNNN/`` ones
        (the layout the contract's origin project writes), the nested ones named ``<prompt_id>_vidNNN`` too."""
        out = []
        for d in sorted(os.listdir(self.path)):
            path = os.path.join(self.path, d)
            if not os.path.isdir(path) or d.startswith("."):
                continue
            if os.path.isfile(os.path.join(path, "summary.json")):
                out.append(d)
            elif _NESTED_PROMPT.fullmatch(d):
                out += [f"{d}_{v}" for v in sorted(os.listdir(path)) if _NESTED_VIDEO.fullmatch(v)
                        and self._is_video(os.path.join(path, v))]
        return out

    @staticmethod
    def _is_video(path: str) -> bool:
        return os.path.isfile(os.path.join(path, "summary.json")) or bool(_token_dirs(path))

    def summary(self, video_id: str) -> dict:
        """The video's ``summary.json``; a video not marked ``complete`` warns once (its data may be missing).

        A video written without one (the nested layout) gets a summary read from its token folders and step files.
        """
        video = self._video(video_id)
        path = os.path.join(video, "summary.json")
        summary = checked_summary(self._json(path), path) if os.path.isfile(path) else \
            self._summary_from_files(video, video_id)
        if summary.get("status") != "complete" and video_id not in self._warned:
            self._warned.add(video_id)
            warnings.warn(f"attention recording {video_id!r} is {summary.get('status')!r}, not complete: "
                          f"{summary.get('partial_reason', 'no reason recorded')}", stacklevel=2)
        return summary

    def _summary_from_files(self, video: str, video_id: str) -> dict:
        tokens, steps, meta = [], set(), {}
        for d in _token_dirs(video):
            found = sorted(int(m.group(1)) for m in map(_STEP.match, os.listdir(os.path.join(video, d))) if m)
            steps.update(found)
            first = os.path.join(video, d, f"step_{found[0]:03d}_metadata.json") if found else ""
            meta = self._json(first) if os.path.isfile(first) else {}
            tokens.append({"label": meta.get("token_label") or meta.get("token_word") or d[len("token_"):],
                           "folder": d, "word": meta.get("token_word", d[len("token_"):])})
        keep = ("prompt", "prompt_id", "seed", "cfg_scale", "total_steps", "latent_grid", "map_grid", "model",
                "video_frames", "video_height", "video_width")
        return {"video_id": video_id, "status": "complete", "summary_from_files": True, "tokens": tokens,
                "steps": sorted(steps), **{k: meta[k] for k in keep if k in meta}}

    def list_tokens(self, video_id: str, branch: str = "") -> List[str]:
        """Labels of the tracked words, as ``summary.json`` lists them (files of other recordings never count);
        ``branch="uncond"``: the negative prompt's words (what the uncond rows attended to)."""
        tokens = self.tracked_words(video_id, branch)
        if tokens is not None:
            return sorted(t["label"] for t in tokens)
        v = self._video(video_id)
        return sorted(d[len("token_"):] for d in os.listdir(v) if d.startswith("token_") and os.path.isdir(os.path.join(v, d)))

    def tracked_words(self, video_id: str, branch: str = "") -> Optional[List[dict]]:
        """``summary.json``'s entries of the tracked words in prompt order (``uncond``: the negative prompt's)."""
        summary = self.summary(video_id)
        if branch == "uncond" and "negative_tokens" in summary:
            return summary["negative_tokens"]
        return summary.get("tokens")

    def list_steps(self, video_id: str, token: str, branch: str = "") -> List[int]:
        """Saved steps of a word, as ``summary.json`` lists them."""
        folder = self._token_dir(video_id, token, branch)
        steps = self.summary(video_id).get("steps")
        if steps is not None:
            return sorted(int(s) for s in steps)
        return sorted(int(m.group(1)) for m in map(_STEP.match, os.listdir(folder)) if m)

    def _video(self, video_id: str) -> str:
        path = os.path.join(self.path, safe_name(video_id))
        if not os.path.isdir(path):
            # the nested layout: <prompt_id>/vidNNN, named <prompt_id>_vidNNN or <prompt_id>/vidNNN
            prompt, sep, number = video_id.replace("/", "_").rpartition("_vid")
            nested = os.path.join(self.path, safe_name(prompt), f"vid{number}") if sep and number.isdigit() else ""
            if nested and os.path.isdir(nested):
                return nested
            raise FileNotFoundError(f"no video {video_id!r} in {self.path}; videos: {self.list_videos()}")
        return path

    def _token_dir(self, video_id: str, token: str, branch: str = "") -> str:
        video = self._video(video_id)
        # the folder summary.json names for the word (names that collided were made unique when saved)
        named = {t["label"]: t.get("folder") for t in self.tracked_words(video_id, branch) or []}
        name = named.get(token) or f"token_{safe_name(token, 'token')}"
        folder = os.path.join(video, *(["uncond"] if branch == "uncond" else []), name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no token {token!r} in video {video_id!r} ({branch or 'cond'}); tokens: "
                                    f"{self.list_tokens(video_id, branch)}")
        return folder

    @staticmethod
    def _find(stem: str) -> str:
        for ext in _EXTS:
            if os.path.isfile(stem + ext):
                return stem + ext
        raise FileNotFoundError(f"missing attention file {stem}.npy (or .npy.gz/.pt/.pt.gz): listed as saved but "
                                "not there")


def _token_dirs(path: str) -> List[str]:
    return sorted(d for d in os.listdir(path) if d.startswith("token_") and os.path.isdir(os.path.join(path, d)))


def _branch(branch: str) -> str:
    """The analyzer's branch argument (``""`` or ``"cond"`` for the cond rows, ``"uncond"``) as a key's."""
    if branch not in ("", "cond", "uncond"):
        raise ValueError(f"branch must be '' (cond) or 'uncond', got {branch!r}")
    return "uncond" if branch == "uncond" else "cond"
