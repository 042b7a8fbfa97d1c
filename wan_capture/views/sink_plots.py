"""The sink report's figures, drawn with matplotlib from a :class:`~.sink_table.SinkTable` and nothing else, so
every number in a figure is a number in the table (``series.csv``, ``frames.csv``, ``series.json``).

matplotlib is an optional extra (``pip install 'wan-attention-capture[report]'``); the ComfyUI nodes never import
this module. Figures are ``matplotlib.figure.Figure`` objects made without pyplot (no global state, no display).
Every figure says whether it shows attention **mass** (a sum over a frame's keys) or the **per-token mean** (mass
divided by the frame's tokens).
"""
from __future__ import annotations

import io
from typing import Dict, List, Optional, Sequence

import numpy as np

try:
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle
except ImportError as e:  # the report's extra is missing: say how to get it
    raise ImportError("the sink report's figures need matplotlib: pip install 'wan-attention-capture[report]' (or "
                      "pip install matplotlib); `sink-report --tables-only` writes the tables without it") from e

from .sink_table import SinkTable, column_mean, compare_rows

# the eviction timeline's categories, in legend order, and their colours (colour-blind safe, Okabe-Ito)
TIMELINE = (("future", "#ffffff"), ("evicted", "#bbbbbb"), ("window", "#56b4e9"), ("pinned", "#e69f00"),
            ("sink", "#d55e00"), ("own chunk", "#009e73"))
ABSENT_GREY = "#d0d0d0"  # a key frame not in the chunk's cache: no value, not 0
DPI = 110


def png(fig: Figure) -> bytes:
    """A figure as PNG bytes; ``bbox_inches="tight"`` keeps every label inside the picture."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _nan(value: Optional[float]) -> float:
    """An empty value as NaN: drawn as a gap, never as 0."""
    return float("nan") if value is None else value


def _values(rows: Sequence[dict], name: str) -> float:
    """:func:`~.sink_table.column_mean`, an empty one as a gap."""
    return _nan(column_mean(rows, name))


def _heads(rows: Sequence[dict]) -> List[int]:
    return sorted({r["head"] for r in rows})


def _head_label(h: int) -> str:
    return f"head {h}" if h >= 0 else "mean of heads"


# -- one run ----------------------------------------------------------------------------------------------------
def eviction_timeline(t: SinkTable, step: int, branch: str = "cond") -> Figure:
    """Latent frame x chunk: what each chunk's cache held (categorical: future, evicted, window, pinned, sink, own
    chunk), from the table's key, sink and pinned frames (the first block's)."""
    chunks = t.chunks(step, branch)
    code = {name: i for i, (name, _) in enumerate(TIMELINE)}
    grid = np.zeros((t.latent_frames, len(chunks)), dtype=int)
    for j, c in enumerate(chunks):
        row = t.select(step, branch, chunk=c)[0]
        for f in range(t.latent_frames):
            grid[f, j] = code["future"] if f >= max(row["query_frames"]) + 1 else code["evicted"]
        for f in row["key_frames"]:
            grid[f, j] = code["own chunk" if f in row["query_frames"] or f >= c else
                              "sink" if f in row["sink_frames"] else "pinned" if f in row["pinned_frames"]
                              else "window"]
    fig = Figure(figsize=(max(4.0, 0.6 * len(chunks) + 2.5), max(3.0, 0.25 * t.latent_frames + 1.2)))
    ax = fig.subplots()
    cmap = ListedColormap([colour for _, colour in TIMELINE])
    ax.imshow(grid, cmap=cmap, norm=BoundaryNorm(np.arange(len(TIMELINE) + 1) - 0.5, cmap.N), aspect="auto",
              interpolation="nearest", origin="upper")
    ax.set_xticks(range(len(chunks)), [str(c) for c in chunks])
    ax.set_yticks(range(t.latent_frames), [str(f) for f in range(t.latent_frames)])
    ax.set_xlabel("chunk (its first latent frame)")
    ax.set_ylabel("latent frame")
    ax.set_title(f"KV cache per chunk, step {step}, {branch} (which frames it held; no attention mass drawn)",
                 fontsize=9)
    used = sorted(set(grid.ravel().tolist()))
    ax.legend(handles=[Patch(facecolor=TIMELINE[i][1], edgecolor="black", label=TIMELINE[i][0]) for i in used],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def chunk_matrices(t: SinkTable, step: int, branch: str = "cond", value: str = "mass") -> Figure:
    """Each chunk's query frame x absolute key frame ``mass`` (or ``per_token_mean``), mean over blocks and heads,
    all chunks on one colour scale; key frames not in the cache grey; sink (S) and pinned (P) columns marked; tick
    labels (on the cached frames) give the absolute frame and, below it, the RoPE position of the logged call."""
    chunks = t.chunks(step, branch)
    mats = [t.matrix(step, branch, c) for c in chunks]
    top = max(float(np.max(m[value])) for m in mats)
    cols = min(3, len(chunks))  # three chunks a row: 21 key frames stay readable at the default size
    rows = -(-len(chunks) // cols)
    fig = Figure(figsize=(cols * (1.5 + 0.3 * t.latent_frames) + 1.5, rows * 3.4 + 0.6), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    for ax in grid.ravel()[len(chunks):]:
        ax.remove()
    axes = grid.ravel()[:len(chunks)]
    cmap = _cmap()
    image = None
    for ax, c, m in zip(axes, chunks, mats):
        full = np.full((len(m["query_frames"]), t.latent_frames), np.nan)
        for j, f in enumerate(m["key_frames"]):
            if 0 <= f < t.latent_frames:
                full[:, f] = np.asarray(m[value])[:, j]
        image = ax.imshow(full, cmap=cmap, vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
        rope = dict(zip(m["key_frames"], m["rope_positions"]))
        cached = sorted(f for f in rope if 0 <= f < t.latent_frames)  # labelled: the frames the cache held
        ax.set_xticks(cached, [f"{f}\n{rope[f]}" for f in cached], fontsize=7)
        ax.set_yticks(range(len(m["query_frames"])), [str(q) for q in m["query_frames"]])
        for f, cls in zip(m["key_frames"], m["classes"]):
            if cls in ("sink", "pinned"):  # the column outlined in its class's colour, its letter above it
                colour = dict(TIMELINE)[cls]
                ax.add_patch(Rectangle((f - 0.5, -0.5), 1, len(m["query_frames"]), fill=False, edgecolor=colour,
                                       linewidth=2))
                ax.text(f, -0.6, "S" if cls == "sink" else "P", ha="center", va="bottom", fontsize=9,
                        fontweight="bold", color=colour)
        ax.set_title(f"chunk {c}", pad=22)
        ax.set_xlabel("key frame / RoPE position")
        ax.set_ylabel("query frame")
    label = "mass" if value == "mass" else "per-token mean"
    fig.colorbar(image, ax=list(axes), label=f"{label} (one scale for all chunks)", shrink=0.9)
    fig.suptitle(f"frame x frame {label}, step {step}, {branch}, mean over blocks and heads "
                 "(grey: not in the cache; S sink, P pinned)")
    return fig


def sink_share(t: SinkTable, step: int, branch: str = "cond") -> Figure:
    """Sink mass against the chunk, a line per head (mean over blocks) with the uniform share dashed, and its ratio
    to the uniform share with the line at 1. A chunk without a sink in its cache is a gap."""
    rows = t.select(step, branch)
    chunks = t.chunks(step, branch)
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    for h in _heads(rows):
        at = [[r for r in rows if r["chunk"] == c and r["head"] == h] for c in chunks]
        left.plot(chunks, [_values(a, "mass_sink") for a in at], marker="o", label=_head_label(h))
        right.plot(chunks, [_values(a, "sink_ratio") for a in at], marker="o", label=_head_label(h))
    left.plot(chunks, [_values([r for r in rows if r["chunk"] == c], "uniform_sink") for c in chunks], "k--",
              label="uniform share")
    left.legend(loc="best", frameon=False, fontsize=8)
    right.axhline(1.0, color="black", linestyle="--", label="uniform (ratio 1)")
    left.set_ylabel("sink mass (share of attention)")
    right.set_ylabel("sink mass / uniform share")
    for ax in (left, right):
        ax.set_xlabel("chunk (its first latent frame)")
        ax.set_xticks(chunks)
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.suptitle(f"mass on sink frames, step {step}, {branch}, mean over blocks (gap: no sink in the cache)")
    return fig


def consensus(t: SinkTable, step: int, branch: str = "cond") -> Figure:
    """Head consensus against the chunk with its distance from uniform (mean concentration) and the fraction of
    head pairs above the threshold, mean over blocks."""
    rows = t.select(step, branch)
    chunks = t.chunks(step, branch)
    at = [[r for r in rows if r["chunk"] == c] for c in chunks]
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(chunks, [_values(a, "head_consensus") for a in at], marker="o", label="head consensus (1 - JS)")
    ax.plot(chunks, [_values(a, "consensus_pairs") for a in at], marker="s",
            label=f"pairs with 1 - JS >= {t.threshold:g}")
    ax.plot(chunks, [_values(a, "mean_concentration") for a in at], marker="^",
            label="mean concentration (0: uniform heads)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(chunks)
    ax.set_xlabel("chunk (its first latent frame)")
    ax.set_ylabel("consensus, fraction, concentration")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    ax.set_title(f"head consensus of the key-frame mass, step {step}, {branch}\n"
                 "collapse: high consensus with high concentration; uniform heads: consensus 1, concentration 0",
                 fontsize=9)
    return fig


def blocks_heads(t: SinkTable, step: int, branch: str = "cond") -> Figure:
    """Blocks x heads of the last chunk that holds a sink: the sink mass's ratio to uniform, and every head's
    concentration (the last chunk's)."""
    rows = t.select(step, branch)
    chunks = t.chunks(step, branch)
    with_sink = [c for c in chunks if any(r["sink_ratio"] is not None for r in rows if r["chunk"] == c)]
    blocks, heads = sorted({r["block"] for r in rows}), _heads(rows)
    fig = Figure(figsize=(max(8.0, 0.5 * len(heads) * 2 + 3), max(3.0, 0.25 * len(blocks) + 1.5)),
                 layout="constrained")
    panels = fig.subplots(1, 2)
    for ax, (chunk, name, label) in zip(panels, ((with_sink[-1] if with_sink else None, "sink_ratio",
                                                  "sink mass / uniform share"),
                                                 (chunks[-1], "concentration", "concentration of the mass"))):
        grid = np.full((len(blocks), len(heads)), np.nan)
        for r in rows:
            if r["chunk"] == chunk and r[name] is not None:
                grid[blocks.index(r["block"]), heads.index(r["head"])] = r[name]
        im = ax.imshow(grid, cmap=_cmap(), aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, label=label)
        ax.set_xticks(range(len(heads)), [str(h) for h in heads])
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("block")
        ax.set_title(f"{label}, chunk {chunk}" if chunk is not None else f"{label}: no chunk holds a sink")
    fig.suptitle(f"every block and head, step {step}, {branch} (mass)")
    return fig


def last_chunk_attention(t: SinkTable, step: int, branch: str = "cond") -> Figure:
    """Deep Forcing's Fig. 4 layout: the last chunk's query-averaged per-token mean on each key frame, a row per
    (block, head), key frames with their RoPE positions, on a log scale."""
    chunk = t.chunks(step, branch)[-1]
    cells = [f for f in t.frame_rows() if (f["step"], f["branch"], f["chunk"]) == (step, branch, chunk)]
    pairs = sorted({(f["block"], f["head"]) for f in cells})
    keys = sorted({f["key_frame"] for f in cells})
    grid = np.full((len(pairs), len(keys)), np.nan)
    rope = {}
    for f in cells:
        grid[pairs.index((f["block"], f["head"])), keys.index(f["key_frame"])] = f["per_token_mean"]
        rope[f["key_frame"]] = f["rope_position"]
    fig = Figure(figsize=(max(5.0, 0.45 * len(keys) + 3), max(3.0, 0.12 * len(pairs) + 1.5)), layout="constrained")
    ax = fig.subplots()
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
    im = ax.imshow(grid, cmap=_cmap(), norm=norm, aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="per-token mean (log scale)")
    ax.set_xticks(range(len(keys)), [f"{k}\n{rope[k]}" for k in keys], fontsize=8)
    heads = len({h for _, h in pairs})
    ax.set_yticks([i for i in range(0, len(pairs), heads)], [f"block {b}" for b, _ in pairs[::heads]], fontsize=7)
    ax.set_xlabel("key frame / RoPE position")
    ax.set_ylabel(f"block (rows: its {heads} heads)")
    ax.set_title(f"last chunk ({chunk}): query-averaged per-token mean per block and head, step {step}, {branch}")
    return fig


def steps(t: SinkTable, branch: str = "cond") -> Figure:
    """Inside each chunk, across its recorded steps: the sink mass's ratio to uniform and the step-to-step change of
    the mass (total variation), mean over blocks and heads."""
    rows = [r for r in t.rows if r["branch"] == branch]
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    for c in sorted({r["chunk"] for r in rows}):
        at = sorted({r["step"] for r in rows if r["chunk"] == c})
        per = [[r for r in rows if r["chunk"] == c and r["step"] == s] for s in at]
        left.plot(at, [_values(p, "sink_ratio") for p in per], marker="o", label=f"chunk {c}")
        right.plot(at, [_values(p, "step_change") for p in per], marker="o", label=f"chunk {c}")
    left.axhline(1.0, color="black", linestyle="--", linewidth=1)
    left.set_ylabel("sink mass / uniform share")
    right.set_ylabel("change from the previous step (total variation)")
    passes = {r["step"]: r["pass"] for r in rows}
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_xticks(sorted(passes), [f"{s}\n{'context' if passes[s] == 'context' else ''}" for s in sorted(passes)])
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.suptitle(f"steps inside each chunk, {branch}, mass, mean over blocks and heads")
    return fig


def run_figures(t: SinkTable, step: int, branch: str = "cond") -> Dict[str, Figure]:
    """Every figure of one run, by file name."""
    return {"eviction_timeline.png": eviction_timeline(t, step, branch),
            "frame_mass_chunks.png": chunk_matrices(t, step, branch, "mass"),
            "per_token_mean_chunks.png": chunk_matrices(t, step, branch, "per_token_mean"),
            "sink_share.png": sink_share(t, step, branch), "head_consensus.png": consensus(t, step, branch),
            "blocks_heads.png": blocks_heads(t, step, branch),
            "last_chunk_attention.png": last_chunk_attention(t, step, branch), "steps.png": steps(t, branch)}


# -- several runs -----------------------------------------------------------------------------------------------
def compare_figures(tables: Sequence[SinkTable], branch: str = "cond") -> Dict[str, Figure]:
    """Several runs side by side, each at its last denoising step, averaged over blocks and heads: sink mass with
    each run's uniform share, its ratio to uniform against the chunk and against the sinks' RoPE distance, and head
    consensus with concentration."""
    rows = compare_rows(tables, branch)
    runs = [t.label for t in tables]
    share = Figure(figsize=(12.0, 4.2), layout="constrained")
    a, b, c = share.subplots(1, 3)
    cons = Figure(figsize=(8.0, 4.2), layout="constrained")
    d = cons.subplots()
    for i, run in enumerate(runs):
        at = [r for r in rows if r["run"] == run]
        x = [r["chunk"] for r in at]
        colour = f"C{i}"
        a.plot(x, [_nan(r["mass_sink"]) for r in at], "o-", color=colour, label=run)
        a.plot(x, [_nan(r["uniform_sink"]) for r in at], "--", color=colour)
        b.plot(x, [_nan(r["sink_ratio"]) for r in at], "o-", color=colour, label=run)
        near = [r for r in at if r["sink_rope_distance"] is not None and r["sink_ratio"] is not None]
        c.plot([r["sink_rope_distance"] for r in near], [r["sink_ratio"] for r in near], "o-", color=colour,
               label=run)
        d.plot(x, [_nan(r["head_consensus"]) for r in at], "o-", color=colour,
               label=f"{run}: consensus")
        d.plot(x, [_nan(r["mean_concentration"]) for r in at], "^--",
               color=colour, label=f"{run}: concentration")
    every = sorted({r["chunk"] for r in rows})
    for ax in (a, b, d):
        ax.set_xticks(every)
    a.set_ylabel("sink mass (dashed: uniform share)")
    b.set_ylabel("sink mass / uniform share")
    c.set_ylabel("sink mass / uniform share")
    for ax in (a, b, d):
        ax.set_xlabel("chunk (its first latent frame)")
    c.set_xlabel("RoPE distance from the queries to the sinks (frames)")
    for ax in (b, c):
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    c.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    share.suptitle(f"mass on sink frames across runs ({branch}, last denoising step, mean over blocks and heads)")
    d.set_ylim(-0.02, 1.02)
    d.set_ylabel("head consensus (1 - JS) / concentration")
    d.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    cons.suptitle(f"head consensus of the key-frame mass across runs ({branch}); uniform heads: consensus 1, "
                  "concentration 0", fontsize=9)
    return {"compare_sink.png": share, "compare_consensus.png": cons}


def _cmap():
    """inferno, with NaN (no value) drawn grey."""
    return colormaps["inferno"].with_extremes(bad=ABSENT_GREY)


__all__: Optional[List[str]] = ["run_figures", "compare_figures", "png", "TIMELINE"]
