"""The sink report: every metric equals a float64 recomputation from the q/k of planted cases (a sink head, heads
that attend uniformly, a growing cache, a pinned slot), absent frames are absent (never 0), the figures read their
numbers from the same table, several runs compare side by side, and its files are written and read back."""
import csv
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reference import naive_sink
from wan_capture import CausalRecorder, FolderRecording, MemoryRecording, RecordingPlan, SaveOptions, save_take
from wan_capture.views.render import ABSENT
from wan_capture.views.sink_report import COLUMNS, FRAME_COLUMNS, sink_series, sink_table, write_sink_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT, HEADS, D, CHUNK = 4, 3, 16, 2  # tokens per frame, heads, head dim, frames per chunk


def caches(frames: int, window: int, sink: int, evict_sink_at=None, pinned=None):
    """(chunk, key frames, sink frames, pinned frames) of a rolling cache: the sinks, a pinned frame (from chunk
    ``pinned[1]`` on, frame ``pinned[0]``), the last ``window`` frames, the chunk."""
    out = []
    for c in range(0, frames, CHUNK):
        sinks = [] if evict_sink_at is not None and c >= evict_sink_at else list(range(min(sink, c)))
        pins = [pinned[0]] if pinned and c >= pinned[1] else []
        past = [f for f in range(c) if f not in sinks and f not in pins][-window:]
        out.append((c, sorted(set(sinks + pins + past)) + list(range(c, c + CHUNK)), sinks, pins))
    return out


def run(q_of, k_of, frames=8, window=2, sink=1, evict_sink_at=None, pinned=None, steps=(0,)):
    """A hand-driven causal recording of one block: q/k per chunk from ``q_of(chunk, step)``/``k_of(frame)``;
    returns the take and what each (chunk, step) attended to (for the float64 reference)."""
    rec = CausalRecorder(RecordingPlan(record_cross=False, record_sink_stats=True, store_per_head=True,
                                       storage_dtype="float32"), FT)
    calls = []
    with rec.recording(num_blocks=1, num_heads=HEADS, head_dim=D):
        for c, key_frames, sinks, pins in caches(frames, window, sink, evict_sink_at, pinned):
            for step in steps:
                q = q_of(c, step)
                k = torch.cat([k_of(f) for f in key_frames], dim=1)
                rec.tap(0, q, k, lambda: q, query_start=c * FT, key_frames=key_frames, step=step, sink_frames=sinks,
                        pinned_frames=pins)
                calls.append((c, step, key_frames, sinks, pins, q, k))
    return rec.take, calls


def kl_bits(x, y):
    return sum(xi * math.log2(xi / yi) for xi, yi in zip(x, y) if xi > 0)


def entropy_bits(x):
    return -sum(xi * math.log2(xi) for xi in x if xi > 0)


def float64_rows(calls, multiple=2.0, threshold=0.9):
    """Every metric from first principles: float64 attention of the captured q/k, sums written out by hand."""
    want, previous = {}, {}
    for c, step, key_frames, sinks, pins, q, k in calls:
        qd, kd = q.transpose(1, 2).double(), k.transpose(1, 2).double()
        _, _, mass, _, _ = naive_sink(qd, kd, FT, q_offset=kd.shape[2] - qd.shape[2])  # [1, H, Fq, Fk]
        mass = mass[0].numpy()
        fq, fk = mass.shape[1:]
        cls = ["chunk" if f >= c else "sink" if f in sinks else "pinned" if f in pins else "window" for f in key_frames]
        sims = {}
        for a, b in itertools.combinations(range(HEADS), 2):
            per_q = []
            for qf in range(fq):
                p, r = mass[a, qf], mass[b, qf]
                m2 = (p + r) / 2
                per_q.append(1 - (kl_bits(p, m2) + kl_bits(r, m2)) / 2)
            sims[(a, b)] = per_q
        conc = [float(np.mean([1 - entropy_bits(mass[h, qf]) / math.log2(fk) for qf in range(fq)]))
                for h in range(HEADS)]
        for h in range(HEADS):
            m = mass[h]
            row = {}
            for name in ("sink", "pinned", "window", "chunk"):
                cols = [j for j, x in enumerate(cls) if x == name]
                row[f"mass_{name}"] = (float(np.mean([sum(m[qf, j] for j in cols) for qf in range(fq)])) if cols
                                       else None)
                row[f"uniform_{name}"] = len(cols) * FT / (fk * FT) if cols else None
            row["sink_ratio"] = None if row["mass_sink"] is None else row["mass_sink"] / row["uniform_sink"]
            row["concentration"] = conc[h]
            row["mean_concentration"] = float(np.mean(conc))
            row["head_consensus"] = float(np.mean([x for v in sims.values() for x in v]))
            row["consensus_pairs"] = float(np.mean([np.mean(v) >= threshold for v in sims.values()]))
            share = [float(np.mean(m[:, j])) for j in range(fk)]
            row["behavioural_sinks"] = [f for f, sh in zip(key_frames, share) if sh > multiple / fk]
            row["per_token_mean"] = {f: sh / FT for f, sh in zip(key_frames, share)}
            query = list(range(c, c + fq))
            row["rope_distance"] = {f: float(np.mean(query)) - f for f in key_frames}
            prev = previous.get((c, h))
            if prev is None:
                row["step_change"] = None
            else:
                pm, pf = prev
                frames_all = sorted(set(pf) | set(key_frames))
                tv = []
                for qf in range(fq):
                    now = {f: m[qf, j] for j, f in enumerate(key_frames)}
                    old = {f: pm[qf, j] for j, f in enumerate(pf)}
                    tv.append(0.5 * sum(abs(now.get(f, 0.0) - old.get(f, 0.0)) for f in frames_all))
                row["step_change"] = float(np.mean(tv))
            previous[(c, h)] = (m, key_frames)
            want[(c, step, h)] = row
    return want


def planted_sink(c, step=0):
    g = torch.Generator().manual_seed(100 + c + 17 * step)
    q = torch.randn(1, CHUNK * FT, HEADS, D, generator=g)
    q[:, :, 0] = 3.0  # head 0 looks along the direction frame 0's keys point in
    return q.bfloat16().float()


def keys(f):
    g = torch.Generator().manual_seed(f)
    k = torch.randn(1, FT, HEADS, D, generator=g) * 0.3
    if f == 0:
        k[:, :, 0] = 3.0  # the sink frame: head 0's queries find it
    return k.bfloat16().float()


def uniform_q(c, step=0):
    return torch.zeros(1, CHUNK * FT, HEADS, D)  # scores all 0: every key gets the same probability


def assert_matches(rows, want, table=None):
    approx = dict(rel=1e-5, abs=1e-6)
    for r in rows:
        w = want[(r["chunk"], r["step"], r["head"])]
        for name in ("mass_sink", "mass_pinned", "mass_window", "mass_chunk", "uniform_sink", "uniform_pinned",
                     "uniform_window", "uniform_chunk", "sink_ratio", "concentration", "mean_concentration",
                     "head_consensus", "consensus_pairs", "step_change"):
            if w[name] is None:
                assert r[name] is None, (name, r)
            else:
                assert r[name] == pytest.approx(w[name], **approx), (name, r["chunk"], r["step"], r["head"])
        assert r["behavioural_sinks"] == w["behavioural_sinks"]
        present = [r[f"mass_{c}"] for c in ("sink", "pinned", "window", "chunk") if r[f"mass_{c}"] is not None]
        assert sum(present) == pytest.approx(1.0, abs=1e-5)
    if table is not None:
        for f in table.frames:
            w = want[(f["chunk"], f["step"], f["head"])]
            assert f["per_token_mean"] == pytest.approx(w["per_token_mean"][f["key_frame"]], **approx)
            assert f["mass"] == pytest.approx(f["per_token_mean"] * FT, rel=1e-12) and f["tokens"] == FT
            assert f["rope_distance"] == pytest.approx(w["rope_distance"][f["key_frame"]])


def test_sink_metrics_planted_sink_head_equal_float64():
    take, calls = run(planted_sink, keys, steps=(0, 1))
    table = sink_table(MemoryRecording(take))
    want = float64_rows(calls)
    assert len(table.rows) == len(calls) * HEADS and len(table.frames) == sum(len(c[2]) for c in calls) * HEADS
    assert_matches(table.rows, want, table)
    late = [r for r in table.rows if r["chunk"] >= CHUNK]
    assert all(r["sink_ratio"] > 2 and r["behavioural_sinks"][:1] == [0] for r in late if r["head"] == 0)
    assert all(r["mass_sink"] < 0.3 for r in late if r["head"] != 0)  # the planted head, and only it
    assert all(r["sink_rope_distance"] == pytest.approx(r["chunk"] + 0.5) for r in late)
    assert {r["step_change"] is None for r in table.rows if r["step"] == 0} == {True}
    # head 0's queries are planted, the same at both steps: no change; the others are drawn anew
    assert all((r["step_change"] > 0.005) == (r["head"] != 0) for r in table.rows if r["step"] == 1)
    assert all(r["branch"] == "cond" and r["frame_tokens"] == FT for r in table.rows)


def test_sink_metrics_uniform_heads_are_not_collapsed():
    """Heads that attend uniformly agree perfectly (consensus 1) and are reported with concentration 0 beside it;
    the sink gets exactly its uniform share (ratio 1)."""
    take, calls = run(uniform_q, keys)
    rows = sink_series(MemoryRecording(take))
    assert_matches(rows, float64_rows(calls))
    for r in rows:
        assert r["head_consensus"] == pytest.approx(1.0, abs=1e-9) and r["consensus_pairs"] == 1.0
        assert r["concentration"] == pytest.approx(0.0, abs=1e-6)
        assert r["mean_concentration"] == pytest.approx(0.0, abs=1e-6)
        if r["mass_sink"] is not None:
            assert r["sink_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_sink_metrics_growing_cache_keeps_the_ratio():
    """A cache that grows (nothing evicted): uniform attention's sink mass falls as 1/Fk, its ratio to the uniform
    share stays 1; a chunk with no sink in its cache has no sink mass (None), not 0."""
    take, calls = run(uniform_q, keys, frames=8, window=8)
    rows = sink_series(MemoryRecording(take))
    assert_matches(rows, float64_rows(calls))
    by_chunk = {r["chunk"]: r for r in rows if r["head"] == 0}
    assert [len(by_chunk[c]["key_frames"]) for c in (2, 4, 6)] == [4, 6, 8]
    assert [round(by_chunk[c]["mass_sink"], 6) for c in (2, 4, 6)] == [0.25, round(1 / 6, 6), 0.125]
    assert all(by_chunk[c]["sink_ratio"] == pytest.approx(1.0, abs=1e-5) for c in (2, 4, 6))
    assert by_chunk[0]["mass_sink"] is None and by_chunk[0]["sink_ratio"] is None


def test_sink_metrics_pinned_slot_and_evicted_sink(tmp_path):
    """A pinned frame (frame 2 from chunk 4 on) is its own class with its own uniform share; an evicted sink leaves
    the sink columns empty; the saved recording gives the same table."""
    take, calls = run(planted_sink, keys, frames=10, pinned=(2, 4), evict_sink_at=6)
    table = sink_table(MemoryRecording(take))
    assert_matches(table.rows, float64_rows(calls), table)
    at4 = [r for r in table.rows if r["chunk"] == 4]
    assert all(r["pinned_frames"] == [2] and r["key_frames"] == [0, 1, 2, 3, 4, 5] for r in at4)
    assert all(r["uniform_pinned"] == pytest.approx(1 / 6) for r in at4)
    assert {f["class"] for f in table.frames if f["chunk"] == 4 and f["key_frame"] == 2} == {"pinned"}
    after = [r for r in table.rows if r["chunk"] == 6]
    assert all(0 not in r["key_frames"] and r["sink_frames"] == [] and r["mass_sink"] is None for r in after)
    assert all(r["sink_ratio"] is None and r["sink_rope_distance"] is None for r in after)
    video = save_take(take, str(tmp_path), "b", SaveOptions(storage_dtype="float32"))[0]
    loaded = sink_table(FolderRecording.open(str(tmp_path / "b" / "attention_maps"), video.video_id))
    assert json.loads(json.dumps(loaded.rows)) == json.loads(json.dumps(table.rows))
    assert json.loads(json.dumps(loaded.matrices)) == json.loads(json.dumps(table.matrices))


def test_sink_metrics_files_written_and_read_back(tmp_path):
    take, _ = run(planted_sink, keys, steps=(0, 1))
    table = sink_table(MemoryRecording(take))
    files = write_sink_report([table], str(tmp_path / "report"))
    with open(files["series.csv"], newline="") as f:
        series = list(csv.DictReader(f))
    assert list(series[0]) == list(COLUMNS) and len(series) == len(table.rows)
    for got, r in zip(series, table.rows):
        assert got["mass_sink"] == ("" if r["mass_sink"] is None else str(r["mass_sink"]))
        assert json.loads(got["key_frames"]) == r["key_frames"] and got["branch"] == r["branch"]
    with open(files["frames.csv"], newline="") as f:
        frames = list(csv.DictReader(f))
    assert list(frames[0]) == list(FRAME_COLUMNS) and len(frames) == len(table.frames)
    assert [float(x["per_token_mean"]) for x in frames] == [x["per_token_mean"] for x in table.frames]
    data = json.load(open(files["series.json"]))
    assert data["rows"] == json.loads(json.dumps(table.rows)) and "sink_ratio" in data["definitions"]
    assert data["step_shown"] == 1 and len(data["matrices"]) == len({(r["step"], r["chunk"]) for r in table.rows})
    with pytest.raises(ValueError, match=r"for branch uncond; its branches: \['cond'\]"):
        write_sink_report([table], str(tmp_path / "other"), branch="uncond")
    with pytest.raises(ValueError, match=r"at step 7, branch cond; steps: \[0, 1\]"):
        write_sink_report([table], str(tmp_path / "other"), step=7)
    assert not (tmp_path / "other").exists()


def test_sink_report_command_on_the_causal_demo(tmp_path):
    r = subprocess.run([sys.executable, "-m", "wan_capture", "causal-demo", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    maps = tmp_path / "causal_demo" / "attention_maps"
    r = subprocess.run([sys.executable, "-m", "wan_capture", "sink-report", str(maps), "--out", str(tmp_path / "rep")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sink report of causal_demo/causal_vid001 (sink and rolling window)" in r.stdout
    assert "head_consensus 0." in r.stdout and "mean_concentration 0." in r.stdout  # heads kept: consensus
    for name in ("series.csv", "frames.csv", "sink_share.png", "eviction_timeline.png", "frame_mass_chunks.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name


def test_sink_report_frame_by_frame_view_tells_evicted_from_unattended(tmp_path):
    """The whole-video frame x frame view: a key frame the chunk's cache did not hold is absent (grey), while a key
    frame it held is drawn with its mass, whatever it is."""
    from wan_capture.views.maps import frame_mass, frame_mass_images
    take, calls = run(planted_sink, keys, evict_sink_at=6)
    calls = [(c, kf, s, None, None) for c, _, kf, s, _, _, _ in calls]
    video = save_take(take, str(tmp_path), "b", SaveOptions(storage_dtype="float32"))[0]
    from wan_capture import FolderRecording
    for rec in (MemoryRecording(take), FolderRecording.open(str(tmp_path / "b" / "attention_maps"), video.video_id)):
        cached = rec.cached(0)
        for c, key_frames, _, _, _ in calls:
            for q in (c, c + 1):
                assert sorted(np.flatnonzero(cached[q])) == key_frames
        mass = frame_mass(rec)
        assert mass[6, 0] == 0 and not cached[6, 0] and cached[2, 0]  # evicted at chunk 6, held before
        shown = np.where(cached, mass, np.nan)
        img = frame_mass_images(shown[None], [0], False, "inferno", "t", rec.sink_frames)[0]
        grey = np.all(np.abs(img - np.array(ABSENT)) < 0.01, axis=-1)
        assert grey.sum() > 100


# -- the figures -------------------------------------------------------------------------------------------------
def _texts(fig):
    out = [t.get_text() for t in fig.texts] + ([fig._suptitle.get_text()] if fig._suptitle else [])
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend:
            out += [t.get_text() for t in legend.get_texts()]
    return out


def _mean_or_nan(rows, name):
    v = [r[name] for r in rows if r[name] is not None]
    return float(np.mean(v)) if v else float("nan")


def test_sink_plots_read_their_numbers_from_the_table(tmp_path):
    from wan_capture.views import sink_plots
    take, _ = run(planted_sink, keys, frames=10, pinned=(2, 4), evict_sink_at=6, steps=(0, 1))
    table = sink_table(MemoryRecording(take))
    step = table.denoise_step()
    figs = sink_plots.run_figures(table, step)
    for name, fig in figs.items():
        words = " ".join(_texts(fig))
        assert "mass" in words or "per-token mean" in words, name  # every figure says what it shows
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>":
                assert ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
            assert all(t.get_fontsize() >= 7 for t in ax.get_xticklabels() + ax.get_yticklabels()), name
    # the eviction timeline: categorical, every class, each cell the class the table gives
    timeline = figs["eviction_timeline.png"].axes[0]
    assert [t.get_text() for t in timeline.get_legend().get_texts()] == \
        ["future", "evicted", "window", "pinned", "sink", "own chunk"]
    cells = np.asarray(timeline.images[0].get_array())
    names = [n for n, _ in sink_plots.TIMELINE]
    for j, c in enumerate(table.chunks(step)):
        row = table.select(step, chunk=c)[0]
        for f in range(table.latent_frames):
            want = ("own chunk" if f >= c and f in row["key_frames"] else "future" if f >= c else
                    "sink" if f in row["sink_frames"] else "pinned" if f in row["pinned_frames"] else
                    "window" if f in row["key_frames"] else "evicted")
            assert names[cells[f, j]] == want, (c, f)
    # the matrices: one scale, the table's numbers, absent frames masked, sink and pinned columns marked
    for value, fig in (("mass", figs["frame_mass_chunks.png"]), ("per_token_mean", figs["per_token_mean_chunks.png"])):
        axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
        assert len({ax.images[0].get_clim() for ax in axes}) == 1
        for ax, c in zip(axes, table.chunks(step)):
            m = table.matrix(step, "cond", c)
            shown = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
            for j, f in enumerate(m["key_frames"]):
                np.testing.assert_array_equal(shown[:, f], np.asarray(m[value])[:, j])
            assert np.isnan(shown[:, [f for f in range(table.latent_frames) if f not in m["key_frames"]]]).all()
            marks = sorted(t.get_text() for t in ax.texts)
            assert marks == sorted(["S"] * ("sink" in m["classes"]) + ["P"] * ("pinned" in m["classes"]))
    # sink share: a line per head equal to the table's rows, a gap where the cache holds no sink, the uniform line
    left, right = figs["sink_share.png"].axes[:2]
    chunks = table.chunks(step)
    for h, line in zip(range(HEADS), left.lines):
        want = [_mean_or_nan(table.select(step, chunk=c, head=h), "mass_sink") for c in chunks]
        np.testing.assert_array_equal(line.get_ydata(), want)
        assert np.isnan(line.get_ydata()[chunks.index(0)]) and np.isnan(line.get_ydata()[chunks.index(6)])
    assert left.lines[HEADS].get_label() == "uniform share"
    np.testing.assert_array_equal(right.lines[0].get_ydata(),
                                  [_mean_or_nan(table.select(step, chunk=c, head=0), "sink_ratio") for c in chunks])
    cons = figs["head_consensus.png"].axes[0]
    np.testing.assert_array_equal(cons.lines[0].get_ydata(),
                                  [_mean_or_nan(table.select(step, chunk=c), "head_consensus") for c in chunks])
    np.testing.assert_array_equal(cons.lines[2].get_ydata(),
                                  [_mean_or_nan(table.select(step, chunk=c), "mean_concentration") for c in chunks])
    # change the table: the figure follows it (it reads nothing else)
    table.select(step, chunk=2, head=1)[0]["mass_sink"] = 0.123
    again = sink_plots.sink_share(table, step).axes[0].lines[1].get_ydata()
    assert again[chunks.index(2)] == 0.123
    files = write_sink_report([sink_table(MemoryRecording(take))], str(tmp_path / "rep"))
    for name in figs:
        with Image.open(files[name]) as im:
            assert im.size[0] > 300 and im.size[1] > 200, name


def test_sink_plots_without_matplotlib_say_how_to_get_it(tmp_path, monkeypatch):
    take, _ = run(planted_sink, keys)
    table = sink_table(MemoryRecording(take))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "wan_capture.views.sink_plots", raising=False)
    import wan_capture.views
    monkeypatch.delattr(wan_capture.views, "sink_plots", raising=False)  # as on a machine that never had it
    with pytest.raises(ImportError, match=r"pip install 'wan-attention-capture\[report\]'"):
        write_sink_report([table], str(tmp_path / "rep"))
    assert not (tmp_path / "rep").exists()  # nothing half-written
    files = write_sink_report([table], str(tmp_path / "rep"), figures=False)
    assert sorted(files) == ["frames.csv", "series.csv", "series.json"]


# -- several runs side by side -----------------------------------------------------------------------------------
def test_sink_compare_two_caches_side_by_side(tmp_path):
    """Two recordings (a planted sink in a 2-frame window, uniform heads in a cache that grows) through the command:
    one table and one set of figures, each run's numbers those of its own series at its last denoising step."""
    from wan_capture.views import sink_plots
    from wan_capture.views.sink_report import COMPARE_COLUMNS, compare_rows
    runs = {"sinky": run(planted_sink, keys, steps=(0, 1))[0], "uniform": run(uniform_q, keys, window=8)[0]}
    folders = []
    for name, take in runs.items():
        save_take(take, str(tmp_path / name), "b", SaveOptions(storage_dtype="float32"))
        folders.append(str(tmp_path / name / "b" / "attention_maps"))
    r = subprocess.run([sys.executable, "-m", "wan_capture", "sink-report", *folders, "--out", str(tmp_path / "cmp")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "compared: 8 (run, chunk) rows in compare.csv" in r.stdout
    with open(tmp_path / "cmp" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COMPARE_COLUMNS) and len(rows) == 8
    tables = []
    for name, folder in zip(runs, folders):
        rec = FolderRecording.open(folder, _video(folder))
        tables.append(sink_table(rec, label=rows[0]["run"] if name == "sinky" else rows[-1]["run"]))
        assert tables[-1].label.startswith(name + "/")  # runs named apart by their folders
        mine = [x for x in rows if x["run"] == tables[-1].label]
        step = tables[-1].denoise_step()
        assert [int(x["chunk"]) for x in mine] == [0, 2, 4, 6] and {int(x["step"]) for x in mine} == {step}
        for x in mine:
            at = tables[-1].select(step, chunk=int(x["chunk"]))
            for col in ("mass_sink", "sink_ratio", "head_consensus", "mean_concentration", "sink_rope_distance"):
                want = _mean_or_nan(at, col)
                assert (x[col] == "") if math.isnan(want) else float(x[col]) == pytest.approx(want, rel=1e-12)
        for f in ("series.csv", "frames.csv", "series.json", "sink_share.png"):
            assert (tmp_path / "cmp" / f"run{list(runs).index(name) + 1}" / f).stat().st_size > 0
    assert [int(x["cache_frames"]) for x in rows if x["run"] == tables[1].label] == [2, 4, 6, 8]
    figs = sink_plots.compare_figures(tables)
    share = figs["compare_sink.png"]
    legend = [t.get_text() for t in share.axes[2].get_legend().get_texts()]
    assert legend == [t.label for t in tables]
    cmp = compare_rows(tables)
    for i, t in enumerate(tables):  # aligned by RoPE distance: x is the sinks' distance, y the ratio, from the table
        near = [x for x in cmp if x["run"] == t.label and x["sink_rope_distance"] is not None]
        np.testing.assert_array_equal(share.axes[2].lines[i].get_xdata(), [x["sink_rope_distance"] for x in near])
        np.testing.assert_array_equal(share.axes[2].lines[i].get_ydata(), [x["sink_ratio"] for x in near])
    uniform_ratio = share.axes[1].lines[1].get_ydata()  # the uniform run: ratio 1 whatever the cache size
    assert np.allclose(uniform_ratio[1:], 1.0, atol=1e-5) and np.isnan(uniform_ratio[0])
    for name in ("compare_sink.png", "compare_consensus.png"):
        with Image.open(tmp_path / "cmp" / name) as im:
            assert im.size[0] > 600


def _video(folder):
    from wan_capture import AttentionAnalyzer
    return AttentionAnalyzer(folder).list_videos()[0]


def test_sink_metrics_table_bounded_before_reading_and_steps_selected(tmp_path, monkeypatch):
    """A table past MAX_ROWS is refused before any array is read, naming --steps; with fewer steps it is built."""
    import wan_capture.views.sink_table as report
    take, _ = run(planted_sink, keys, steps=(0, 1))
    rec = MemoryRecording(take)
    reads = []
    monkeypatch.setattr(MemoryRecording, "get", lambda self, key: reads.append(key))
    monkeypatch.setattr(report, "MAX_ROWS", 4 * 2 * HEADS - 1)  # 4 chunks x 2 steps x 1 block x 3 heads
    with pytest.raises(ValueError, match=r"would have 24 rows .* over 23: report fewer steps \(--steps"):
        sink_table(rec)
    assert reads == []
    monkeypatch.undo()
    monkeypatch.setattr(report, "MAX_ROWS", 4 * HEADS)
    one = sink_table(rec, steps=[1])
    assert {r["step"] for r in one.rows} == {1} and len(one.rows) == 4 * HEADS


def test_sink_compare_readme_worked_example(tmp_path):
    """The README's worked example, its commands as written (out/ in a temporary folder): what it says it prints and
    what it says the figures show is what the tables hold."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("### Worked example: from causal runs to the sink figures"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert len(commands) == 3
    out = ""
    for command in commands:
        args = command.replace("out/", str(tmp_path) + "/").split()
        assert args[:3] == ["python", "-m", "wan_capture"]
        r = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out = r.stdout
    quoted = section[section.index("(`chunk 9:") + 2:section.index("` for the large cache")].replace("\n", " ")
    assert "  " + quoted in out.split("sink report of large/")[1]
    with open(tmp_path / "sink_report" / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for run_name in ("small/", "large/"):
        mine = [r for r in rows if r["run"].startswith(run_name) and r["sink_ratio"]]
        ratios = [float(r["sink_ratio"]) for r in mine]
        assert max(ratios) < 1 and ratios[0] > ratios[-1]  # under the uniform share, falling overall
        assert all(float(r["head_consensus"]) > 0.9 and float(r["mean_concentration"]) < 0.15
                   for r in rows if r["run"].startswith(run_name))
        for a, b in zip(mine, mine[1:]):  # the raw sink mass falls while the cache grows
            if int(b["cache_frames"]) > int(a["cache_frames"]):
                assert float(b["mass_sink"]) < float(a["mass_sink"])
                assert float(b["uniform_sink"]) < float(a["uniform_sink"])
    for image in ("sink_compare.png", "sink_compare_consensus.png", "sink_chunks.png", "sink_timeline.png"):
        assert f"docs/images/{image}" in section
    for name in ("compare_sink.png", "compare_consensus.png", "run2/frame_mass_chunks.png",
                 "run2/eviction_timeline.png"):
        assert (tmp_path / "sink_report" / name).stat().st_size > 0
