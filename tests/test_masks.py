"""Attention masks: a known hot region comes back as the mask of every decoded frame, aligned in time like the
overlay; IoU and coverage against a reference."""
import numpy as np
import pytest

from wan_capture.grid import latent_frame_of
from wan_capture.views.masks import attention_masks, mask_scores, masks_on_video, otsu_threshold

META = {"latent_grid": [3, 4, 6], "map_grid": [3, 4, 6], "model": {"vae_stride": [4, 8, 8], "patch_size": [1, 2, 2]}}


def hot_maps(seed=0):
    """Latent frame t has a hot 2x2 block at column 2t (and a noisy cold background)."""
    rng = np.random.default_rng(seed)
    maps = rng.uniform(0.0, 0.1, size=(3, 4, 6))
    region = np.zeros((3, 4, 6), dtype=bool)
    for t in range(3):
        region[t, 1:3, 2 * t:2 * t + 2] = True
    maps[region] = rng.uniform(0.8, 1.0, size=region.sum())
    return maps, region


@pytest.mark.parametrize("method,value", [("threshold", 0.5), ("otsu", 0.0), ("top_percent", 100 * 4 / 24)])
def test_mask_of_a_known_hot_region_per_frame(method, value):
    maps, region = hot_maps()
    masks = attention_masks(maps, method, value)
    np.testing.assert_array_equal(masks, region)
    video = masks_on_video(masks, META)  # 9 decoded frames of 64 x 96
    assert video.shape == (9, 64, 96)
    for i in range(9):  # decoded frame i shows the latent frame that produced it: 0 | 1-4 | 5-8
        t = latent_frame_of(i, 3)
        want = np.repeat(np.repeat(region[t], 16, axis=0), 16, axis=1)
        np.testing.assert_array_equal(video[i], want)
    iou, coverage = mask_scores(video, video.copy())
    assert iou == 1.0 and coverage == 1.0


def test_mask_scores_and_sizes():
    maps, region = hot_maps()
    video = masks_on_video(attention_masks(maps, "otsu"), META, height=60, width=90, frames=9)
    assert video.shape == (9, 60, 90)  # the grid covers the video rounded up to whole cells: cropped
    ref = np.zeros_like(video)
    ref[:, 16:48, :16] = True  # half of frame 0's region is elsewhere
    iou, coverage = mask_scores(video, ref)
    inter = np.logical_and(video, ref).sum()
    assert iou == pytest.approx(inter / np.logical_or(video, ref).sum()) and coverage == pytest.approx(inter / ref.sum())
    with pytest.raises(ValueError, match="give a mask of the decoded video"):
        mask_scores(video, ref[:3])
    with pytest.raises(ValueError, match="fraction of each frame's maximum"):
        attention_masks(maps, "threshold", 2.0)
    x = np.array([0.0, 0.02, 0.01, 0.9, 1.0, 0.95])
    cut = otsu_threshold(x)
    assert 0.02 < cut <= 0.9 and list(x >= cut) == [False, False, False, True, True, True]
