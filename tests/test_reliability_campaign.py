"""Defects of the second fault campaign, reproduced through the surface it used and fixed (the HTTP ones are in
test_reliability_http.py): templates that would expand without bound, saves racing across processes, an overwrite
that fails, leftovers of killed saves."""
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

from test_storage import recorded
from wan_capture import AttentionAnalyzer, SaveOptions, StorageError, TemplateError, save_take
from wan_capture.prompts.templates import MAX_VARIATIONS, count_variations, expand_template, template_variation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- template_bound ---------------------------------------------------------------------------------------------
def test_template_bound_a_variation_of_2_to_the_40_costs_what_one_prompt_costs():
    template = " ".join(f"[a{i}|b{i}]" for i in range(40)) + " (flower:1.5)"
    tracemalloc.start()
    try:
        total = count_variations(template)
        last = template_variation(template, total - 1)
        middle = template_variation(template, 2 ** 39 + 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 2 ** 40 and peak < 1 << 20, peak  # under 1 MiB, where expanding took 16 GB
    assert last.prompt.split()[:40] == [f"b{i}" for i in range(40)] and last.prompt_id == f"prompt_{total - 1:03d}"
    want = [("b" if (2 ** 39 + 5) >> (39 - i) & 1 else "a") + str(i) for i in range(40)]
    assert middle.prompt.split()[:40] == want
    with pytest.raises(TemplateError, match=f"stands for {2 ** 40} prompts, over {MAX_VARIATIONS}"):
        expand_template(template)  # listing them all is refused with the count, before anything is built
    with pytest.raises(TemplateError, match=r"variation 1099511627776 does not exist: the template has 1099511627776"):
        template_variation(template, total)


def test_template_bound_nesting_and_length_refused_before_recursion():
    with pytest.raises(TemplateError, match="nested deeper than"):
        count_variations("[" * 5000 + "a" + "]" * 5000)
    with pytest.raises(TemplateError, match="characters, over"):
        count_variations("a" * 60_000)


def test_template_bound_every_variation_in_the_order_of_the_listing():
    template = "a [red|blue [x|y]] [car|bus|[v|w] van]"
    listed = [v.prompt for v in expand_template(template)]
    assert listed[:3] == ["a red car", "a red bus", "a red v van"] and len(listed) == count_variations(template) == 12
    assert [template_variation(template, i).prompt for i in range(12)] == listed


# -- concurrent_save: two processes save the same video name at once --------------------------------------------
RACER = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_storage import recorded
    from wan_capture import SaveOptions, save_take
    from wan_capture.recording import save as storage
    real = storage.atomic_write
    def slow(path, data):
        time.sleep(0.005)  # long enough for the two saves to overlap
        real(path, data)
    storage.atomic_write = slow
    take = recorded(steps=3, blocks={blocks})
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
    v = save_take(take, sys.argv[1], "b", SaveOptions(if_exists=sys.argv[3]))[0]
    print(v.video_id, v.status, flush=True)
""")


@pytest.mark.parametrize("mode", ["new_name", "replace"])
def test_concurrent_save_of_one_name_by_two_processes_loses_nothing(tmp_path, mode):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                                                 blocks=blocks), str(tmp_path), str(go), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for blocks in (3, 2)]
    time.sleep(1.5)
    go.write_text("")
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-800:] for r in results]
    reports = [r[0].split() for r in results]
    an = AttentionAnalyzer(str(tmp_path / "b" / "attention_maps"))
    names = sorted(os.listdir(tmp_path / "b" / "attention_maps"))
    if mode == "new_name":  # two names, both complete, each readable in full
        assert sorted(r[0] for r in reports) == ["prompt_000_vid001", "prompt_000_vid001_2"] == names
    else:  # one name replaced as a whole by the later save: complete, nothing of the two mixed, nothing left over
        assert names == ["prompt_000_vid001"] and [r[0] for r in reports] == ["prompt_000_vid001"] * 2
    for video in an.list_videos():
        s = an.summary(video)
        assert s["status"] == "complete" and s["files_written"] == len(
            [f for _, _, fs in os.walk(tmp_path / "b" / "attention_maps" / video) for f in fs])
        shapes = {an.load_step(video, w, st).shape[0] for w in an.list_tokens(video) for st in (0, 1, 2)}
        assert len(shapes) == 1  # one save's arrays, never the two mixed (the racers record 3 and 2 blocks)


# -- overwrite_failure: an overwrite that fails keeps the previous complete recording ----------------------------
def test_overwrite_failure_keeps_the_previous_complete_recording(tmp_path, monkeypatch):
    from wan_capture.recording import save as storage
    first = save_take(recorded(steps=2), str(tmp_path), "b", SaveOptions())[0]
    before = {p: open(p, "rb").read() for p in first.files}
    real, calls = storage.atomic_write, []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 6:
            raise OSError(28, "No space left on device")
        real(path, data)
    monkeypatch.setattr(storage, "atomic_write", full_disk)
    with pytest.raises(StorageError, match=r"No space left.*previous complete recording at .*prompt_000_vid001 is "
                                           r"kept; what this save wrote is at .*prompt_000_vid001_partial, marked"):
        save_take(recorded(steps=3), str(tmp_path), "b", SaveOptions(if_exists="replace"))
    monkeypatch.setattr(storage, "atomic_write", real)
    assert {p: open(p, "rb").read() for p in first.files} == before  # byte for byte
    an = AttentionAnalyzer(str(tmp_path / "b" / "attention_maps"))
    assert an.list_videos() == ["prompt_000_vid001", "prompt_000_vid001_partial"]
    assert an.summary("prompt_000_vid001")["status"] == "complete"
    with pytest.warns(UserWarning, match="partial"):
        assert "No space left" in an.summary("prompt_000_vid001_partial")["partial_reason"]


def test_overwrite_failure_by_cancel_keeps_the_previous_recording(tmp_path, monkeypatch):
    from wan_capture.recording import save as storage
    save_take(recorded(steps=2), str(tmp_path), "b", SaveOptions())
    real, calls = storage.atomic_write, []

    def cancelled(path, data):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt("cancelled")
        real(path, data)
    monkeypatch.setattr(storage, "atomic_write", cancelled)
    with pytest.raises(KeyboardInterrupt):
        save_take(recorded(steps=3), str(tmp_path), "b", SaveOptions(if_exists="replace"))
    an = AttentionAnalyzer(str(tmp_path / "b" / "attention_maps"))
    assert an.summary("prompt_000_vid001")["status"] == "complete" and an.summary("prompt_000_vid001")["steps"] == [0, 1]


# -- tmp_sweep: leftovers of killed saves go, whatever is saved next; saves in progress stay ---------------------
def test_tmp_sweep_of_killed_saves_without_saving_the_same_video_again(tmp_path):
    from test_reliability import dead_owner
    from wan_capture.recording.save import STALE_SECONDS, _owner
    root = tmp_path / "b" / "attention_maps"
    root.mkdir(parents=True)
    killed = root / f".prompt_009_vid004.tmp-{dead_owner()}-x1"  # another video's save, killed
    (killed / "token_flower").mkdir(parents=True)
    running = root / f".prompt_009_vid005.tmp-{_owner()}-x2"  # a save still running (this process)
    running.mkdir()
    other_host = root / ".prompt_009_vid006.tmp-elsewhere-123-x3"  # another server's save: its process is unknown
    other_host.mkdir()
    old_other_host = root / ".prompt_009_vid007.tmp-elsewhere-124-x4"
    old_other_host.mkdir()
    old = time.time() - STALE_SECONDS - 60
    os.utime(old_other_host, (old, old))
    save_take(recorded(steps=1), str(tmp_path), "b", SaveOptions())
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(["prompt_000_vid001", running.name, other_host.name])


def test_batch_name_without_letters_is_refused_not_shared(tmp_path):
    take = recorded(steps=1)
    for bad in ("🌹🌹", "", "..", "  "):
        with pytest.raises(ValueError, match="batch_name .* has no letters or digits"):
            save_take(take, str(tmp_path), bad, SaveOptions())
    assert not (tmp_path / "attention_batch").exists() and os.listdir(tmp_path) == []
    save_take(take, str(tmp_path), "🌹 roses", SaveOptions())
    assert os.listdir(tmp_path) == ["roses"]
