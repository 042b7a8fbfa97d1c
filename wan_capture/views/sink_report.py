"""A sink report of one recording: the series of :mod:`wan_capture.stats.sink_dynamics` per step, chunk, block and
head, as a table (CSV and JSON) and as plots with axes, titles and colour bars.

    from wan_capture import AttentionAnalyzer
    from wan_capture.views.sink_report import sink_series, write_sink_report
    rec = AttentionAnalyzer("out/causal_demo/attention_maps").recording("causal_vid001")   # or MemoryRecording(take)
    rows = sink_series(rec)                     # one dict per (step, chunk, block, head)
    files = write_sink_report(rec, "out/sink_report")

or ``python -m wan_capture sink-report <attention_maps folder> --out <dir>``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..keys import ArrayKey, key_path
from ..recording.reader import DamagedFileError
from ..recording.recording import Recording, chunk_key_frames
from ..stats.sink_dynamics import CLASSES, behavioural_sinks, class_mass, head_agreement, key_classes, sink_distance
from .render import line_plot, matrix_plot

COLUMNS = ("step", "pass", "chunk", "block", "head", *(f"mass_{c}" for c in CLASSES), "head_agreement",
           "key_frames", "sink_frames", "behavioural_sinks", "sink_distance")
DEFINITIONS = {
    "mass_<class>": "mean over the chunk's query frames of the attention mass on its key frames of that class (sink: "
                    "frames the model keeps as sinks; pinned: frames it pins beside them; chunk: the chunk's own "
                    "frames; window: every other cached frame); frames not in the cache are absent",
    "head_agreement": "mean over the chunk's query frames of the mean over pairs of heads of 1 - JS (bits) between "
                      "the heads' key-frame distributions; 1: every head attends alike; empty with one head",
    "behavioural_sinks": "key frames whose share (mean mass over the query frames) exceeds multiple x 1/key frames",
    "sink_distance": "per sink frame, the mean RoPE frame distance from the chunk's query frames",
}


def _events(rec: Recording) -> Dict[tuple, dict]:
    return {(e.get("chunk"), e.get("step"), e.get("block")): e for e in rec.kv_events() if isinstance(e, dict)}


def sink_series(rec: Recording, branch: str = "cond", multiple: float = 2.0) -> List[dict]:
    """One row per (step, chunk, block, head) of every recorded frame x frame mass (see the module docstring).

    Causal recordings: each chunk against the key frames of its cache (its KV log gives the sinks); bidirectional
    ones: the whole video as one chunk, every key frame ``window``. Heads kept as their mean give one row with
    head -1 and no agreement.
    """
    events, rows = _events(rec), []
    step_pass = {int(k): v for k, v in ((rec.summary.get("causal") or {}).get("step_pass") or {}).items()}
    for key in sorted((k for k in rec.keys_of("sink", branch) if k.name == "frame_mass"), key=ArrayKey.order):
        mass = np.asarray(rec.get(key), dtype=np.float64)  # [blocks, heads, Fq, Fk]
        if mass.ndim != 4 or mass.shape[:2] != (len(rec.blocks), len(rec.heads)):
            raise DamagedFileError(f"damaged attention file {key_path(key)} of {rec.summary.get('video_id', 'the video')}: "
                                   f"its frame x frame mass has shape {list(mass.shape)}, not [blocks "
                                   f"{len(rec.blocks)}, heads {len(rec.heads)}, query frames, key frames]", key_path(key))
        meta = rec.metadata(key)
        chunk = key.chunk if key.chunk is not None else 0
        query_frames = list(meta.get("query_frames") or range(mass.shape[-2]))
        for bi, block in enumerate(rec.blocks):
            event = _event(events, key.chunk, key.step, block)
            frames = _key_frames(meta, block, event, mass.shape[-1], key.chunk)
            sinks = list(event.get("sink_frames") or [])
            classes = key_classes(frames, chunk if key.chunk is not None else max(frames) + 1, sinks,
                                  event.get("pinned_frames") or ())
            agree = head_agreement(mass[bi]) if mass.shape[1] > 1 else np.full(mass.shape[2], np.nan)
            for hi, head in enumerate(rec.heads):
                per_class = class_mass(mass[bi, hi], classes)
                rows.append({
                    "step": key.step, "pass": step_pass.get(key.step, "denoise"), "chunk": key.chunk,
                    "block": block, "head": head,
                    **{f"mass_{c}": float(per_class[c].mean()) for c in CLASSES},
                    "head_agreement": None if np.isnan(agree).all() else float(np.mean(agree)),
                    "key_frames": list(frames), "sink_frames": sinks,
                    "behavioural_sinks": behavioural_sinks(mass[bi, hi], frames, multiple),
                    "sink_distance": sink_distance(query_frames, sinks, _positions(event))})
    return rows


def _positions(event: dict) -> Dict[int, int]:
    """Absolute frame -> the frame position RoPE gave it in the logged call (re-roped anchors, relative RoPE)."""
    return {int(f): int(p) for f, p in zip(event.get("key_frames") or (), event.get("rope_frames") or ()) if p >= 0}


def _event(events: Dict[tuple, dict], chunk, step: int, block: int) -> dict:
    """The KV log's entry of a chunk, step and block; for blocks kept as their mean, the first block's."""
    if (chunk, step, block) in events:
        return events[(chunk, step, block)]
    same = sorted(b for (c, s, b) in events if c == chunk and s == step and isinstance(b, int))
    return events[(chunk, step, same[0])] if same and block < 0 else {}


def _key_frames(meta: dict, block: int, event: dict, count: int, chunk) -> List[int]:
    if event.get("key_frames") is not None and len(event["key_frames"]) == count:
        return [int(f) for f in event["key_frames"]]
    if chunk is None:
        return list(range(count))
    per_block = meta.get("key_frames_per_block") or {}
    return [int(f) for f in per_block.get(str(block), chunk_key_frames(meta))]


def _mean_rows(rows: List[dict], field: str) -> Optional[float]:
    values = [r[field] for r in rows if r[field] is not None]
    return float(np.mean(values)) if values else float("nan")


def report_step(rec: Recording, rows: List[dict]) -> int:
    """The step the plots show by default: the last denoising step (the context pass refills the cache)."""
    denoise = sorted({r["step"] for r in rows if r["pass"] == "denoise"})
    return denoise[-1] if denoise else max(r["step"] for r in rows)


def write_sink_report(rec: Recording, out_dir: str, branch: str = "cond", step: Optional[int] = None,
                      multiple: float = 2.0) -> Dict[str, str]:
    """The series (``series.csv``, ``series.json``) and the plots (sink mass per head against the chunk, head
    agreement, the eviction timeline, frame x frame per chunk) of ``rec``, in ``out_dir``; returns name -> path."""
    rows = sink_series(rec, branch, multiple)
    if not rows:
        raise ValueError("no self-attention statistics in this recording: record with sink statistics on")
    step = report_step(rec, rows) if step is None else step
    at = [r for r in rows if r["step"] == step]
    if not at:
        raise ValueError(f"no sink statistics at step {step}; steps: {sorted({r['step'] for r in rows})}")
    os.makedirs(out_dir, exist_ok=True)
    files = {"series.csv": _csv(rows), "series.json": (json.dumps(
        {"step_shown": step, "multiple": multiple, "definitions": DEFINITIONS, "columns": list(COLUMNS),
         "rows": rows}, indent=1) + "\n").encode()}
    chunks = sorted({r["chunk"] for r in at}, key=lambda c: -1 if c is None else c)
    x = [0 if c is None else c for c in chunks]
    heads = sorted({r["head"] for r in at})
    per_head = [(f"head {h}" if h >= 0 else "mean of heads", x,
                 [_mean_rows([r for r in at if r["chunk"] == c and r["head"] == h], "mass_sink") for c in chunks])
                for h in heads]
    files["sink_mass_per_head.png"] = _png(line_plot(per_head, "chunk (first latent frame)", "mass on sink frames",
                                                     f"sink mass per head, step {step}, mean over blocks"))
    files["head_agreement.png"] = _png(line_plot(
        [("mean over blocks", x, [_mean_rows([r for r in at if r["chunk"] == c], "head_agreement") for c in chunks])],
        "chunk (first latent frame)", "head agreement (1 - JS)", f"head agreement, step {step}"))
    files["eviction_timeline.png"] = _png(_timeline(rec, at, chunks))
    for c in chunks:
        files[f"frame_mass_chunk_{0 if c is None else c:03d}.png"] = _png(_chunk_matrix(rec, step, c, branch))
    paths = {}
    for name, data in files.items():
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
    return paths


def _csv(rows: List[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                    for k, v in r.items()})
    return buf.getvalue().encode()


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _timeline(rec: Recording, at: List[dict], chunks: Sequence) -> np.ndarray:
    """Absolute frame x chunk: what each chunk's cache held (0 not cached, 1 window, 2 pinned, 3 sink, 4 own chunk)."""
    frames = rec.summary["latent_grid"][0]
    code = {"window": 1, "pinned": 2, "sink": 3, "chunk": 4}
    grid = np.zeros((frames, len(chunks)))
    for j, c in enumerate(chunks):
        row = next(r for r in at if r["chunk"] == c)
        start = c if c is not None else frames
        for f, k in zip(row["key_frames"], key_classes(row["key_frames"], start, row["sink_frames"])):
            if 0 <= f < frames:
                grid[f, j] = code[k]
    ticks = [(j, str(0 if c is None else c)) for j, c in enumerate(chunks)]
    return matrix_plot(grid, "viridis", 0, 4, "chunk (first latent frame)", "latent frame",
                       "KV cache per chunk (0 not cached, 1 window, 2 pinned, 3 sink, 4 own chunk)",
                       ticks, [(f, str(f)) for f in range(frames)])


def _chunk_matrix(rec: Recording, step: int, chunk, branch: str) -> np.ndarray:
    """A chunk's query frame x absolute key frame mass (mean over blocks and heads); frames not in its cache grey."""
    key = ArrayKey("sink", "frame_mass", step, branch, chunk=chunk)
    mass = np.asarray(rec.get(key), dtype=np.float64).mean(axis=(0, 1))
    meta = rec.metadata(key)
    frames = rec.summary["latent_grid"][0]
    keys = _key_frames(meta, rec.blocks[0], {}, mass.shape[-1], chunk)
    query = list(meta.get("query_frames") or range(mass.shape[0]))
    full = np.full((len(query), frames), np.nan)
    for j, f in enumerate(keys):
        if 0 <= f < frames:
            full[:, f] = mass[:, j]
    return matrix_plot(full, "inferno", 0.0, float(max(np.nanmax(full), 1e-12)), "key frame (absolute)",
                       "query frame", f"chunk {0 if chunk is None else chunk}, step {step}: mass (grey: not in the cache)",
                       [(f, str(f)) for f in range(frames)], [(i, str(q)) for i, q in enumerate(query)])
