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

import contextlib
import errno
import gzip
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..grid import Grid, pool_spatial
from ..capture.recorder import Take
from . import ArrayKey, MemoryRecording, Recording, key_path, metadata_path
from .memory import expert_meta, expert_of, plain_prompt, readable, tracking_of, video_size  # noqa: F401
from .confine import OutsideRoot, StorageError, confined, safe_name  # noqa: F401  (public names)
from .recording import PROVENANCE

FORMATS = {"numpy": ".npy", "torch": ".pt"}


class CopyFailed(ValueError):
    """A copy of a saved recording failed and kept nothing; the message names the file and why."""


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it, then rename it over ``path``."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: saved files follow the umask like any other
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def encode_array(array: np.ndarray, fmt: str, compress: bool) -> bytes:
    """The file bytes of one array: ``.npy`` or ``.pt``, gzip-compressed when asked (no timestamp: same bytes)."""
    buf = io.BytesIO()
    if fmt == "numpy":
        np.save(buf, np.asarray(array))
    else:
        torch.save(torch.from_numpy(np.array(array)), buf)
    data = buf.getvalue()
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


@dataclass
class SaveOptions:
    """How to write; the seed's configuration options, applied on top of what was recorded.

    Args:
        storage_format: ``numpy`` (``.npy``) or ``torch`` (``.pt``).
        compress: gzip each array (``.npy.gz`` / ``.pt.gz``).
        storage_interval: write every n-th recorded step.
        storage_dtype: ``float16`` or ``float32`` for every array but the exact windows (float32 always).
        spatial_downsample_factor: average-pool the token maps' cells further by this factor.
        prompt_id: the video folders' ``<prompt_id>``; None: the recording's (the tracker's ``prompt_000``...).
        video_number: the number of the first video (``vid<NNN>``); batch items count up from it.
        prompt: the prompt the metadata names; None: the recording's.
        extra: more fields for every metadata file.
        if_exists: an existing video folder is ``replace``-d as a whole, or kept while this one is written to a
            ``new_name`` (``<video>_2``, ``_3``, ...).
    """

    storage_format: str = "numpy"
    compress: bool = False
    storage_interval: int = 1
    storage_dtype: str = "float16"
    spatial_downsample_factor: int = 1
    prompt_id: Optional[str] = None
    video_number: int = 1
    prompt: Optional[str] = None
    extra: dict = field(default_factory=dict)
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


class _Writer:
    def __init__(self, folder: str, opts: SaveOptions, progress: Optional[Callable[[str], None]]):
        self.folder, self.opts, self.progress = folder, opts, progress
        self.ext = FORMATS[opts.storage_format] + (".gz" if opts.compress else "")
        self.files: List[str] = []

    def write(self, rel: str, data: bytes) -> str:
        path = confined(self.folder, rel, purpose="write")
        try:
            os.makedirs(os.path.dirname(path), mode=0o777, exist_ok=True)
            atomic_write(path, data)
        except OSError as e:
            raise StorageError(f"could not write {path}: {e.strerror or e}. Files written before it are intact; "
                               f"the video's summary.json stays marked partial.") from e
        self.files.append(path)
        if self.progress:
            self.progress(path)
        return path

    def array(self, rel: str, array: np.ndarray) -> str:
        return self.write(rel + self.ext, encode_array(array, self.opts.storage_format, self.opts.compress))


def saved_keys(rec: Recording, opts: SaveOptions) -> List[ArrayKey]:
    """The keys of ``rec`` a save with ``opts`` writes (every ``storage_interval``-th step), in writing order."""
    order = {"cross": 0, "image": 1, "sink": 2, "window": 3}
    keys = [k for k in rec.keys() if k.step % opts.storage_interval == 0]
    return sorted(keys, key=lambda k: (k.branch != "cond", order[k.stat], k.name if k.stat == "cross" else "",
                                       -1 if k.chunk is None else k.chunk, k.step, k.block or 0, k.name))


def plan_file_count(take: Take, opts: SaveOptions) -> int:
    """Files one video of ``take`` will take (for progress bars)."""
    return file_count(MemoryRecording(take, 0), opts)


def file_count(rec: Recording, opts: SaveOptions, frames: Optional[int] = None) -> int:
    """Files a save of ``rec`` writes: arrays, their metadata files, the summary (twice), the KV log, the frames
    (``frames`` decoded frames given to the save, else those kept with ``rec``)."""
    keys = saved_keys(rec, opts)
    kept = rec.frame_count() if frames is None else frames
    return len(keys) + len({k.group() for k in keys}) + 2 + (1 if rec.causal else 0) + kept


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
    batch = take.batch or 1
    if frames is not None and len(frames) % batch:
        raise ValueError(f"{len(frames)} decoded frames do not split into the recording's {batch} videos")
    per = None if frames is None else len(frames) // batch
    return [save_recording(MemoryRecording(take, b), output_root, batch_name, opts, progress, version,
                           None if frames is None else frames[b * per:(b + 1) * per], batch_index=b)
            for b in range(batch)]


def save_recording(rec: Recording, output_root: str, batch_name: str, opts: SaveOptions = SaveOptions(),
                   progress: Optional[Callable[[str], None]] = None, version: str = "",
                   frames: Optional[np.ndarray] = None, prompt_id: Optional[str] = None,
                   batch_index: int = 0) -> SavedVideo:
    """Write one video's recording, live or saved (a saved one is copied: the arrays byte for byte when the options
    keep its format, dtype and pooling), as ``<output_root>/<batch_name>/attention_maps/<prompt_id>_vid<NNN>``.

    ``frames``: decoded frames ``[T, H, W, 3]`` in [0, 1]; without them, the frames kept with ``rec``.
    """
    folder = safe_name(batch_name, fallback="")
    if not folder:  # never a shared fallback folder: two batches of such names would mix
        raise ValueError(f"batch_name {batch_name!r} has no letters or digits to name a folder with: give a name "
                         "such as 'roses'")
    root = confined(output_root, folder, "attention_maps", purpose="write")
    if frames is not None:
        check_frames(rec, frames)
    prompt_id = safe_name(opts.prompt_id or prompt_id or str(rec.summary.get("prompt_id") or ""), "prompt_000")
    return _save_video(rec, root, prompt_id, batch_index, opts, progress, version, frames)


def check_frames(rec: Recording, frames: np.ndarray) -> None:
    """Decoded frames kept for the viewer must be the recording's video: as many frames as its latent frames decode
    to (with or without VACE reference frames) and its pixel size, else the viewer would draw misaligned."""
    from ..capture.time_layout import video_maps
    s = rec.summary
    video_maps(np.zeros((1, s["latent_grid"][0], 1, 1)), s, len(frames), (s.get("model") or {}).get(
        "vae_stride", [4])[0])  # raises "time mismatch: ..." for a count no layout explains
    size = tuple(frames.shape[1:3])
    want = (s.get("video_height"), s.get("video_width"))
    if None not in want and size != want:
        raise ValueError(f"the decoded frames are {size[0]}x{size[1]} pixels, but this recording's video is "
                         f"{want[0]}x{want[1]}: connect the VAE Decode of the same sampler output, not resized")


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.clip(frame[..., :3], 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# Hidden siblings of a video folder while it is saved: ".<video>.tmp-<token>" (the files being written) and
# ".<video>.old-<token>" (a replaced recording, between the swap's two renames). <token> names the save; the save
# holds a lock on ".<video>.save-<token>.lock" (an flock on the file system) while it runs, so a sweep removes only
# what a save that is no longer running left behind: the kernel (or the file server) drops a killed save's lock,
# whatever host, container or process-id namespace it ran in. A name is claimed under ".<video>.lock".
_LEFTOVER = re.compile(r"^\.(?P<video>.+)\.(?P<kind>tmp|old)-(?P<token>[\w.-]+)$")
STALE_SECONDS = 24 * 3600  # a leftover of an older version (no lock to ask) this old is abandoned


class _Lock:
    """An exclusive lock on a file beside the recordings (fcntl.flock; where there is none, e.g. Windows, no lock:
    saves of one name at once are then not kept apart)."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self, wait: bool = True, create: bool = True) -> bool:
        """Take the lock (``wait``: until it is free); False when it is held (or, ``create`` off, not there). The
        file is removed by whoever releases it: a lock taken on a file that was removed meanwhile is taken again on
        the file now at the path."""
        try:
            import fcntl
        except ImportError:
            return True
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return True
            except FileNotFoundError:
                pass
            os.close(fd)  # released and removed between our open and our lock
            if not create:
                return False

    def release(self, remove: bool = True) -> None:
        """Let go (removing the file first, so nothing is left beside the recordings)."""
        if self.fd is not None:
            if remove:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _name_lock(root: str, name: str) -> _Lock:
    """The lock of one video name: held by a save from its claim (or from before its swap) until its folder is in
    place, so a claimed name is only ever filled by its claimant, and two saves never rename at once."""
    return _Lock(os.path.join(root, f".{name}.lock"))


def _save_lock(root: str, video_id: str, token: str) -> _Lock:
    return _Lock(os.path.join(root, f".{video_id}.save-{token}.lock"))


def _abandoned(match, path: str) -> bool:
    """Whether the save that made this hidden folder is gone: its lock can be taken (or, for a leftover of a version
    without locks, it is stale)."""
    root = os.path.dirname(path)
    lock = _save_lock(root, match.group("video"), match.group("token"))
    if os.path.exists(lock.path):
        if not lock.acquire(wait=False, create=False):
            return False  # a save still running (here or on any server sharing the folder), or just finished
        lock.release()
        return True
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_SECONDS
    except OSError:
        return False


def sweep_leftovers(root: str) -> List[str]:
    """Tidy what killed saves left in ``root`` (any video): a replaced recording moved aside is put back where its
    video has nothing complete, unfinished folders go. Saves still running (here or on another server sharing the
    folder) are never touched. Returns what was removed or restored."""
    done = []
    for name in sorted(os.listdir(root)):
        m = _LEFTOVER.match(name)
        path = os.path.join(root, name)
        if not m or not os.path.isdir(path) or os.path.islink(path) or not _abandoned(m, path):
            continue
        final = os.path.join(root, m.group("video"))
        with _name_lock(root, m.group("video")):
            if m.group("kind") == "old" and (not os.path.lexists(final) or _is_empty_dir(final)):
                if os.path.lexists(final):
                    os.rmdir(final)
                os.rename(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)
        done.append(name)
    return done


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


SWAP_ATTEMPTS = 20  # another replacing save may put its folder at the name between our move-aside and our rename


def _swap_in(work: str, final: str, token: str) -> None:
    """Put the finished folder ``work`` at ``final``, replacing whatever was there as a whole (an empty folder, the
    name this save claimed, is replaced by the rename itself); the caller holds the name's lock."""
    for _ in range(SWAP_ATTEMPTS):
        old = None
        if os.path.lexists(final) and not _is_empty_dir(final):
            old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{token}")
            try:
                os.rename(final, old)
            except FileNotFoundError:  # a save of an older version moved it aside first
                old = None
        try:
            os.rename(work, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    raise StorageError(f"could not put the recording at {final}: other saves kept replacing it ({SWAP_ATTEMPTS} tries)")


def _claim(root: str, video_id: str) -> Tuple[str, _Lock]:
    """The first free name of ``video_id``, ``video_id_2``, ... made ours by creating it (an empty folder, which
    readers do not list) under its name's lock, which the caller holds until its folder is in place: no other save,
    in any process or server sharing the folder, takes or fills that name meanwhile."""
    n = 1
    while True:
        name = video_id if n == 1 else f"{video_id}_{n}"
        lock = _name_lock(root, name)
        if lock.acquire(wait=False):
            try:
                os.mkdir(confined(root, name, purpose="write"))
                return name, lock
            except FileExistsError:
                lock.release()
        n += 1


def _complete(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            return json.load(f).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def _keep_failed(work: str, root: str, video_id: str, final: str, token: str) -> str:
    """A save that failed (holding its name's lock): what it wrote replaces nothing complete. Returns where it went and
    what was kept."""
    if _complete(final):  # an overwrite that failed: the previous complete recording stays
        beside, lock = _claim(root, f"{video_id}_partial")
        try:
            _swap_in(work, os.path.join(root, beside), token)
        finally:
            lock.release()
        return (f"the previous complete recording at {final} is kept; what this save wrote is at "
                f"{os.path.join(root, beside)}, marked partial")
    _swap_in(work, final, token)
    return f"what this save wrote is at {final}, marked partial"


def _save_video(rec: Recording, root, prompt_id, b, opts, progress, version, frames=None) -> SavedVideo:
    """Write one video into a fresh folder beside its final place, then swap it in: a new recording replaces an
    old one completely (no stale files), and a save killed midway leaves the previous recording untouched."""
    os.makedirs(root, mode=0o777, exist_ok=True)
    sweep_leftovers(root)
    video_id = f"{prompt_id}_vid{opts.video_number + b:03d}"
    keys = saved_keys(rec, opts)  # a recording that cannot list its arrays is refused before a name is claimed
    name_lock = None
    if opts.if_exists == "new_name":  # the earlier recording stays as it is; the report names the new one
        video_id, name_lock = _claim(root, video_id)
    try:
        return _save_claimed(rec, keys, root, prompt_id, b, opts, progress, version, frames, video_id, name_lock)
    except BaseException:
        if name_lock is not None and _is_empty_dir(os.path.join(root, video_id)):
            os.rmdir(os.path.join(root, video_id))  # a claim nothing was put in goes back (a failed copy)
        raise
    finally:
        if name_lock is not None:
            name_lock.release()


def _save_claimed(rec, keys, root, prompt_id, b, opts, progress, version, frames, video_id, name_lock) -> SavedVideo:
    final = confined(root, video_id, purpose="write")
    token = f"{secrets.token_hex(8)}"
    alive = _save_lock(root, video_id, token)  # held while this save runs: a sweep elsewhere leaves its folders
    alive.acquire()
    try:
        return _write_video(rec, keys, root, prompt_id, b, opts, progress, version, frames, video_id, name_lock,
                            final, token)
    finally:
        alive.release(remove=True)


def _write_video(rec, keys, root, prompt_id, b, opts, progress, version, frames, video_id, name_lock, final,
                 token) -> SavedVideo:
    folder = os.path.join(root, f".{video_id}.tmp-{token}")
    os.mkdir(folder)
    os.chmod(folder, 0o777 & ~_umask())  # the saved folder follows the umask like any other
    w = _Writer(folder, opts, progress)
    provenance = {"video_id": video_id, "prompt_id": prompt_id, "video_number": opts.video_number + b,
                  "batch_index": b, "storage_format": opts.storage_format, "compressed": opts.compress,
                  "pack_version": version}
    overrides, folders, summary = _video_summary(rec, keys, provenance, opts)
    w.write("summary.json", _json(summary))
    if rec.summary.get("status", "complete") != "complete":
        summary["partial_reason"] = rec.summary.get("partial_reason") or f"recording {rec.summary.get('status')}"
        absent = rec.absent()
        if absent:  # a copy of a partial recording: what its save never wrote is named, not guessed at
            summary["partial_reason"] += (f"; copied from a partial recording, {len(absent)} of its listed arrays "
                                          f"were not there: {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    try:
        _write_arrays(w, rec, keys, folders, overrides, opts)
        if rec.causal:
            w.write("kv_cache_events.json", _json({"events": rec.kv_events()}))
        pngs = [_png(frame) for frame in frames] if frames is not None else rec.frame_pngs()
        for t, data in enumerate(pngs):
            w.write(f"frames/frame_{t:04d}.png", data)
        summary["frames"] = len(pngs)
    except BaseException as e:
        summary["partial_reason"] = f"writing failed: {type(e).__name__}: {e}"
        summary["files_written"] = len(set(w.files))
        try:
            w.write("summary.json", _json(summary))
        except OSError:
            pass  # the summary written first already says partial ("writing")
        if not rec.live:  # a copy: the source is unchanged and holds all of it, so a failed copy keeps nothing
            shutil.rmtree(folder, ignore_errors=True)
            where = f"nothing of the copy was kept; the source recording {rec.summary.get('video_id')!r} is unchanged"
        else:
            try:
                with _name_lock(root, video_id) if name_lock is None else contextlib.nullcontext():
                    where = _keep_failed(folder, root, video_id, final, token)
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                where = "what this save wrote could not be kept"
        if isinstance(e, OSError):
            raise StorageError(f"{e} ({where})") from e
        if not rec.live and isinstance(e, Exception):
            raise CopyFailed(f"{e} ({where})") from e
        raise
    if rec.summary.get("status", "complete") == "complete":
        summary["status"] = "complete"
        summary.pop("partial_reason")
    summary["files_written"] = len(set(w.files))  # summary.json is among them already
    summary["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    w.write("summary.json", _json(summary))
    with _name_lock(root, video_id) if name_lock is None else contextlib.nullcontext():  # a claimant's name: its own
        _swap_in(folder, final, token)
    files = [final + p[len(folder):] for p in dict.fromkeys(w.files)]
    return SavedVideo(video_id, final, summary["status"], files)


def _video_summary(rec: Recording, keys: List[ArrayKey], provenance: dict, opts: SaveOptions):
    """What this save decides over what the recording says (``overrides``: provenance, pooled grid, dtype), each
    word's folder, and the summary written first (marked partial until the last file is in place)."""
    map_grid = Grid(*rec.summary["map_grid"]) if rec.summary.get("map_grid") else None
    if map_grid is not None and opts.spatial_downsample_factor > 1:
        map_grid = map_grid.pooled(opts.spatial_downsample_factor)
    overrides = {**provenance, "map_grid": None if map_grid is None else map_grid.as_list(),
                 "dtype": f"torch.{opts.storage_dtype}", **opts.extra}
    if opts.prompt is not None:
        overrides.update(prompt=plain_prompt(opts.prompt), prompt_weighted=opts.prompt)
    folders = {br: token_folders([word["label"] for word in rec.words(br)]) for br in ("cond", "uncond")}
    summary = {**{k: v for k, v in rec.summary.items() if k not in PROVENANCE}, **overrides,
               "status": "partial", "partial_reason": "writing",
               "steps": sorted({k.step for k in keys}), "branches": rec.summary.get("branches") or ["cond"],
               "tokens": [{**t, "folder": folders["cond"][t["label"]]} for t in rec.words("cond")],
               "self_attention": any(k.stat == "sink" for k in keys),
               "windows": any(k.stat == "window" for k in keys), "arrays": [k.as_list() for k in keys]}
    if rec.words("uncond") and any(k.stat == "cross" and k.branch == "uncond" for k in keys):
        summary["negative_tokens"] = [{**t, "folder": folders["uncond"][t["label"]]} for t in rec.words("uncond")]
    return overrides, folders, summary


def _write_arrays(w: _Writer, rec: Recording, keys: List[ArrayKey], folders: dict, overrides: dict,
                  opts: SaveOptions) -> None:
    """Each key's array, then its group's metadata once the group is written (provenance and shapes of this save)."""
    dtype, pool = (np.float16 if opts.storage_dtype == "float16" else np.float32), opts.spatial_downsample_factor
    groups: Dict[ArrayKey, List[ArrayKey]] = {}
    for key in keys:
        groups.setdefault(key.group(), []).append(key)
    for group, members in groups.items():
        folder = folders[group.branch].get(group.name) if group.stat == "cross" else None
        shapes = {}
        for key in members:
            arr = rec.get(key)
            if key.stat == "cross" and pool > 1:
                source = Grid(*rec.summary["map_grid"])
                arr = pool_spatial(torch.from_numpy(np.asarray(arr, np.float32)), source, pool).numpy()
            if key.stat != "window":  # exact windows stay float32 whatever the storage dtype: they are for study
                arr = np.asarray(arr, dtype=dtype)
            arr = np.ascontiguousarray(arr)
            shapes[key.name] = list(arr.shape)
            w.array(key_path(key, folder), arr)
        recorded = rec.metadata(group)
        meta = {**recorded, **overrides}
        if group.branch != "cond" and group.stat == "cross":  # the uncond rows' words are the negative prompt's
            meta.update({k: recorded[k] for k in ("prompt", "prompt_weighted")})
        if group.stat == "cross":
            nb, nh, spatial, ntok = shapes[group.name]
            meta.update(token_folder=folder, attention_shape=[nb, nh, spatial, ntok], spatial_resolution=[spatial, ntok],
                        num_blocks=nb, num_heads=nh)
        elif group.stat == "window":
            meta.update(shape=shapes["scores"], dtype="torch.float32")
        else:
            meta.update(shapes=shapes)
        w.write(metadata_path(group, folder), _json(meta))


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def token_folders(labels) -> Dict[str, str]:
    """``token_<label>`` folder of each tracked word, unique within the video: labels that sanitise (or cut at 80
    characters) to the same name get ``_2``, ``_3``... (the summary's ``tokens`` records each word's folder)."""
    out: Dict[str, str] = {}
    used = set()
    for label in labels:
        base = f"token_{safe_name(label, 'token', limit=74)}"
        name, n = base, 1
        while name.lower() in used:  # case-insensitive file systems would merge case-only differences too
            n += 1
            name = f"{base}_{n}"
        used.add(name.lower())
        out[label] = name
    return out


