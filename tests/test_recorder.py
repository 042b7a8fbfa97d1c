"""The recorder without ComfyUI: a hand-driven sampling loop over random q and k."""
import pytest
import torch

from reference import naive_probs, naive_scores
from wan_capture import (AttentionCall, BudgetError, FrameWindow, Grid, PlanError, Recorder, RecordingPlan,
                         branch_rows, parse_index_list, pool_spatial)
from fake_sampling import D, GRID, HEADS, MODEL, TEXT, heads_of, run
from wan_capture.capture.steps import continues, step_of


def test_per_block_per_head_against_naive():
    rec, seen = run(RecordingPlan(text_positions=(1, 7), negative_positions=(1, 7), storage_dtype="float32", branch="both", store_per_head=True))
    take = rec.latest
    assert take.status == "complete" and take.steps == [0, 1] and take.blocks == (0, 1, 2)
    for (s, b, kind), (x, k) in seen.items():
        if kind != "cross_text":
            continue
        p = naive_probs(naive_scores(heads_of(x), heads_of(k))[0])[..., [1, 7]]
        torch.testing.assert_close(take.cross[(s, "uncond")][0, b].double(), p[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(take.cross[(s, "cond")][0, b].double(), p[1], rtol=1e-5, atol=1e-6)


def test_aggregation_flags_reduce_exactly():
    full, _ = run(RecordingPlan(text_positions=(2,), record_sink_stats=True, storage_dtype="float32", store_per_head=True))
    agg, _ = run(RecordingPlan(text_positions=(2,), record_sink_stats=True, storage_dtype="float32",
                               store_per_block=False, store_per_head=False))
    f, a = full.latest, agg.latest
    torch.testing.assert_close(a.cross[(1, "cond")], f.cross[(1, "cond")].mean(dim=(1, 2), keepdim=True))
    for name in ("received", "frame_mass", "entropy"):
        torch.testing.assert_close(a.sink[(1, "cond")][name], f.sink[(1, "cond")][name].mean(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(a.sink[(1, "cond")]["key_max"], f.sink[(1, "cond")]["key_max"].amax(dim=(1, 2), keepdim=True))
    assert a.blocks == (-1,) and a.heads == (-1,)


def test_selection_of_blocks_heads_steps_branch_and_dtype():
    rec, _ = run(RecordingPlan(text_positions=(0,), blocks=(0, 2), heads=(1,), steps=(1,), branch="cond", store_per_head=True), steps=3)
    take = rec.latest
    assert take.steps == [1] and set(take.cross) == {(1, "cond")}
    assert take.cross[(1, "cond")].shape == (1, 2, 1, 24, 1) and take.cross[(1, "cond")].dtype == torch.float16


def test_downsampled_maps_are_pooled_means():
    full, _ = run(RecordingPlan(text_positions=(0, 1), storage_dtype="float32", store_per_head=True))
    down, _ = run(RecordingPlan(text_positions=(0, 1), storage_dtype="float32", spatial_downsample_factor=2, store_per_head=True))
    assert down.latest.map_grid == Grid(2, 2, 2)
    m = full.latest.cross[(0, "cond")]  # [1, 3, 3, 24, 2]
    grid = m.view(1, 3, 3, 2, 3, 4, 2)
    want_corner = grid[..., 2:3, 2:4, :].mean(dim=(4, 5))  # last row of cells: 1 row x 2 cols
    got = down.latest.cross[(0, "cond")].view(1, 3, 3, 2, 2, 2, 2)
    torch.testing.assert_close(got[..., 1, 1, :], want_corner)


def test_pool_spatial_uneven_edges():
    maps = torch.rand(1, 2 * 5 * 3, 1)
    g = Grid(2, 5, 3)
    out = pool_spatial(maps, g, 2).view(2, 3, 2)
    cells = maps.view(2, 5, 3)
    torch.testing.assert_close(out[1, 2, 1], cells[1, 4:5, 2:3].mean())
    torch.testing.assert_close(out[0, 0, 0], cells[0, 0:2, 0:2].mean())


def test_budget_refused_before_any_allocation():
    plan = RecordingPlan(text_positions=tuple(range(10)), record_sink_stats=True, window=FrameWindow(0, 2),
                         memory_budget_mb=0.001, store_per_head=True)
    rec = Recorder(plan)
    rec.begin_pass([1.0, 0.5, 0.0], MODEL)
    x = torch.randn(1, 24, HEADS * D)
    call = AttentionCall(0, "self", 0, 1.0, ("cond",), GRID, HEADS)
    with pytest.raises(BudgetError, match=r"recording 2 steps on a \[2, 3, 4\] latent grid .* needs"):
        rec.tap(call, x, x, lambda: x)
    assert not rec.active.collector.slots and not rec.active.store.arrays


def test_window_beyond_latent_frames_is_a_plan_error():
    rec = Recorder(RecordingPlan(record_cross=False, window=FrameWindow(5, 6), store_per_head=True))
    rec.begin_pass([1.0, 0.0], MODEL)
    x = torch.randn(1, 24, HEADS * D)
    with pytest.raises(PlanError, match="only 2 frames"):
        rec.tap(AttentionCall(0, "self", 0, 1.0, ("cond",), GRID, HEADS), x, x, lambda: x)


def test_between_step_and_repeated_evaluations_are_skipped():
    rec = Recorder(RecordingPlan(text_positions=(0,), store_per_head=True))
    rec.begin_pass([1.0, 0.5, 0.0], MODEL)
    x, ctx = torch.randn(1, 24, HEADS * D), torch.randn(1, TEXT, HEADS * D)
    assert rec.locate(0.75) == (0, False)
    call = AttentionCall(0, "cross_text", 0, 0.75, ("cond",), GRID, HEADS)
    rec.tap(call, x, ctx, lambda: x, exact_step=False)
    rec.tap(call, x, ctx, lambda: x)
    rec.tap(call, x, ctx, lambda: x)
    rec.end_pass("fp")
    assert rec.latest.skipped == {"evaluations_between_steps": 1, "repeated_evaluations": 1}


def test_passes_chain_only_when_they_continue():
    rec = Recorder(RecordingPlan(text_positions=(0,), store_per_head=True))
    rec.begin_pass([1.0, 0.7, 0.4], MODEL, input_fingerprint="a")
    rec.end_pass("b")
    rec.begin_pass([0.4, 0.2, 0.0], MODEL, input_fingerprint="b")
    assert rec.locate(0.2) == (3, True)
    rec.end_pass("c")
    assert len(rec.takes) == 1 and rec.find("c").total_steps == 4
    upto = rec.find("b")  # the first pass's output (A14B's first expert): the recording up to it, not the whole
    assert upto is not rec.find("c") and upto.total_steps == 2 and len(rec.takes) == 1
    rec.begin_pass([0.4, 0.2, 0.0], MODEL, input_fingerprint="not-c")
    rec.end_pass("d")
    assert len(rec.takes) == 2


def test_failed_pass_is_partial_and_never_matched():
    rec = Recorder(RecordingPlan(text_positions=(0,), store_per_head=True))
    rec.begin_pass([1.0, 0.0], MODEL)
    rec.end_pass("x", error=RuntimeError("out of memory"))
    assert rec.latest.status == "partial" and "out of memory" in rec.latest.error and rec.find("x") is None


def test_step_of_and_continues():
    sched = [14.6, 7.0, 3.1, 0.0]
    assert step_of(7.0, sched) == (1, True)
    assert step_of(5.0, sched) == (1, False)
    assert step_of(20.0, sched) == (None, False)
    assert continues([14.6, 7.0], [7.0, 3.1, 0.0]) and not continues([14.6, 0.0], [0.0, 0.0])


def test_branch_rows():
    assert branch_rows([1, 0], 4) == ("uncond", "uncond", "cond", "cond")
    with pytest.raises(ValueError, match="does not split"):
        branch_rows([0, 1], 3)


@pytest.mark.parametrize("kwargs,field", [
    (dict(), "text_positions"), (dict(text_positions=(1, 1)), "text_positions"),
    (dict(record_cross=False), "record_cross"), (dict(text_positions=(0,), storage_interval=0), "storage_interval"),
    (dict(text_positions=(0,), branch="neg"), "branch"), (dict(text_positions=(0,), storage_dtype="int8"), "storage_dtype"),
    (dict(text_positions=(0,), memory_budget_mb=0), "memory_budget_mb"), (dict(text_positions=(0,), blocks=()), "blocks"),
    (dict(text_positions=(0,), steps=(1,), storage_interval=2), "storage_interval"),
    (dict(text_positions=(0,), spatial_downsample_factor=0), "spatial_downsample_factor"),
])
def test_invalid_plans_name_the_field(kwargs, field):
    with pytest.raises(PlanError, match=f"RecordingPlan.{field}"):
        RecordingPlan(**kwargs)


def test_parse_index_list():
    assert parse_index_list("0, 2,5-7") == (0, 2, 5, 6, 7)
    assert parse_index_list("all") is None and parse_index_list("") is None
    with pytest.raises(PlanError, match="cannot read"):
        parse_index_list("3-x", "blocks")
    with pytest.raises(PlanError, match=r"heads \[3\] do not exist"):
        RecordingPlan(text_positions=(0,), heads=(3,), store_per_head=True).selected_heads(3)


def test_kernels_key_max_off_records_the_rest_identically_and_says_so(tmp_path):
    """record_key_max off (the cheaper sink statistics): the other statistics are the same arrays, no key_max is
    kept or saved, and asking for it says how it was recorded."""
    from wan_capture import AttentionAnalyzer, SaveOptions, save_take
    from wan_capture import NotRecorded
    from wan_capture.recording import FolderRecording
    full, _ = run(RecordingPlan(text_positions=(2,), record_sink_stats=True, storage_dtype="float32"))
    cheap, _ = run(RecordingPlan(text_positions=(2,), record_sink_stats=True, storage_dtype="float32",
                                 record_key_max=False))
    f, c = full.latest.sink[(1, "cond")], cheap.latest.sink[(1, "cond")]
    assert "key_max" in f and sorted(c) == ["entropy", "frame_mass", "received"]
    assert all(torch.equal(c[n], f[n]) for n in c)
    save_take(cheap.latest, str(tmp_path), "cheap", SaveOptions(storage_dtype="float32"))
    maps = str(tmp_path / "cheap" / "attention_maps")
    video = AttentionAnalyzer(maps).list_videos()[0]
    rec = FolderRecording.open(maps, video)
    assert torch.equal(torch.from_numpy(rec.sink(1, "received")), f["received"][0])
    with pytest.raises(NotRecorded, match="recorded with record_key_max off"):
        rec.sink(1, "key_max")
