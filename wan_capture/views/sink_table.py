"""The sink table: the metrics of :mod:`wan_capture.stats.sink_dynamics` over a recording, one row per step, pass,
branch, chunk, block and head, with each key frame's mass, class and RoPE position, and the frame x frame matrices
the figures draw; and the rows that put several runs side by side. :mod:`.sink_report` writes them (CSV, JSON),
:mod:`.sink_plots` draws them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..keys import key_path
from ..recording.reader import DamagedFileError
from ..recording.recording import Recording, chunk_key_frames
from ..stats.sink_dynamics import (CLASSES, behavioural_sinks, class_share, concentration, head_consensus,
                                   key_classes, key_share, per_token_mean, rope_distance, step_change, uniform_share)

COLUMNS = ("step", "pass", "branch", "chunk", "block", "head", "query_frames", "key_frames", "frame_tokens",
           "sink_frames", "pinned_frames", *(f"mass_{c}" for c in CLASSES), *(f"uniform_{c}" for c in CLASSES),
           "sink_ratio", "concentration", "head_consensus", "consensus_pairs", "mean_concentration", "step_change",
           "behavioural_sinks", "sink_rope_distance", "key_classes", "key_mass", "key_rope_positions",
           "key_rope_distance")
MAX_ROWS = 120_000  # rows of one table, ~4 KB each in Python (under 500 MB): Wan 14B, 40 blocks x 40 heads x 70
# chunk-steps (7 chunks x 5 steps x 2 branches, 112,000 rows), fits
FRAME_COLUMNS = ("step", "pass", "branch", "chunk", "block", "head", "key_frame", "class", "tokens", "rope_position",
                 "rope_distance", "mass", "per_token_mean")
DEFINITIONS = {
    "mass_<class>": "S_c: mean over the chunk's query frames a of sum over its key frames b of class c of m[a, b] "
                    "(m: frame x frame mass, rows sum to 1 over the cache). Classes: sink (the log's sink frames), "
                    "pinned (frames pinned beside them), chunk (the chunk's own frames), window (every other cached "
                    "frame). Empty when no frame of the class is in the cache (absent, not 0)",
    "uniform_<class>": "U_c = sum over the class's key frames of T_b / sum over all cached key frames of T_b: "
                       "the share the class would get if every key were attended alike",
    "sink_ratio": "mass_sink / uniform_sink (1: no preference for the sink; empty without a sink in the cache)",
    "concentration": "this head's 1 - H(m[a, :]) / log2(Fk), mean over query frames (H in bits over the cached key "
                     "frames): 0 uniform, 1 all mass on one key frame",
    "head_consensus": "mean over query frames and pairs of heads of 1 - JS(m_h[a, :], m_g[a, :]) (bits), the same "
                      "for every head of a (step, branch, chunk, block); a collapse proxy only with "
                      "mean_concentration: uniform heads have consensus 1 and concentration 0",
    "consensus_pairs": "fraction of head pairs whose query-mean 1 - JS is at least the threshold",
    "mean_concentration": "concentration, mean over the heads: the consensus's distance from uniform",
    "step_change": "mean over query frames of 1/2 sum over key frames of |m_s[a, b] - m_prev[a, b]|, against the "
                   "previous recorded step of the same chunk, branch, block and head (empty at its first step)",
    "behavioural_sinks": "key frames whose query-mean mass exceeds multiple x their uniform share T_b / sum T",
    "sink_rope_distance": "mean over the sink frames of rope_distance (empty without a sink)",
    "frame_tokens": "T_b, tokens of each key frame (every Wan frame has the same)",
    "key_mass": "per key frame (in key_frames order), the query-mean m[a, b]; frames.csv has one row per key "
                "frame with it as mass and per_token_mean = mass / T_b",
    "key_classes": "per key frame, its class (sink, pinned, window, chunk)",
    "key_rope_positions": "per key frame, the RoPE frame position the logged call gave it",
    "key_rope_distance": "per key frame, the mean over query frames of position(a) - position(b)",
}


@dataclass
class SinkTable:
    """The sink metrics of one recording.

    Fields:
        label: how the run is named in figures and tables (project, cache, prompt).
        video: the recording's video id.
        design: the KV-cache design the recording names ("" for a bidirectional recording).
        latent_frames: frames of the latent video.
        rows: one dict per (step, pass, branch, chunk, block, head), keys :data:`COLUMNS` (its key frames'
            mass, RoPE positions and distances as lists; :meth:`frame_rows` gives them a row each).
        matrices: per (step, branch, chunk): the mass ``[Fq][Fk]`` and per-token mean, mean over the blocks and
            heads, with the query and key frames, their RoPE positions and the key classes.
        multiple: the behavioural-sink multiple; threshold: the consensus threshold.
    """

    label: str
    video: str
    design: str
    latent_frames: int
    rows: List[dict] = field(default_factory=list)
    matrices: List[dict] = field(default_factory=list)
    multiple: float = 2.0
    threshold: float = 0.9

    def frame_rows(self) -> Iterator[dict]:
        """One dict per key frame of each row, keys :data:`FRAME_COLUMNS` (``frames.csv``), made as they are read."""
        for r in self.rows:
            for j, f in enumerate(r["key_frames"]):
                yield {**{k: r[k] for k in FRAME_COLUMNS[:6]}, "key_frame": f, "class": r["key_classes"][j],
                       "tokens": r["frame_tokens"], "rope_position": r["key_rope_positions"][j],
                       "rope_distance": r["key_rope_distance"][j], "mass": r["key_mass"][j],
                       "per_token_mean": float(per_token_mean(r["key_mass"][j], [r["frame_tokens"]])[0])}

    @property
    def frames(self) -> List[dict]:
        """:meth:`frame_rows` as a list."""
        return list(self.frame_rows())

    def denoise_step(self, branch: str = "cond") -> int:
        """The last denoising step (what figures show unless told: the context pass refills the cache)."""
        steps = sorted({r["step"] for r in self.rows if r["branch"] == branch and r["pass"] == "denoise"})
        return steps[-1] if steps else max(r["step"] for r in self.rows if r["branch"] == branch)

    def select(self, step: Optional[int] = None, branch: str = "cond", **equal) -> List[dict]:
        """The rows of ``branch`` at ``step`` (default :meth:`denoise_step`) whose fields equal ``equal``."""
        step = self.denoise_step(branch) if step is None else step
        return [r for r in self.rows if r["branch"] == branch and r["step"] == step
                and all(r[k] == v for k, v in equal.items())]

    def chunks(self, step: Optional[int] = None, branch: str = "cond") -> List[int]:
        """The chunks (first latent frames) with rows at ``step`` (default :meth:`denoise_step`)."""
        return sorted({r["chunk"] for r in self.select(step, branch)})

    def matrix(self, step: int, branch: str, chunk: int) -> Optional[dict]:
        """The frame x frame matrix entry of a step, branch and chunk (None if not recorded)."""
        return next((m for m in self.matrices if (m["step"], m["branch"], m["chunk"]) == (step, branch, chunk)), None)


def _events(rec: Recording) -> Dict[tuple, dict]:
    """(chunk, step, block, branch) -> its first KV log entry: where a chunk is evaluated again at a step (Rolling
    Forcing refills its first block once per window), the statistics are the first call's, so is the geometry."""
    out: Dict[tuple, dict] = {}
    for e in rec.kv_events():
        if isinstance(e, dict):
            out.setdefault((e.get("chunk"), e.get("step"), e.get("block"), e.get("branch", "cond")), e)
    return out


def _event(events: Dict[tuple, dict], chunk, step: int, block: int, branch: str) -> dict:
    """The KV log's entry of a chunk, step, block and branch; for blocks kept as their mean, the first block's."""
    if (chunk, step, block, branch) in events:
        return events[(chunk, step, block, branch)]
    same = sorted(b for (c, s, b, br) in events if (c, s, br) == (chunk, step, branch) and isinstance(b, int))
    return events[(chunk, step, same[0], branch)] if same and block < 0 else {}


def _positions(event: dict) -> Dict[int, int]:
    """Absolute frame -> the frame position RoPE gave it in the logged call (re-roped anchors, relative RoPE)."""
    return {int(f): int(p) for f, p in zip(event.get("key_frames") or (), event.get("rope_frames") or ()) if p >= 0}


def _key_frames(meta: dict, block: int, event: dict, count: int, chunk) -> List[int]:
    if event.get("key_frames") is not None and len(event["key_frames"]) == count:
        return [int(f) for f in event["key_frames"]]
    if chunk is None:
        return list(range(count))
    per_block = meta.get("key_frames_per_block") or {}
    return [int(f) for f in per_block.get(str(block), chunk_key_frames(meta))]


def _frame_tokens(rec: Recording) -> int:
    causal = rec.summary.get("causal") or {}
    if causal.get("frame_tokens"):
        return int(causal["frame_tokens"])
    _, h, w = rec.summary["latent_grid"]  # the DiT's token grid (map_grid is after downsampling)
    return int(h) * int(w)


def run_label(rec: Recording) -> str:
    """Project, cache and video of a recording, for figures that put several side by side."""
    design = ((rec.summary.get("causal") or {}).get("kv_cache_design") or {}).get("design") or "bidirectional"
    return f"{rec.summary.get('video_id') or getattr(rec, 'video', '') or 'video'} ({design})"


def sink_table(rec: Recording, multiple: float = 2.0, threshold: float = 0.9, label: Optional[str] = None,
               steps: Optional[Sequence[int]] = None) -> SinkTable:
    """Every metric of every recorded step, branch, chunk, block and head (see the module docstring).

    Causal recordings: each chunk against the key frames of its cache (its KV log gives sinks, pinned frames and
    RoPE positions); bidirectional ones: the whole video as one chunk (chunk 0), every key frame ``window``. Heads
    kept as their mean give rows with head -1 and no consensus. ``steps``: only these steps (default all).
    """
    events, ft = _events(rec), _frame_tokens(rec)
    causal = rec.summary.get("causal") or {}
    step_pass = {int(k): v for k, v in (causal.get("step_pass") or {}).items()}
    table = SinkTable(label or run_label(rec), str(rec.summary.get("video_id") or getattr(rec, "video", "")),
                      ((causal.get("kv_cache_design") or {}).get("design") or ""),
                      int(rec.summary["latent_grid"][0]), multiple=multiple, threshold=threshold)
    previous: Dict[tuple, tuple] = {}  # (branch, chunk, block, head) -> (mass, key frames) of the previous step
    keys = sorted((k for k in rec.keys_of("sink") if k.name == "frame_mass" and (steps is None or k.step in steps)),
                  key=lambda k: (k.branch, -1 if k.chunk is None else k.chunk, k.step))
    rows = len(keys) * len(rec.blocks) * len(rec.heads)
    if rows > MAX_ROWS:  # bounded before any array is read
        raise ValueError(f"the sink table of {table.video or 'this recording'} would have {rows:,} rows ({len(keys)} "
                         f"chunk-steps x {len(rec.blocks)} blocks x {len(rec.heads)} heads), over {MAX_ROWS:,}: "
                         f"report fewer steps (--steps, steps=)")
    for key in keys:
        mass = np.asarray(rec.get(key), dtype=np.float64)  # [blocks, heads, Fq, Fk]
        if mass.ndim != 4 or mass.shape[:2] != (len(rec.blocks), len(rec.heads)):
            video = rec.summary.get("video_id", "the video")
            raise DamagedFileError(f"damaged attention file {key_path(key)} of {video}: its frame x frame mass has "
                                   f"shape {list(mass.shape)}, not [blocks {len(rec.blocks)}, heads "
                                   f"{len(rec.heads)}, query frames, key frames]", key_path(key))
        meta = rec.metadata(key)
        chunk = key.chunk if key.chunk is not None else 0
        query = [int(f) for f in (meta.get("query_frames") or range(mass.shape[-2]))]
        base = {"step": key.step, "pass": step_pass.get(key.step, "denoise"), "branch": key.branch, "chunk": chunk}
        picked = []  # blocks whose cache matches the first block's: the matrix averages those
        for bi, block in enumerate(rec.blocks):
            event = _event(events, key.chunk, key.step, block, key.branch)
            frames = _key_frames(meta, block, event, mass.shape[-1], key.chunk)
            sinks = [int(f) for f in event.get("sink_frames") or ()]
            pinned = [int(f) for f in event.get("pinned_frames") or ()]
            classes = key_classes(frames, chunk if key.chunk is not None else max(frames) + 1, sinks, pinned)
            tokens = [ft] * len(frames)
            uniform = uniform_share(classes, tokens)
            positions = _positions(event)
            distance = rope_distance(query, frames, positions)
            consensus = head_consensus(mass[bi], threshold)
            conc = [concentration(mass[bi, hi]) for hi in range(len(rec.heads))]
            known = [c for c in conc if c is not None]
            sink_dist = [d for f, d, c in zip(frames, distance, classes) if c == "sink"]
            rope = [positions.get(f, f) for f in frames]
            if not picked or picked[0][1] == frames:
                picked.append((bi, frames, classes, rope))
            for hi, head in enumerate(rec.heads):
                share = class_share(mass[bi, hi], classes)
                prev = previous.get((key.branch, chunk, block, head))
                previous[(key.branch, chunk, block, head)] = (mass[bi, hi], frames)
                table.rows.append({
                    **base, "block": block, "head": head, "query_frames": query, "key_frames": list(frames),
                    "frame_tokens": ft, "sink_frames": [f for f in frames if f in sinks],
                    "pinned_frames": [f for f in frames if f in pinned],
                    **{f"mass_{c}": share[c] for c in CLASSES}, **{f"uniform_{c}": uniform[c] for c in CLASSES},
                    "sink_ratio": None if share["sink"] is None else share["sink"] / uniform["sink"],
                    "concentration": conc[hi], "head_consensus": consensus["consensus"],
                    "consensus_pairs": consensus["pairs_above"],
                    "mean_concentration": float(np.mean(known)) if known else None,
                    "step_change": None if prev is None else step_change(prev[0], prev[1], mass[bi, hi], frames),
                    "behavioural_sinks": behavioural_sinks(mass[bi, hi], frames, tokens, multiple),
                    "sink_rope_distance": float(np.mean(sink_dist)) if sink_dist else None,
                    "key_classes": classes, "key_mass": key_share(mass[bi, hi]).tolist(), "key_rope_positions": rope,
                    "key_rope_distance": distance})
        _, frames, classes, rope = picked[0]
        m = mass[[bi for bi, *_ in picked]].mean(axis=(0, 1))
        table.matrices.append({
            **base, "blocks": [rec.blocks[bi] for bi, *_ in picked], "query_frames": query, "key_frames": frames,
            "classes": classes, "rope_positions": rope, "mass": m.tolist(),
            "per_token_mean": per_token_mean(m, [ft] * len(frames)).tolist()})
    return table


def compare_rows(tables: Sequence[SinkTable], branch: str = "cond") -> List[dict]:
    """One row per (run, chunk) at each run's last denoising step: the metrics averaged over blocks and heads, aligned
    by chunk and by the sinks' RoPE distance."""
    out = []
    for t in tables:
        step = t.denoise_step(branch)
        for c in t.chunks(step, branch):
            at = t.select(step, branch, chunk=c)
            out.append({"run": t.label, "video": t.video, "design": t.design, "step": step, "chunk": c,
                        "cache_frames": len(at[0]["key_frames"]),
                        **{f: column_mean(at, f) for f in ("mass_sink", "uniform_sink", "sink_ratio", "head_consensus",
                                                     "mean_concentration", "sink_rope_distance")}})
    return out


COMPARE_COLUMNS = ("run", "video", "design", "step", "chunk", "cache_frames", "mass_sink", "uniform_sink",
                   "sink_ratio", "head_consensus", "mean_concentration", "sink_rope_distance")


def column_mean(rows: Sequence[dict], name: str) -> Optional[float]:
    """The mean of a column over rows, None where no row has a value (the class absent, one head)."""
    values = [r[name] for r in rows if r[name] is not None]
    return float(np.mean(values)) if values else None


def sink_series(rec: Recording, branch: str = "cond", multiple: float = 2.0) -> List[dict]:
    """The rows of :func:`sink_table` of one branch."""
    return [r for r in sink_table(rec, multiple).rows if r["branch"] == branch]
