"""Saved recordings under faults and bad input (part of the fault campaign in docs/RELIABILITY.md): one test per
defect, each reproducing it first. Groups: stale, collision, range_limit, out_of_range, damaged."""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

from test_storage import TRACKING, recorded
from wan_capture import AttentionAnalyzer, PlanError, Recorder, RecordingPlan, SaveOptions, parse_index_list, save_take
from wan_capture.recording.analyzer import DamagedFileError
from wan_capture.model_info import ModelInfo
from wan_capture.prompts.tokens import TokenTracking, TrackedWord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = ModelInfo("WAN21", "WanModel", 2, 2, 128, 256, (1, 2, 2), (4, 8, 8))


def maps(tmp_path, batch="b"):
    return AttentionAnalyzer(str(tmp_path / batch / "attention_maps"))


# -- stale: a new recording replaces the old one as a whole -----------------------------------------------------
def test_stale_files_never_mix_into_a_new_recording(tmp_path):
    save_take(recorded(steps=3), str(tmp_path), "b", SaveOptions())  # flower, big, tree; steps 0-2
    one_word = TokenTracking(TRACKING.prompt, TRACKING.words[:1], 512)
    take = recorded(steps=1, text_positions=one_word.positions, extra={"tokens": one_word.to_json()})
    video = save_take(take, str(tmp_path), "b", SaveOptions())[0]
    an = maps(tmp_path)
    assert an.list_tokens(video.video_id) == ["flower"] and an.list_steps(video.video_id, "flower") == [0]
    assert an.get_temporal_evolution(video.video_id, "flower").shape[0] == 1
    folder = tmp_path / "b" / "attention_maps" / video.video_id
    assert not (folder / "token_tree").exists() and not (folder / "token_flower" / "step_002.npy").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [video.video_id]  # nothing left beside it
    assert len(video.files) == len(set(video.files)) and sum(f.endswith("summary.json") for f in video.files) == 1


SAVER = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_storage import recorded
    from wan_capture import SaveOptions, save_take
    from wan_capture.recording import save as storage
    real = storage.atomic_write
    def slow(path, data):
        time.sleep(0.01)
        real(path, data)
    storage.atomic_write = slow
    take = recorded(steps=4, blocks=3, batch=1)
    print("ready", flush=True)
    save_take(take, sys.argv[1], "b", SaveOptions(storage_format="numpy"))
    print("saved", flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.12, 0.25, 0.4])
def test_stale_sigkill_during_a_save_keeps_the_previous_recording_or_an_honest_partial(tmp_path, delay):
    save_take(recorded(steps=2), str(tmp_path), "b", SaveOptions())
    before = maps(tmp_path).summary("prompt_000_vid001")
    script = SAVER.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # the next save tidies up after the killed one first; reading before that sees the previous recording
    an = maps(tmp_path)
    summary = an.summary("prompt_000_vid001")
    assert summary["status"] == "complete"
    assert summary["steps"] == before["steps"] or summary["steps"] == [0, 1, 2, 3]
    for word in an.list_tokens("prompt_000_vid001"):
        an.load_all_steps("prompt_000_vid001", word)  # every listed file is there and readable
    save_take(recorded(steps=2), str(tmp_path), "b", SaveOptions())
    assert sorted(p.name for p in (tmp_path / "b" / "attention_maps").iterdir()) == ["prompt_000_vid001"]


def dead_save(root, video: str) -> str:
    """The token of a save that was killed: its lock file is there, and no process holds it."""
    token = "killed0"
    open(os.path.join(str(root), f".{video}.save-{token}.lock"), "w").close()
    return token


def test_stale_previous_recording_moved_aside_by_a_killed_swap_is_restored(tmp_path):
    save_take(recorded(steps=2), str(tmp_path), "b", SaveOptions())
    root = tmp_path / "b" / "attention_maps"
    owner = dead_save(root, "prompt_000_vid001")
    (root / "prompt_000_vid001").rename(root / f".prompt_000_vid001.old-{owner}")  # killed between the renames
    from wan_capture.recording.save import sweep_leftovers
    sweep_leftovers(str(root))
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == ["prompt_000_vid001"]
    assert maps(tmp_path).summary("prompt_000_vid001")["steps"] == [0, 1]


# -- collision: tracked words whose folder names would be the same ------------------------------------------------
def test_collision_of_tracked_word_folders_keeps_every_word(tmp_path):
    long_a, long_b = "x" * 85 + "a", "x" * 85 + "b"
    words = (TrackedWord("flower!", "flower", (1,), ("f",), (2,), 2.0),
             TrackedWord("flower?", "flower", (1,), ("f",), (5,), 2.0),
             TrackedWord(long_a, long_a, (1,), ("x",), (6,), 1.5), TrackedWord(long_b, long_b, (1,), ("x",), (7,), 1.5))
    tracking = TokenTracking("p", words, 512)
    take = recorded(text_positions=tracking.positions, extra={"tokens": tracking.to_json()})
    save_take(take, str(tmp_path), "b", SaveOptions(storage_dtype="float32"))
    an = maps(tmp_path)
    summary = an.summary("prompt_000_vid001")
    folders = [t["folder"] for t in summary["tokens"]]
    assert len(set(folders)) == 4
    for i, word in enumerate(words):
        got = an.load_step("prompt_000_vid001", word.label, 1)
        np.testing.assert_array_equal(got, take.cross[(1, "cond")][0][..., i:i + 1].numpy())
        assert an.load_metadata("prompt_000_vid001", word.label, 1)["token_folder"] == folders[i]


def test_collision_windows_device_names_are_never_folder_names(tmp_path):
    from wan_capture.recording.save import safe_name
    assert [safe_name(n) for n in ("con", "NUL", "aux.txt", "com1", "lpt9", "console")] == \
        ["_con", "_NUL", "_aux.txt", "_com1", "_lpt9", "console"]
    save_take(recorded(), str(tmp_path), "con", SaveOptions())
    assert (tmp_path / "_con" / "attention_maps").is_dir()


# -- range_limit: index lists and messages are bounded ------------------------------------------------------------
def test_range_limit_index_lists_are_bounded_before_expanding():
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match="more than 65536 indices") as e:
        parse_index_list("0-100000000", "steps")
    assert time.perf_counter() - t0 < 0.5 and len(str(e.value)) < 300
    with pytest.raises(PlanError) as e:
        parse_index_list("0-20000," * 10 + "x" * 5000, "blocks")
    assert len(str(e.value)) < 400
    assert parse_index_list("0-3,7", "blocks") == (0, 1, 2, 3, 7)
    with pytest.raises(PlanError) as e:
        RecordingPlan(text_positions=tuple(range(70000)))
    assert len(str(e.value)) < 300


def test_range_limit_positions_outside_the_context_give_a_short_message():
    import torch
    from wan_capture import cross_attention_probs
    q, k = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(IndexError) as e:
        cross_attention_probs(q, k, list(range(60000)), 0.25)
    assert "59992 tracked positions" in str(e.value) and len(str(e.value)) < 300


# -- out_of_range: blocks and steps the model or schedule lacks are refused before sampling -----------------------
def test_out_of_range_blocks_and_steps_refused_before_sampling():
    rec = Recorder(RecordingPlan(text_positions=(0,), blocks=(0, 99), store_per_head=True))
    with pytest.raises(PlanError, match=r"blocks \[99\] do not exist: the model has 2 blocks \(0..1\)"):
        rec.begin_pass([1.0, 0.5, 0.0], INFO)
    assert rec.active is None and not rec.takes
    rec = Recorder(RecordingPlan(text_positions=(0,), steps=(1, 5), store_per_head=True))
    with pytest.raises(PlanError, match=r"steps \[5\] do not exist: the sampling has 2 steps"):
        rec.begin_pass([1.0, 0.5, 0.0], INFO)
    # a schedule that stops above sigma 0 can be continued (two experts, KSamplerAdvanced): later steps may come,
    # and are checked when the last pass begins
    rec = Recorder(RecordingPlan(text_positions=(0,), steps=(1, 3), store_per_head=True))
    rec.begin_pass([1.0, 0.5, 0.25], INFO)
    rec.end_pass("out-1")
    rec.begin_pass([0.25, 0.1, 0.0], INFO, input_fingerprint="out-1")
    assert rec.active.total_steps == 4
    rec.end_pass("out-2")
    rec = Recorder(RecordingPlan(text_positions=(0,), steps=(1, 5), store_per_head=True))
    rec.begin_pass([1.0, 0.5, 0.25], INFO)
    rec.end_pass("out-1")
    with pytest.raises(PlanError, match=r"steps \[5\] do not exist: the sampling has 4 steps \(0..3\)"):
        rec.begin_pass([0.25, 0.1, 0.0], INFO, input_fingerprint="out-1")


# -- damaged: damaged or missing files are named, partial recordings warn ----------------------------------------
def test_damaged_files_are_named_and_missing_ones_are_not_skipped(tmp_path):
    save_take(recorded(steps=3), str(tmp_path), "b", SaveOptions())
    video = tmp_path / "b" / "attention_maps" / "prompt_000_vid001"
    an = maps(tmp_path)
    step1 = video / "token_flower" / "step_001.npy"
    step1.write_bytes(step1.read_bytes()[:40])  # truncated
    with pytest.raises(DamagedFileError, match="step_001.npy"):
        an.load_step("prompt_000_vid001", "flower", 1)
    (video / "token_tree" / "step_002.npy").unlink()  # listed in summary.json, missing on disk
    with pytest.raises(FileNotFoundError, match="step_002"):
        an.load_all_steps("prompt_000_vid001", "tree")
    (video / "token_big" / "step_000_metadata.json").write_text("{not json")
    with pytest.raises(DamagedFileError, match="step_000_metadata.json"):
        an.load_metadata("prompt_000_vid001", "big", 0)
    gz = tmp_path / "x.npy.gz"
    gz.write_bytes(gzip.compress(b"\x93NUMPY garbage")[:-5])
    from wan_capture import load_array
    with pytest.raises(DamagedFileError, match="x.npy.gz"):
        load_array(str(gz))
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"not a torch file")
    with pytest.raises(DamagedFileError, match="x.pt"):
        load_array(str(pt))


def test_listed_steps_come_from_the_summary_and_partial_warning(tmp_path):
    """A stray step file (another recording's, or planted) is never stacked in: steps are what summary.json lists."""
    save_take(recorded(steps=2, record_sink_stats=True), str(tmp_path), "b", SaveOptions())
    sa = tmp_path / "b" / "attention_maps" / "prompt_000_vid001" / "self_attention"
    (sa / "step_1000_metadata.json").write_text("{}")
    (sa / "step_1000_received.npy").write_bytes((sa / "step_000_received.npy").read_bytes())
    (sa / "step_abc_metadata.json").write_text("{}")
    an = maps(tmp_path)
    assert an.list_self_attention_steps("prompt_000_vid001") == [0, 1]
    assert an.load_all_self_attention("prompt_000_vid001", "received").shape[0] == 2
    summary_path = sa.parent / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(status="partial", partial_reason="recording partial: interrupted")
    summary_path.write_text(json.dumps(summary))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps(tmp_path).load_step("prompt_000_vid001", "flower", 0)
    assert any("partial" in str(w.message) and "interrupted" in str(w.message) for w in caught)


# -- takes_released: every recording the recorder keeps counts against memory_budget_mb -------------------------
def test_takes_released_memory_is_bounded_by_the_budget():
    from fake_sampling import GRID, HEADS, D, TEXT  # noqa: F401
    import torch
    from wan_capture import AttentionCall
    plan = RecordingPlan(text_positions=(0, 1), record_sink_stats=True, storage_dtype="float32", memory_budget_mb=0.025, store_per_head=True)
    rec = Recorder(plan, keep_takes=100)
    g = torch.Generator().manual_seed(0)
    held = []
    for n in range(10):
        rec.begin_pass([1.0, 0.5, 0.0], {"num_blocks": 3, "num_heads": HEADS})
        for step, sigma in enumerate([1.0, 0.5]):
            for b in range(3):
                x = torch.randn(1, GRID.tokens, HEADS * D, generator=g)
                for kind, k in (("self", x), ("cross_text", torch.randn(1, TEXT, HEADS * D, generator=g))):
                    rec.tap(AttentionCall(b, kind, step, sigma, ("cond",), GRID, HEADS), x, k, lambda: x)
        rec.end_pass(output_fingerprint=f"out-{n}")
        held.append(sum(t.nbytes() for t in rec.takes))
    one = rec.latest.nbytes()
    assert one > 0 and 2 * one < plan.memory_budget_bytes < 10 * one  # the budget holds a few recordings, not ten
    assert max(held) <= plan.memory_budget_bytes
    assert len(rec.takes) < 10 and rec.find("out-9") is rec.latest and rec.find("out-0") is None
    assert "out-0" in rec.released


def test_read_path_outside_the_output_folder_says_read(tmp_path):
    from wan_capture.recording.confine import OutsideRoot, confined
    with pytest.raises(OutsideRoot, match="refusing to read"):
        confined(str(tmp_path), "..", "elsewhere", purpose="read")


# -- manifest: a restarted batch recognises its jobs, not just their video ids ------------------------------------
def test_manifest_keys_on_the_job_so_changed_jobs_run_again(tmp_path):
    from wan_capture.batch.runner import Manifest, job_key, pending, plan_jobs
    workflow = {"1": {"class_type": "WanSaveAttentionMaps", "inputs": {}}}
    first = plan_jobs(["a [red|blue] car"], [1, 2])
    manifest = Manifest(str(tmp_path), "study")
    for j in first:
        manifest.record(j.video_id, status="done", job={}, key=job_key(j, workflow))
    again = Manifest(str(tmp_path), "study")
    assert pending(first, workflow, again, "study") == []  # the same batch resumes with nothing to do
    changed = plan_jobs(["a [green|blue] bike"], [1, 2])  # same video ids, other prompts
    assert [j.video_id for j in changed] == [j.video_id for j in first]
    assert pending(changed, workflow, again, "study") == changed
    reseeded = plan_jobs(["a [red|blue] car"], [7, 2])
    assert [j.seed for j in pending(reseeded, workflow, again, "study")] == [7, 7]
    other_workflow = {"1": {"class_type": "WanSaveAttentionMaps", "inputs": {"compress": True}}}
    assert len(pending(first, other_workflow, again, "study")) == 4
    # a complete recording on disk counts only for the same prompt and seed
    out = tmp_path / "out" / "study" / "attention_maps" / first[0].video_id
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"status": "complete", "prompt": "a red car",
                                                  "prompt_weighted": first[0].prompt, "seed": 1}))
    fresh = Manifest(str(tmp_path / "state2"), "study")
    assert first[0] not in pending(first, workflow, fresh, "study", str(tmp_path / "out"))
    assert changed[0] in pending(changed, workflow, fresh, "study", str(tmp_path / "out"))
