"""The sink report: its series equal float64 computed from the q/k of planted cases (a sink head, a collapse where every
head agrees, an evicted sink), evicted keys are absent (never 0), and its files are written and read back."""
import csv
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
from wan_capture import CausalRecorder, MemoryRecording, RecordingPlan, SaveOptions, save_take
from wan_capture.views.render import ABSENT
from wan_capture.views.sink_report import COLUMNS, sink_series, write_sink_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FT, HEADS, D, CHUNK = 4, 3, 16, 2  # tokens per frame, heads, head dim, frames per chunk


def caches(frames: int, window: int, sink: int, evict_sink_at=None):
    """(chunk, key frames, sink frames) of a rolling cache: the sinks, the last ``window`` frames, the chunk."""
    out = []
    for c in range(0, frames, CHUNK):
        sinks = [] if evict_sink_at is not None and c >= evict_sink_at else list(range(min(sink, c)))
        past = [f for f in range(c) if f not in sinks][-window:]
        out.append((c, sorted(set(sinks + past)) + list(range(c, c + CHUNK)), sinks))
    return out


def run(q_of, k_of, frames=8, window=2, sink=1, evict_sink_at=None):
    """A hand-driven causal recording of one block: q/k per chunk from ``q_of(chunk)``/``k_of(frame)``; returns the
    take and what each chunk attended to (for the float64 reference)."""
    rec = CausalRecorder(RecordingPlan(record_cross=False, record_sink_stats=True, store_per_head=True,
                                       storage_dtype="float32"), FT)
    calls = []
    with rec.recording(num_blocks=1, num_heads=HEADS, head_dim=D):
        for c, key_frames, sinks in caches(frames, window, sink, evict_sink_at):
            q = q_of(c)
            k = torch.cat([k_of(f) for f in key_frames], dim=1)
            rec.tap(0, q, k, lambda: q, query_start=c * FT, key_frames=key_frames, step=0, sink_frames=sinks)
            calls.append((c, key_frames, sinks, q, k))
    return rec.take, calls


def float64_rows(calls, multiple=2.0):
    """The series from first principles: float64 attention of the captured q/k, masses summed by hand."""
    want = {}
    for c, key_frames, sinks, q, k in calls:
        qd, kd = q.transpose(1, 2).double(), k.transpose(1, 2).double()
        _, _, mass, _, _ = naive_sink(qd, kd, FT, q_offset=kd.shape[2] - qd.shape[2])  # [1, H, Fq, Fk]
        mass = mass[0].numpy()
        for h in range(HEADS):
            m = mass[h]
            sink_cols = [j for j, f in enumerate(key_frames) if f in sinks]
            own = [j for j, f in enumerate(key_frames) if f >= c]
            share = m.mean(axis=0)
            want[(c, h)] = {"mass_sink": m[:, sink_cols].sum(axis=1).mean() if sink_cols else 0.0,
                            "mass_chunk": m[:, own].sum(axis=1).mean(),
                            "behavioural_sinks": [f for f, s in zip(key_frames, share) if s > multiple / len(key_frames)]}
        sims = []
        for a in range(HEADS):
            for b in range(a + 1, HEADS):
                for qf in range(mass.shape[1]):
                    p, r = mass[a, qf], mass[b, qf]
                    m2 = (p + r) / 2
                    kl = lambda x, y: sum(xi * math.log2(xi / yi) for xi, yi in zip(x, y) if xi > 0)  # noqa: E731
                    sims.append((c, 1 - (kl(p, m2) + kl(r, m2)) / 2))
        for h in range(HEADS):
            want[(c, h)]["head_agreement"] = float(np.mean([s for cc, s in sims if cc == c]))
    return want


def planted_sink(c):
    g = torch.Generator().manual_seed(100 + c)
    q = torch.randn(1, CHUNK * FT, HEADS, D, generator=g)
    q[:, :, 0] = 3.0  # head 0 looks along the direction frame 0's keys point in
    return q.bfloat16().float()


def keys(f):
    g = torch.Generator().manual_seed(f)
    k = torch.randn(1, FT, HEADS, D, generator=g) * 0.3
    if f == 0:
        k[:, :, 0] = 3.0  # the sink frame: head 0's queries find it
    return k.bfloat16().float()


def test_sink_report_planted_sink_head_equals_float64():
    take, calls = run(planted_sink, keys)
    rows = sink_series(MemoryRecording(take))
    want = float64_rows(calls)
    assert len(rows) == len(calls) * HEADS
    for r in rows:
        w = want[(r["chunk"], r["head"])]
        assert r["mass_sink"] == pytest.approx(w["mass_sink"], rel=1e-5, abs=1e-7)
        assert r["mass_chunk"] == pytest.approx(w["mass_chunk"], rel=1e-5, abs=1e-7)
        assert r["mass_sink"] + r["mass_window"] + r["mass_chunk"] + r["mass_pinned"] == pytest.approx(1.0, abs=1e-5)
        assert r["behavioural_sinks"] == w["behavioural_sinks"]
        assert r["head_agreement"] == pytest.approx(w["head_agreement"], rel=1e-5, abs=1e-6)
    late = [r for r in rows if r["chunk"] >= CHUNK]
    assert all(r["mass_sink"] > 0.5 and r["behavioural_sinks"][:1] == [0] for r in late if r["head"] == 0)
    assert all(r["mass_sink"] < 0.3 for r in late if r["head"] != 0)  # the planted head, and only it
    assert all(r["sink_distance"] == {0: pytest.approx(r["chunk"] + 0.5)} for r in late)


def test_sink_report_planted_collapse_every_head_agrees():
    def same(c):  # every head the same queries and keys: their distributions are one
        q = planted_sink(c)[:, :, :1]
        return q.expand(-1, -1, HEADS, -1).contiguous()

    def same_keys(f):
        return keys(f)[:, :, :1].expand(-1, -1, HEADS, -1).contiguous()
    take, calls = run(same, same_keys)
    rows = sink_series(MemoryRecording(take))
    for r in rows:
        assert r["head_agreement"] == pytest.approx(1.0, abs=1e-6)
        assert r["mass_sink"] == pytest.approx(float64_rows(calls)[(r["chunk"], r["head"])]["mass_sink"], abs=1e-6)
    _, calls = run(planted_sink, keys)
    assert max(w["head_agreement"] for w in float64_rows(calls).values()) < 0.99  # planted heads differ


def test_sink_report_evicted_sink_is_absent_not_zero(tmp_path):
    take, calls = run(planted_sink, keys, evict_sink_at=6)
    rec = MemoryRecording(take)
    rows = sink_series(rec)
    after = [r for r in rows if r["chunk"] == 6]
    assert after and all(0 not in r["key_frames"] and r["sink_frames"] == [] for r in after)
    assert all(r["mass_sink"] == 0.0 and r["behavioural_sinks"] != [0] for r in after)
    files = write_sink_report(rec, str(tmp_path))
    # the chunk's frame x frame picture: the evicted frame's column is the "absent" grey, not the colour of 0
    img = np.asarray(Image.open(files["frame_mass_chunk_006.png"]).convert("RGB"), dtype=np.float64) / 255
    absent = np.all(np.abs(img - np.array(ABSENT)) < 0.01, axis=-1)
    assert absent.sum() > 100
    events = take.kv_events
    assert [e["evicted"] for e in events if e["chunk"] == 6][0] == [0, 2, 3]  # the sink and the window's oldest


def test_sink_report_files_written_and_readable(tmp_path):
    take, _ = run(planted_sink, keys)
    rec = MemoryRecording(take)
    files = write_sink_report(rec, str(tmp_path / "report"))
    assert {"series.csv", "series.json", "sink_mass_per_head.png", "head_agreement.png",
            "eviction_timeline.png"} <= set(files)
    for name, path in files.items():
        if name.endswith(".png"):
            with Image.open(path) as im:
                assert im.size[0] > 200 and im.size[1] > 80
    rows = sink_series(rec)
    with open(files["series.csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(COLUMNS) and len(table) == len(rows)
    assert [float(t["mass_sink"]) for t in table] == [r["mass_sink"] for r in rows]
    data = json.load(open(files["series.json"]))
    assert data["rows"] == json.loads(json.dumps(rows)) and "head_agreement" in data["definitions"]
    # saved and loaded: the same series
    video = save_take(take, str(tmp_path), "b", SaveOptions(storage_dtype="float32"))[0]
    from wan_capture import FolderRecording
    loaded = sink_series(FolderRecording.open(str(tmp_path / "b" / "attention_maps"), video.video_id))
    assert json.loads(json.dumps(loaded)) == json.loads(json.dumps(rows))


def test_sink_report_command_on_the_causal_demo(tmp_path):
    r = subprocess.run([sys.executable, "-m", "wan_capture", "causal-demo", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    maps = tmp_path / "causal_demo" / "attention_maps"
    r = subprocess.run([sys.executable, "-m", "wan_capture", "sink-report", str(maps), "--out", str(tmp_path / "rep")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sink report of causal_vid001" in r.stdout and "head agreement" in r.stdout
    assert "nan" not in r.stdout.split("plots at step")[1].split("series.csv")[0]  # heads were kept: agreement
    for name in ("series.csv", "sink_mass_per_head.png", "eviction_timeline.png", "frame_mass_chunk_003.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name


def test_sink_report_frame_by_frame_view_tells_evicted_from_unattended(tmp_path):
    """The whole-video frame x frame view: a key frame the chunk's cache did not hold is absent (grey), while a key
    frame it held is drawn with its mass, whatever it is."""
    from wan_capture.views.maps import frame_mass, frame_mass_images
    take, calls = run(planted_sink, keys, evict_sink_at=6)
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
