"""Pixel checks of the renderers: colours, hot spots in the right frame and place, normalisation, labels."""
import numpy as np
import pytest

from wan_capture.views.colormaps import COLORMAPS, apply_colormap
from wan_capture.views.render import labelled_grid, legend, matrix_plot, normalize, value_ranges
from wan_capture.views.maps import video_frames

META = {"latent_grid": [3, 15, 26], "map_grid": [3, 15, 26], "model": {"vae_stride": [4, 8, 8], "patch_size": [1, 2, 2]}}


def hex_rgb(h):
    return np.array([int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)])


def test_colormap_endpoints_and_shapes():
    np.testing.assert_allclose(apply_colormap(np.array([0.0, 1.0]), "viridis"), [hex_rgb("440154"), hex_rgb("fde725")], atol=1e-6)
    np.testing.assert_allclose(apply_colormap(np.array([1.0]), "inferno")[0], hex_rgb("fcffa4"), atol=1e-6)
    np.testing.assert_allclose(apply_colormap(np.array([0.0, 1.0]), "gray"), [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(apply_colormap(np.array([0.5]), "jet")[0], [0.5, 1.0, 0.5])
    turbo = apply_colormap(np.linspace(0, 1, 5), "turbo")
    assert turbo[1, 2] > turbo[1, 0] and turbo[-1, 0] > turbo[-1, 2]  # blue low end, red high end
    for name in COLORMAPS:
        out = apply_colormap(np.random.rand(4, 5), name)
        assert out.shape == (4, 5, 3) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        apply_colormap(np.zeros(2), "nope")


def test_normalisation_modes_give_documented_ranges():
    maps = np.stack([np.stack([np.full((2, 2), v) + np.array([[0, 1], [0, 0]]) for v in (0.0, 10.0)]),
                     np.stack([np.full((2, 2), v) + np.array([[0, 1], [0, 0]]) for v in (100.0, 200.0)])])  # [2, 2, 2, 2]
    pf = value_ranges(maps, "per_frame")
    np.testing.assert_array_equal(pf[0, 1], [10, 11])
    pv = value_ranges(maps, "per_video")
    np.testing.assert_array_equal(pv[1, 0], [100, 201]) and np.testing.assert_array_equal(pv[1, 1], [100, 201])
    np.testing.assert_array_equal(value_ranges(maps, "shared")[0, 0], [0, 201])
    np.testing.assert_array_equal(value_ranges(maps, "fixed", 5, 50)[1, 1], [5, 50])
    pc = value_ranges(maps, "percentile", p_low=25, p_high=75)[0, 0]
    np.testing.assert_allclose(pc, np.percentile(maps, [25, 75]))
    normed = normalize(maps, value_ranges(maps, "fixed", 5, 50))
    assert normed[0, 0].max() == 0 and normed[1, 0].min() == 1  # clipped below and above
    n = normalize(maps, pf)
    assert n.min() == 0 and n.max() == 1 and np.allclose(n.max(axis=(2, 3)), 1)
    with pytest.raises(ValueError, match="vmax > vmin"):
        value_ranges(maps, "fixed", 1, 1)


@pytest.mark.parametrize("latent_frames,pixel_frames", [(1, 1), (2, 5), (21, 81)])
def test_hot_spot_lands_in_the_right_frames_and_pixels(latent_frames, pixel_frames):
    meta = {**META, "latent_grid": [latent_frames, 15, 26], "map_grid": [latent_frames, 15, 26]}
    maps = np.zeros((1, latent_frames, 15, 26))
    t = latent_frames - 1
    maps[0, t, 7, 20] = 1.0
    out = video_frames(maps, meta, None, "viridis", "shared", alpha=1.0, show_legend=False)
    assert out.shape == (pixel_frames, 240, 416, 3)
    hot, cold = apply_colormap(np.array([1.0]), "viridis")[0], apply_colormap(np.array([0.0]), "viridis")[0]
    expected = [0] if t == 0 else list(range(4 * t - 3, 4 * t + 1))
    lit = [f for f in range(pixel_frames) if np.abs(out[f] - cold).sum(-1).max() > 0.1]
    assert lit == expected
    f = expected[0]
    np.testing.assert_allclose(out[f, 7 * 16 + 8, 20 * 16 + 8], hot, atol=0.02)  # the cell's centre: full heat
    np.testing.assert_allclose(out[f, 0, 0], cold, atol=1e-6)


def test_overlay_blends_over_images_with_alpha_and_legend_strip():
    maps = np.zeros((1, 2, 15, 26))
    maps[0, 1] = 1.0
    images = np.full((5, 240, 416, 3), 0.2, dtype=np.float32)
    out = video_frames(maps, META | {"latent_grid": [2, 15, 26], "map_grid": [2, 15, 26]}, images, "gray",
                       "shared", alpha=0.5, show_legend=True)
    assert out.shape[0] == 5 and out.shape[1] > 240 and out.shape[2] == 416
    np.testing.assert_allclose(out[0, 100, 100], [0.1, 0.1, 0.1], atol=1e-6)  # 0.5 * 0.2 + 0.5 * black
    np.testing.assert_allclose(out[3, 100, 100], [0.6, 0.6, 0.6], atol=1e-6)  # 0.5 * 0.2 + 0.5 * white
    strip = out[0, 240:]
    assert strip[:4, :, 0].std() > 0.1  # the gradient bar
    assert (strip[8:].min(axis=-1) < 0.3).any()  # the range numbers are written


def test_labels_render_as_ink():
    cell = np.ones((20, 20, 3), dtype=np.float32)
    with_labels = labelled_grid([[cell, cell]], ["flower"], ["step 0", "step 1"], title="tokens x steps")
    bare = labelled_grid([[cell, cell]], [""], ["", ""])
    assert with_labels.shape[1] > bare.shape[1]
    label_area = with_labels[:, : with_labels.shape[1] - 2 * 24]
    assert (label_area.min(axis=-1) < 0.4).sum() > 20
    assert (bare.min(axis=-1) < 0.4).sum() == 0


def test_matrix_plot_has_axes_and_colorbar():
    m = np.arange(12.0).reshape(3, 4)
    img = matrix_plot(m, "viridis", 0.0, 11.0, "key token", "query token", "window", [(0, "f0")], [(0, "f0")])
    assert img.ndim == 3 and (img.min(axis=-1) < 0.3).sum() > 50
    lg = legend(200, 0.0, 0.5, "magma")
    np.testing.assert_allclose(lg[0, 0], hex_rgb("000004"), atol=0.01)
    np.testing.assert_allclose(lg[0, -1], hex_rgb("fcfdbf"), atol=0.01)
