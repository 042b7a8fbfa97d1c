"""The sink report: the sink tables (:mod:`.sink_table`) of one recording or several side by side, written as CSV and
JSON, with the figures of :mod:`.sink_plots` (matplotlib, an optional extra).

    from wan_capture import AttentionAnalyzer
    from wan_capture.views.sink_report import sink_table, write_sink_report
    rec = AttentionAnalyzer("out/causal_demo/attention_maps").recording("causal_vid001")   # or MemoryRecording(take)
    table = sink_table(rec)                     # rows per (step, branch, chunk, block, head), matrices
    files = write_sink_report([table], "out/sink_report")

or ``python -m wan_capture sink-report RUN [RUN ...] --out DIR``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, Iterable, Optional, Sequence

from .sink_table import (COLUMNS, COMPARE_COLUMNS, DEFINITIONS, FRAME_COLUMNS, MAX_ROWS, SinkTable, compare_rows,
                         run_label, sink_series, sink_table)


def table_csv(rows: Iterable[dict], columns: Sequence[str]) -> bytes:
    """Rows as CSV (lists and dicts as JSON, None as an empty cell)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns))
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(r[k]) if isinstance(r[k], (list, dict)) else ("" if r[k] is None else r[k])
                    for k in columns})
    return buf.getvalue().encode()


def table_json(table: SinkTable, step_shown: int) -> bytes:
    """``series.json``: the run, its rows and matrices, and every definition."""
    return (json.dumps({"label": table.label, "video": table.video, "design": table.design,
                        "latent_frames": table.latent_frames, "step_shown": step_shown, "multiple": table.multiple,
                        "threshold": table.threshold, "definitions": DEFINITIONS, "columns": list(COLUMNS),
                        "rows": table.rows, "matrices": table.matrices}, indent=1) + "\n").encode()


def write_sink_report(tables: Sequence[SinkTable], out_dir: str, step: Optional[int] = None, branch: str = "cond",
                      figures: bool = True) -> Dict[str, str]:
    """The tables (``series.csv``, ``frames.csv``, ``series.json``; with several runs in a folder per run,
    ``run1/``..., beside ``compare.csv``) and the figures (:mod:`.sink_plots`, matplotlib:
    ``pip install 'wan-attention-capture[report]'``) in ``out_dir``; returns name -> path. Without matplotlib and ``figures`` on, nothing is written."""
    tables = list(tables)
    if not tables or not any(t.rows for t in tables):
        raise ValueError("no self-attention statistics in these recordings: record with sink statistics on")
    for t in tables:
        if not t.rows:
            raise ValueError(f"no self-attention statistics in {t.label}: record with sink statistics on")
        branches = sorted({r["branch"] for r in t.rows})
        if branch not in branches:
            raise ValueError(f"no sink statistics of {t.label} for branch {branch}; its branches: {branches}")
        if step is not None and not t.select(step, branch):
            raise ValueError(f"no sink statistics of {t.label} at step {step}, branch {branch}; steps: "
                             f"{sorted({r['step'] for r in t.rows if r['branch'] == branch})}")
    plots = None
    if figures:
        from . import sink_plots  # raises the install hint before anything is written
        plots = sink_plots
    files: Dict[str, bytes] = {}
    several = len(tables) > 1
    for i, t in enumerate(tables):
        prefix = f"run{i + 1}/" if several else ""
        shown = t.denoise_step(branch) if step is None else step
        files[prefix + "series.csv"] = table_csv(t.rows, COLUMNS)
        files[prefix + "frames.csv"] = table_csv(t.frame_rows(), FRAME_COLUMNS)
        files[prefix + "series.json"] = table_json(t, shown)
        if plots is not None:
            for name, fig in plots.run_figures(t, shown, branch).items():
                files[prefix + name] = plots.png(fig)
    if several:
        files["compare.csv"] = table_csv(compare_rows(tables, branch), COMPARE_COLUMNS)
        if plots is not None:
            for name, fig in plots.compare_figures(tables, branch).items():
                files[name] = plots.png(fig)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, data in files.items():
        path = os.path.join(out_dir, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
    return paths


__all__ = ["COLUMNS", "COMPARE_COLUMNS", "DEFINITIONS", "FRAME_COLUMNS", "MAX_ROWS", "SinkTable", "compare_rows",
           "run_label", "sink_series", "sink_table", "table_csv", "table_json", "write_sink_report"]
