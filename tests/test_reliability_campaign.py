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
    from test_reliability import dead_save
    from wan_capture.recording.save import STALE_SECONDS, _save_lock
    root = tmp_path / "b" / "attention_maps"
    root.mkdir(parents=True)
    killed = root / f".prompt_009_vid004.tmp-{dead_save(root, 'prompt_009_vid004')}"  # another video's save, killed
    (killed / "token_flower").mkdir(parents=True)
    running = root / ".prompt_009_vid005.tmp-x2"  # a save still running (its lock held, here by this test)
    running.mkdir()
    held = _save_lock(str(root), "prompt_009_vid005", "x2")
    assert held.acquire(wait=False)
    other_host = root / ".prompt_009_vid006.tmp-elsewhere-123-x3"  # an older version's save: no lock to ask
    other_host.mkdir()
    old_other_host = root / ".prompt_009_vid007.tmp-elsewhere-124-x4"
    old_other_host.mkdir()
    old = time.time() - STALE_SECONDS - 60
    os.utime(old_other_host, (old, old))
    save_take(recorded(steps=1), str(tmp_path), "b", SaveOptions())
    held.release()
    left = sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))
    assert left == sorted(["prompt_000_vid001", running.name, other_host.name])


def test_batch_name_without_letters_is_refused_not_shared(tmp_path):
    take = recorded(steps=1)
    for bad in ("🌹🌹", "", "..", "  "):
        with pytest.raises(ValueError, match="batch_name .* has no letters or digits"):
            save_take(take, str(tmp_path), bad, SaveOptions())
    assert not (tmp_path / "attention_batch").exists() and os.listdir(tmp_path) == []
    save_take(take, str(tmp_path), "🌹 roses", SaveOptions())
    assert os.listdir(tmp_path) == ["roses"]


# -- claim_modes: saves of one name in different modes, on two processes sharing the folder ------------------------
RACER_TIMED = RACER.replace('print(v.video_id, v.status, flush=True)', 'print(v.video_id, v.status, time.time(), flush=True)')


@pytest.mark.parametrize("modes", [("new_name", "replace"), ("replace", "new_name"), ("replace", "replace")])
def test_claim_modes_a_claimed_name_is_only_filled_by_its_claimant(tmp_path, modes):
    """H2 (and H3): the overwrite used to rename its finished folder over the other save's empty claim, which then
    moved it aside and deleted it, both reporting complete. Now every reported folder is on disk, complete and one
    save's whole; where both report one name, it holds the save that finished last (an overwrite replaces what is
    there, whole, after the claimant has filled it); nothing is left beside them."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER_TIMED.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                                                       blocks=blocks), str(tmp_path), str(go), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for blocks, mode in zip((3, 2), modes)]
    time.sleep(1.5)
    go.write_text("")
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-800:] for r in results]
    reports = [dict(zip(("video", "status", "at"), r[0].split())) for r in results]
    root = tmp_path / "b" / "attention_maps"
    an = AttentionAnalyzer(str(root))
    assert all(r["status"] == "complete" and (root / r["video"]).is_dir() for r in reports)
    assert [n for n in os.listdir(root) if n.startswith(".")] == []  # no hidden folder, no lock left
    blocks = {}
    for video in an.list_videos():
        s = an.summary(video)
        assert s["status"] == "complete"
        shapes = {an.load_step(video, w, st).shape[0] for w in an.list_tokens(video) for st in (0, 1, 2)}
        assert len(shapes) == 1  # one save's arrays, never the two mixed
        blocks[video] = shapes.pop()
    if reports[0]["video"] == reports[1]["video"]:
        last = max(range(2), key=lambda i: float(reports[i]["at"]))
        assert blocks[reports[0]["video"]] == (3, 2)[last]
        if "new_name" in modes:  # the new_name save claimed the free name first: the overwrite waited for it to be
            assert modes[last] == "replace"  # filled, then replaced it (it never fills another's claim)
    else:
        assert {blocks[r["video"]] for r in reports} == {3, 2}  # both kept, each at its own name


# -- save_liveness: a save in progress is known by its lock, not by host and process id ------------------------------
HOLDER = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_storage import recorded
    from wan_capture import SaveOptions, save_take
    from wan_capture.recording import save as storage
    real = storage.atomic_write
    def held(path, data):
        real(path, data)
        if path.endswith("summary.json") and not os.path.exists(sys.argv[2]):
            print("writing", flush=True)
            while not os.path.exists(sys.argv[2]):  # the save pauses after its first file
                time.sleep(0.01)
    storage.atomic_write = held
    save_take(recorded(steps=2), sys.argv[1], "b", SaveOptions())
    print("done", flush=True)
""")
SWEEPER = "import sys; sys.path[:0] = [{root!r}]; from wan_capture.recording.save import sweep_leftovers; " \
          "print(sweep_leftovers(sys.argv[1]))"


def test_save_liveness_a_running_save_survives_a_sweep_from_another_pid_namespace_and_a_killed_one_goes(tmp_path):
    """Two containers with one hostname sharing a volume (each its own process ids): the sweep used to decide 'dead'
    by (hostname, pid) and removed the other's save in progress. The sweeper here runs in a new pid namespace."""
    import shutil as sh
    if not sh.which("unshare") or subprocess.run(["unshare", "-p", "-f", "true"], capture_output=True).returncode:
        pytest.skip("SAVE LIVENESS TEST SKIPPED: needs unshare -p (root) for a second pid namespace")
    root = tmp_path / "b" / "attention_maps"
    go = tmp_path / "go"
    saver = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, tests=os.path.join(ROOT, "tests")),
                              str(tmp_path), str(go)], stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "writing"
    hidden = [n for n in os.listdir(root) if n.startswith(".") and ".tmp-" in n]
    assert len(hidden) == 1
    sweep = [sys.executable, "-c", SWEEPER.format(root=ROOT), str(root)]
    out = subprocess.run(["unshare", "-p", "-f", *sweep], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    assert (root / hidden[0]).is_dir()  # the running save's folder stays
    go.write_text("")
    assert saver.communicate(timeout=60)[0].strip() == "done"
    assert AttentionAnalyzer(str(root)).summary("prompt_000_vid001")["status"] == "complete"
    # a save killed with SIGKILL: its lock goes with it, and the next sweep (any namespace) tidies its folder
    go.unlink()
    saver = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, tests=os.path.join(ROOT, "tests")),
                              str(tmp_path), str(go)], stdout=subprocess.PIPE, text=True)
    assert saver.stdout.readline().strip() == "writing"
    saver.kill()
    saver.wait()
    out = subprocess.run(["unshare", "-p", "-f", *sweep], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and ".tmp-" in out.stdout, out.stdout + out.stderr
    assert sorted(os.listdir(root)) == ["prompt_000_vid001"]  # the earlier recording, untouched
