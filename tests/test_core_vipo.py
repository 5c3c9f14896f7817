"""Tests for ViPO's Perceptual Structuring Module (trl_visual/core/vipo.py)."""

import pytest
import torch

from trl_visual.core import vipo


def _square_field(batch=3, h=16, w=16, d=8, square=(4, 9, 6, 12), seed=0, noise=0.1, strength=3.0):
    """Features whose first principal direction separates a square (the subject) from the background.

    Returns the features, the unit direction and a boolean (h, w) mask of the square."""
    g = torch.Generator().manual_seed(seed)
    features = noise * torch.randn(batch, h, w, d, generator=g)
    direction = torch.randn(d, generator=g)
    direction = direction / direction.norm()
    r0, r1, c0, c1 = square
    features[:, r0:r1, c0:c1] += strength * direction
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return features, direction, mask


def _reflect(features, direction):
    """Negate the features' component along ``direction``: ``F (I − 2 v vᵀ)``."""
    d = direction.numel()
    return features @ (torch.eye(d) - 2 * torch.outer(direction, direction))


# ----------------------------------------------------------------------------------------- PCA


def test_pca_matches_svd_on_both_paths():
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 6, 5, 4), (2, 3, 3, 20)]:  # D ≤ N (covariance) and D > N (Gram)
        features = torch.randn(*shape, generator=g, dtype=torch.float64)
        proj, ratios = vipo.pca_projections(features, components=3)
        b, h, w, d = shape
        x = features.reshape(b, h * w, d)
        x = x - x.mean(1, keepdim=True)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        expected = (u[..., :3] * s[:, None, :3]).transpose(1, 2).reshape(b, 3, h, w)
        # Equal up to the sign of each component.
        signs = torch.sign((proj * expected).flatten(2).sum(-1))
        torch.testing.assert_close(proj, expected * signs[..., None, None])
        torch.testing.assert_close(ratios, s[:, :3] ** 2 / (s**2).sum(-1, keepdim=True))


def test_pca_clamps_components_and_casts_half_precision():
    features = torch.randn(2, 2, 2, 3).to(torch.bfloat16)
    proj, ratios = vipo.pca_projections(features, components=10)
    assert proj.shape == (2, 3, 2, 2) and ratios.shape == (2, 3)
    assert proj.dtype == torch.float32
    with pytest.raises(ValueError):
        vipo.pca_projections(features, components=0)


# ------------------------------------------------------------------------------------ sign rule


@pytest.mark.parametrize("rule", ["border", "skew"])
def test_square_is_the_subject(rule):
    features, _, mask = _square_field()
    maps, fallback = vipo.perceptual_map(features, (16, 16), sign_rule=rule, smoothing_sigma=0.5)
    assert not fallback.any()
    inside, outside = maps[:, mask], maps[:, ~mask]
    assert (inside.mean(1) > 0.6).all() and (outside.mean(1) < 0.25).all()
    # The maximum of every map is inside the square.
    argmax = maps.flatten(1).argmax(1)
    assert mask.flatten()[argmax].all()


def test_border_rule_uses_the_border_when_the_subject_is_the_majority():
    # The "subject" covers 64 % of the image but not its border: the border rule still makes it high,
    # while skewness alone (minority = subject) makes the border high.
    features, _, mask = _square_field(batch=1, h=10, w=10, square=(1, 9, 1, 9))
    border_map, _ = vipo.perceptual_map(features, (10, 10), sign_rule="border", smoothing_sigma=0)
    skew_map, _ = vipo.perceptual_map(features, (10, 10), sign_rule="skew", smoothing_sigma=0)
    assert border_map[0, mask].mean() > 0.8 > 0.2 > border_map[0, ~mask].mean()
    assert skew_map[0, mask].mean() < skew_map[0, ~mask].mean()


@pytest.mark.parametrize("rule", ["border", "skew"])
def test_orientation_is_exactly_sign_invariant(rule):
    g = torch.Generator().manual_seed(2)
    projections = torch.randn(4, 3, 7, 9, generator=g) ** 3  # skewed, arbitrary
    flip = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None]
    a = vipo.orient_projections(projections, rule)
    b = vipo.orient_projections(projections * flip, rule)
    assert torch.equal(a, b)


def test_reference_rule_maps_more_negative_to_one():
    z = torch.tensor([[[[-2.0, 0.0], [1.0, 2.0]]]])
    out = vipo.orient_projections(z, "reference")
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 0.5], [0.25, 0.0]]]]))


def _three_component_field(batch=2, h=16, w=14, d=8, seed=3):
    """A square along v1, a vertical ramp along v2 and a small off-centre blob along v3 (v orthonormal),
    plus weak noise: three components with well separated variances, so each is determined up to sign."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v1, v2, v3 = basis.T[:3]
    features = 0.05 * torch.randn(batch, h, w, d, generator=g, dtype=torch.float64)
    features[:, 4:10, 4:10] += 3.0 * v1
    features += torch.linspace(-1, 1, h, dtype=torch.float64)[:, None, None] * v2
    features[:, 11:14, 2:5] += 2.0 * v3
    return features.float(), (v1.float(), v2.float(), v3.float())


@pytest.mark.parametrize("aggregation", ["weighted", "average", "first_pc"])
@pytest.mark.parametrize("flip", [(0,), (1,), (2,), (0, 1, 2)])
def test_flipping_principal_directions_leaves_the_map_unchanged(aggregation, flip):
    features, directions = _three_component_field()
    flipped = features
    for j in flip:
        flipped = _reflect(flipped, directions[j])
    a, _ = vipo.perceptual_map(features, (24, 20), aggregation=aggregation)
    b, _ = vipo.perceptual_map(flipped, (24, 20), aggregation=aggregation)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_reference_rule_depends_on_the_sign():
    features, directions = _three_component_field()
    flipped = _reflect(features, directions[0])
    # The same flip that leaves the default map unchanged turns the reference map upside down.
    ra, _ = vipo.perceptual_map(features, (16, 14), aggregation="first_pc", sign_rule="reference")
    rb, _ = vipo.perceptual_map(flipped, (16, 14), aggregation="first_pc", sign_rule="reference")
    torch.testing.assert_close(ra, 1 - rb, atol=1e-5, rtol=0)
    assert (ra - rb).abs().max() > 0.9


def test_pca_sign_returned_by_the_solver_does_not_matter(monkeypatch):
    """Negate the eigenvectors the solver returns (what another LAPACK/cuSOLVER may do): same map."""
    features, _ = _three_component_field()
    a, _ = vipo.perceptual_map(features, (16, 14))
    eigh = torch.linalg.eigh

    def negated_eigh(matrix):
        values, vectors = eigh(matrix)
        return values, -vectors

    monkeypatch.setattr(torch.linalg, "eigh", negated_eigh)
    b, _ = vipo.perceptual_map(features, (16, 14))
    assert torch.equal(a, b)
    ra, _ = vipo.perceptual_map(features, (16, 14), sign_rule="reference")
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    rb, _ = vipo.perceptual_map(features, (16, 14), sign_rule="reference")
    assert not torch.allclose(ra, rb)


# ------------------------------------------------------------------------------------ aggregation


def test_aggregations_by_hand():
    oriented = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    ratios = torch.tensor([[0.75, 0.25]])
    torch.testing.assert_close(
        vipo.aggregate_components(oriented, ratios, "weighted"), torch.tensor([[[0.75, 0.25]]])
    )
    torch.testing.assert_close(
        vipo.aggregate_components(oriented, ratios, "average"), torch.tensor([[[0.5, 0.5]]])
    )
    torch.testing.assert_close(
        vipo.aggregate_components(oriented, ratios, "first_pc"), torch.tensor([[[1.0, 0.0]]])
    )
    torch.testing.assert_close(vipo.aggregate_components(oriented, ratios, "ones"), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="aggregation"):
        vipo.aggregate_components(oriented, ratios, "median")


def test_ones_aggregation_gives_ones():
    features, _, _ = _square_field(batch=2)
    maps, fallback = vipo.perceptual_map(features, (5, 7), aggregation="ones")
    assert torch.equal(maps, torch.ones(2, 5, 7)) and not fallback.any()


# ---------------------------------------------------------------------------- smoothing, resizing


def test_gaussian_blur_by_hand_and_mass_preserving():
    x = torch.zeros(1, 9, 9)
    x[0, 4, 4] = 1.0
    out = vipo.gaussian_blur2d(x, sigma=1.0)
    k = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    k = k / k.sum()
    torch.testing.assert_close(out[0, 4, 1:8], k * k[3])
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))  # reflect padding keeps an interior impulse
    torch.testing.assert_close(out, out.transpose(-1, -2))
    assert torch.equal(vipo.gaussian_blur2d(x, sigma=0), x)
    # Grids smaller than the kernel (reflect padding needs pad < size) still work.
    assert vipo.gaussian_blur2d(torch.rand(2, 2, 3), sigma=2.0).shape == (2, 2, 3)


def test_minmax_constant_map_is_ones_not_nan():
    x = torch.stack([torch.full((3, 3), 0.7), torch.arange(9.0).view(3, 3)])
    out = vipo.minmax_normalize(x)
    assert torch.equal(out[0], torch.ones(3, 3))
    assert out[1].min() == 0 and out[1].max() == 1
    # A constant map survives resizing as exactly ones (rounding noise is not blown up to [0, 1]).
    resized = vipo.minmax_normalize(vipo.resize_map(torch.full((1, 5, 5), 0.3), (13, 11)))
    assert torch.equal(resized, torch.ones(1, 13, 11))
    # Constant features end as all ones too (not NaN) and are not a fallback.
    maps, fallback = vipo.perceptual_map(torch.ones(1, 4, 4, 6), (8, 8))
    assert torch.equal(maps, torch.ones(1, 8, 8)) and not fallback.any()


@pytest.mark.parametrize("normalization", ["minmax", "mean_one"])
def test_map_range_and_shape(normalization):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(3, 9, 7, 12, generator=g)
    maps, fallback = vipo.perceptual_map(features, (20, 16), normalization=normalization)
    assert maps.shape == (3, 20, 16) and maps.dtype == torch.float32 and not fallback.any()
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    if normalization == "minmax":
        torch.testing.assert_close(maps.amin((1, 2)), torch.zeros(3))
        torch.testing.assert_close(maps.amax((1, 2)), torch.ones(3))
    else:
        torch.testing.assert_close(maps.mean((1, 2)), torch.ones(3))


def test_invalid_options_raise():
    features = torch.randn(1, 4, 4, 3)
    for kwargs in [{"sign_rule": "random"}, {"normalization": "softmax"}, {"aggregation": "max"}]:
        with pytest.raises(ValueError):
            vipo.perceptual_map(features, (4, 4), **kwargs)
    with pytest.raises(ValueError, match="B, h, w, D"):
        vipo.perceptual_map(torch.randn(4, 4, 3), (4, 4))


# ------------------------------------------------------------------------------------ batching, fallback


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(5, 8, 6, 10, generator=g)
    features[2] += 2 * (torch.arange(8.0)[:, None, None] > 4).float()  # a structured one among noise
    batched, _ = vipo.perceptual_map(features, (12, 9))
    single = torch.cat([vipo.perceptual_map(features[i : i + 1], (12, 9))[0] for i in range(5)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_non_finite_features_fall_back_to_ones_with_mask():
    features, _, mask = _square_field(batch=4)
    features[1, 0, 0, 0] = float("nan")
    features[3, 2, 5, 1] = float("inf")
    clean, _ = vipo.perceptual_map(features[[0, 2]], (16, 16))
    for normalization in ["minmax", "mean_one"]:
        maps, fallback = vipo.perceptual_map(features, (16, 16), normalization=normalization)
        assert fallback.tolist() == [False, True, False, True]
        assert torch.isfinite(maps).all()
        assert torch.equal(maps[1], torch.ones(16, 16)) and torch.equal(maps[3], torch.ones(16, 16))
    maps, _ = vipo.perceptual_map(features, (16, 16))
    # The healthy samples are untouched by their neighbours' NaNs.
    torch.testing.assert_close(maps[[0, 2]], clean)


# ---------------------------------------------------------------------------------------- video


def test_video_map_has_latent_frame_count_and_volume_minmax():
    features, _, mask = _square_field(batch=2 * 9, h=8, w=8, square=(2, 6, 2, 6))
    features = features.view(2, 9, 8, 8, -1)
    maps, fallback = vipo.perceptual_video_map(features, (3, 16, 16))
    assert maps.shape == (2, 3, 16, 16) and not fallback.any()
    torch.testing.assert_close(maps.amin((1, 2, 3)), torch.zeros(2))
    torch.testing.assert_close(maps.amax((1, 2, 3)), torch.ones(2))
    centre, corner = maps[:, :, 6:10, 6:10].mean(), maps[:, :, :2, :2].mean()
    assert centre > 0.8 > 0.2 > corner
    mean_one, _ = vipo.perceptual_video_map(features, (3, 16, 16), normalization="mean_one")
    torch.testing.assert_close(mean_one.mean((1, 2, 3)), torch.ones(2))


def test_video_frames_per_frame_and_fallback():
    g = torch.Generator().manual_seed(6)
    features = torch.randn(3, 5, 6, 6, 4, generator=g)
    features[1, 4, 0, 0, 0] = float("nan")
    maps, fallback = vipo.perceptual_video_map(features, (5, 6, 6), temporal_sigma=0)
    assert fallback.tolist() == [False, True, False]
    assert torch.equal(maps[1], torch.ones(5, 6, 6))
    # With no resampling and no temporal blur, a frame's map is the image map up to the volume min-max.
    frame_maps, _ = vipo.perceptual_map(features[0], (6, 6))
    torch.testing.assert_close(maps[0], vipo.minmax_normalize(frame_maps.unsqueeze(0))[0])


def test_resample_time_endpoints_and_average():
    frames = torch.arange(81.0).view(1, 81, 1, 1).expand(1, 81, 2, 3)  # a linear ramp, Wan's 81 → 21
    out = vipo.resample_time(frames, 21)
    assert out.shape == (1, 21, 2, 3)
    # Frame 4t lands on latent frame t; inside the clip the triangle filter keeps a ramp exact.
    torch.testing.assert_close(out[0, 1:-1, 0, 0], 4 * torch.arange(1.0, 20.0))
    # At the ends the filter is cut, so the first frame averages frames 0–3 with weights 4:3:2:1.
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(1.0))
    weights = vipo.time_resampling_matrix(9, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    torch.testing.assert_close(
        weights[1], torch.tensor([0, 0.0625, 0.125, 0.1875, 0.25, 0.1875, 0.125, 0.0625, 0])
    )
    # Upsampling is plain linear interpolation; one frame is repeated.
    up = vipo.resample_time(torch.tensor([0.0, 2.0]).view(1, 2, 1, 1), 3)
    torch.testing.assert_close(up.flatten(), torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(vipo.resample_time(frames[:, :1], 4), frames[:, :1].expand(1, 4, 2, 3))


def test_resize_map_with_single_column():
    ramp = torch.arange(4.0).view(1, 4, 1)
    out = vipo.resize_map(ramp, (2, 1))
    torch.testing.assert_close(out, vipo.resize_map(ramp.transpose(1, 2), (1, 2)).transpose(1, 2))
    assert out[0, 0, 0] < out[0, 1, 0]


def test_temporal_blur_by_hand():
    x = torch.zeros(1, 5, 1, 1)
    x[0, 2] = 1.0
    out = vipo.gaussian_blur_time(x, sigma=0.3)
    k = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0]) / 0.3) ** 2)
    k = k / k.sum()
    torch.testing.assert_close(out[0, 1:4, 0, 0], k)


# ----------------------------------------------------------------------------------- token pooling


def test_pool_to_tokens():
    maps = torch.arange(16.0).view(1, 4, 4)
    tokens = vipo.pool_to_tokens(maps, 2)
    torch.testing.assert_close(tokens, torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))
    torch.testing.assert_close(
        vipo.pool_to_tokens(maps, 2, flatten=True), torch.tensor([[2.5, 4.5, 10.5, 12.5]])
    )
    video = torch.rand(2, 3, 4, 6)
    assert vipo.pool_to_tokens(video, 2).shape == (2, 3, 2, 3)
    # Mean is kept: a mean-one map stays mean one on the token grid.
    features, _, _ = _square_field(batch=2)
    m, _ = vipo.perceptual_map(features, (8, 8), normalization="mean_one")
    torch.testing.assert_close(vipo.pool_to_tokens(m, 2).mean((1, 2)), torch.ones(2))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        vipo.pool_to_tokens(torch.rand(1, 5, 4), 2)


# ----------------------------------------------------------------------------- the released variant
def _released_reference_frame(features, grid, aggregation="weighted", sigma=1.0):
    """The released per-frame map, written independently with scikit-learn, scipy and PIL (float64 numpy)."""
    import numpy as np
    from PIL import Image
    from scipy.ndimage import gaussian_filter
    from sklearn.decomposition import PCA

    def minmax(x):
        return (x - x.min()) / (x.max() - x.min() + 1e-8)

    h, w, d = features.shape
    flat = features.reshape(h * w, d).astype(np.float64)
    pca = PCA(n_components=3).fit(flat)
    z = pca.transform(flat)
    oriented = [(z[:, j].max() - z[:, j]) / (z[:, j].max() - z[:, j].min() + 1e-8) for j in range(3)]
    if aggregation == "weighted":
        s = np.clip(sum(r * o for r, o in zip(pca.explained_variance_ratio_, oriented)), 0, 1)
    else:  # first_pc
        s = oriented[0]
    s = minmax(gaussian_filter(s.reshape(h, w), sigma))
    resized = Image.fromarray(s.astype(np.float32), mode="F").resize((grid[1], grid[0]), Image.BILINEAR)
    return minmax(np.asarray(resized, dtype=np.float64)), pca.components_


def _released_reference_video(features, grid, temporal_sigma=0.3):
    """Per-frame maps, then linear resampling along time at ``(t + ½)·F/T − ½`` (clamped), scipy's 1-D Gaussian,
    min-max over the volume."""
    import numpy as np
    from scipy.ndimage import gaussian_filter1d

    frames = np.stack([_released_reference_frame(f, grid[1:])[0] for f in features])
    num_in, num_out = frames.shape[0], grid[0]
    src = (np.arange(num_out) + 0.5) * num_in / num_out - 0.5
    resampled = np.apply_along_axis(lambda v: np.interp(src, np.arange(num_in), v), 0, frames)
    volume = gaussian_filter1d(resampled, temporal_sigma, axis=0)
    return (volume - volume.min()) / (volume.max() - volume.min() + 1e-8)


def _structured_features(generator, h, w, d):
    """Three blobs along random directions with distinct strengths, plus noise: PCA has clear gaps."""
    features = 0.3 * torch.randn(h, w, d, generator=generator)
    for strength in (3.0, 2.0, 1.2):
        r, c = (
            torch.randint(0, h - 2, (1,), generator=generator),
            torch.randint(0, w - 2, (1,), generator=generator),
        )
        size = 2 + int(torch.randint(0, 4, (1,), generator=generator))
        direction = torch.randn(d, generator=generator)
        features[r : r + size, c : c + size] += strength * direction / direction.norm()
    return features


def test_released_variant_matches_scikit_learn_and_scipy_on_images():
    """``variant="released"`` equals an independent scikit-learn PCA / scipy ``gaussian_filter`` / PIL resize
    implementation to 1e-4 on 20 random feature sets (latent grids larger and smaller than the patch grid, and
    D > N), including the sets where ``sign_rule="reference"`` (−1 on ``eigh``'s sign) inverts the map."""
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(0)
    inverted = 0
    for i in range(20):
        h, w = (int(v) for v in torch.randint(6, 13, (2,), generator=g))
        d = [8, 24, 200][i % 3]  # 200 > h·w: the N×N Gram branch of the PCA
        grid = [(16, 20), (4, 5), (h, w), (9, 7)][i % 4]
        aggregation = "first_pc" if i % 5 == 4 else "weighted"
        features = _structured_features(g, h, w, d)
        expected, _ = _released_reference_frame(features.numpy(), grid, aggregation)
        ours, fallback = vipo.perceptual_map(
            features[None], grid, aggregation=aggregation, variant="released"
        )
        assert not fallback.any()
        torch.testing.assert_close(ours[0].double(), torch.from_numpy(expected), atol=1e-4, rtol=0)
        reference, _ = vipo.perceptual_map(
            features[None], grid, aggregation=aggregation, sign_rule="reference"
        )
        inverted += int((reference - ours).abs().max() > 0.2)
    assert inverted >= 3  # the old `reference` rule disagreed with the released map on these sets


def test_svd_flip_signs_follow_scikit_learn_components():
    """The signs make each component vector's largest-magnitude entry positive, as ``PCA.components_``."""
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(1)
    for d in (8, 120):
        features = _structured_features(g, 9, 10, d)
        _, components = _released_reference_frame(features.numpy(), (9, 10))
        projections, _ = vipo.pca_projections(features[None], 3)
        signs = vipo.svd_flip_signs(features[None], projections)[0]
        x = features.flatten(0, 1).double()
        x = x - x.mean(dim=0)
        ours = (x.T @ (projections[0].flatten(1).double() * signs[:, None].double()).T).T
        ours = ours / ours.norm(dim=1, keepdim=True)
        torch.testing.assert_close(ours, torch.from_numpy(components), atol=1e-4, rtol=0)


def test_released_variant_matches_the_independent_video_path():
    """Video: released per-frame maps, trilinear ``align_corners=False`` time resampling and a σ = 0.3 scipy
    Gaussian match the independent implementation (up- and down-sampling in time)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(2)
    for frames, grid in [(5, (2, 8, 6)), (3, (5, 6, 6)), (9, (3, 10, 12))]:
        features = torch.stack([_structured_features(g, 8, 7, 16) for _ in range(frames)])
        expected = _released_reference_video(features.numpy(), grid)
        ours, _ = vipo.perceptual_video_map(features[None], grid, variant="released")
        torch.testing.assert_close(ours[0].double(), torch.from_numpy(expected), atol=1e-4, rtol=0)


def test_gaussian_filter1d_reflect_is_scipys_on_short_axes():
    """scipy's ``mode="reflect"`` repeats the edge and keeps reflecting when the kernel outgrows the axis."""
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for sigma in (0.3, 1.0, 2.5):
        for dim in (1, 2):
            expected = scipy_ndimage.gaussian_filter1d(x.numpy(), sigma, axis=dim)
            torch.testing.assert_close(
                vipo.gaussian_filter1d_reflect(x, sigma, dim), torch.from_numpy(expected)
            )


def test_released_variant_is_checked():
    with pytest.raises(ValueError, match="`variant` must be one of 'default', 'released'; got 'paper'"):
        vipo.perceptual_map(torch.randn(1, 4, 4, 6), (4, 4), variant="paper")


def test_spread_advantages_by_hand():
    """``A(p) = clamp(M(p) · A, ±clip)`` per position; a ``(B,)`` map (mean(M)) scales each sample's advantage."""
    advantages = torch.tensor([2.0, -3.0])
    maps = torch.tensor([[[0.5, 1.0], [4.0, 0.0]], [[1.0, 2.0], [0.25, 3.0]]])
    expected = torch.tensor([[[1.0, 2.0], [5.0, 0.0]], [[-3.0, -5.0], [-0.75, -5.0]]])
    torch.testing.assert_close(vipo.spread_advantages(advantages, maps, clip=5.0), expected)
    assert vipo.spread_advantages(advantages, maps, clip=None)[1, 1, 1].item() == -9.0
    torch.testing.assert_close(
        vipo.spread_advantages(advantages, torch.tensor([0.5, 2.0])), torch.tensor([1.0, -5.0])
    )


def test_heat_overlay_colours_by_hand():
    """Jet colours: the map's maximum is dark red, half of it green, zero dark blue; α blends with the image."""
    image = torch.full((3, 2, 2), 0.2)
    heat = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    coloured = vipo.heat_overlay(image, heat, alpha=1.0)
    torch.testing.assert_close(coloured[:, 0, 0], torch.tensor([0.5, 0.0, 0.0]))  # m = 1
    torch.testing.assert_close(coloured[:, 0, 1], torch.tensor([0.5, 1.0, 0.5]))  # m = 0.5
    torch.testing.assert_close(coloured[:, 1, 0], torch.tensor([0.0, 0.0, 0.5]))  # m = 0
    half = vipo.heat_overlay(image, heat, alpha=0.5)
    torch.testing.assert_close(half, 0.5 * image + 0.5 * coloured)
