"""ViPO's Perceptual Structuring Module: patch features → perceptual maps on the latent grid.

Ni et al., "Seeing What Matters: Visual Preference Policy Optimization for Visual Generation"
(arXiv 2511.18719). Given backbone patch features ``F ∈ R^{h×w×D}`` of a decoded image, the map is

1. PCA per image (centred): projections ``z_j = (F − F̄) v_j`` on the top-K principal directions
   ``v_j`` with explained-variance ratios ``λ_j = σ_j² / Σ_i σ_i²``;
2. each projection oriented by a sign rule and min-max mapped, ``z'_j = (s_j z_j − min) / (max − min)``;
3. aggregated, ``S = clip(Σ_j λ_j z'_j, 0, 1)`` (or the mean, the first component, or all ones);
4. Gaussian-smoothed (σ in patches), min-max to [0, 1], resized (bilinear, antialiased) to the latent
   grid, min-max again (or rescaled to mean 1).

Video: the same per frame, then resampled along time to the latent frame count, a temporal Gaussian,
and a min-max over the whole ``(T, H, W)`` volume.

``variant="released"`` reproduces the authors' released map instead (see :func:`released_frame_maps`): the
sign of scikit-learn's PCA, ``+1e-8`` min-max denominators, ``scipy.ndimage.gaussian_filter`` semantics,
and for video a trilinear (``align_corners=False``) time resampling. Our defaults deviate on purpose:
the ``border`` sign rule does not depend on the solver's sign (the released map comes out inverted when
the SVD's sign puts the subject on the positive side), and the time resampling aligns the end frames as
causal video VAEs do.

Everything is batched over the batch (and frames) on the features' device: no Python loop over images,
no host synchronisation. A sample whose features are not all finite gets an all-ones map, and the
top-level functions return a boolean mask of those samples so that the caller can count and warn.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .advantages import group_advantages
from .policy_loss import clipped_policy_loss
from .validation import check_choice

Aggregation = Literal["weighted", "average", "first_pc", "ones"]
SignRule = Literal["border", "skew", "reference"]
Normalization = Literal["minmax", "mean_one"]

Variant = Literal["default", "released"]

AGGREGATIONS: tuple[str, ...] = ("weighted", "average", "first_pc", "ones")
SIGN_RULES: tuple[str, ...] = ("border", "skew", "reference")
NORMALIZATIONS: tuple[str, ...] = ("minmax", "mean_one")
VARIANTS: tuple[str, ...] = ("default", "released")

# The released code's guard in every min-max denominator: ``(x − min) / (max − min + 1e-8)``.
_RELEASED_EPS = 1e-8
# scipy.ndimage.gaussian_filter's default kernel radius, in standard deviations.
_SCIPY_TRUNCATE = 4.0

# Relative size (in units of the projection's standard deviation) below which a sign statistic is
# treated as a tie and the next rule decides. Symmetric in ``z ↔ −z``, so sign invariance is kept.
_SIGN_TIE_TOL = 1e-3


def as_pair(size: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``size`` as ``(height, width)``: an int is square; anything else must be two positive ints (the error
    names the argument ``name``)."""
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size!r}.")
    return size  # type: ignore[return-value]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def finite_mask(features: torch.Tensor) -> torch.Tensor:
    """``True`` for the samples (leading dimension) whose features are all finite: shape ``(B,)``."""
    return torch.isfinite(features).flatten(1).all(dim=1)


# --------------------------------------------------------------------------------------------------
# Min-max and normalization
# --------------------------------------------------------------------------------------------------


def minmax_normalize(x: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """Min-max each sample to [0, 1] over the dimensions from ``start_dim`` on.

    ``x' = (x − min x) / (max x − min x)``. A (numerically) constant sample, one whose range is at most
    ``64·eps·max|x|`` of its dtype, becomes all ones rather than NaN or amplified rounding noise.
    """
    flat = x.flatten(start_dim)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    rng = hi - lo
    tol = 64 * torch.finfo(x.dtype).eps * torch.maximum(hi.abs(), lo.abs())
    constant = rng <= tol
    out = torch.where(constant, torch.ones_like(flat), (flat - lo) / torch.where(constant, 1, rng))
    return out.view_as(x)


def mean_one_normalize(x: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """Rescale each non-negative sample to mean 1: ``x' = x / mean(x)``; an all-zero sample becomes ones."""
    flat = x.flatten(start_dim)
    mean = flat.mean(dim=-1, keepdim=True)
    zero = mean <= torch.finfo(x.dtype).tiny
    out = torch.where(zero, torch.ones_like(flat), flat / torch.where(zero, 1, mean))
    return out.view_as(x)


def normalize_map(
    x: torch.Tensor, normalization: Normalization = "minmax", start_dim: int = 1
) -> torch.Tensor:
    """Final normalization of a map: ``"minmax"`` (the paper: range [0, 1]) or ``"mean_one"``.

    ``"mean_one"`` min-maxes first (so the map is non-negative with the paper's shape) and then divides by
    the mean, ``M' = M / mean(M)``, so that ``mean(A · M') = A`` and the average advantage is kept.
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    x = minmax_normalize(x, start_dim)
    return x if normalization == "minmax" else mean_one_normalize(x, start_dim)


# --------------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------------


def pca_projections(features: torch.Tensor, components: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched PCA of patch features, centred per image.

    With ``X ∈ R^{N×D}`` the centred features of one image (``N = h·w``), the projections on the top-K
    principal directions are ``Z = X V_K`` and the explained-variance ratios ``λ_j = e_j / Σ_i e_i``, where
    ``e`` are the eigenvalues of ``XᵀX``. The smaller of the two Gram matrices is decomposed with
    ``torch.linalg.eigh``: ``XᵀX = V E Vᵀ`` (D×D) when ``D ≤ N``, else ``XXᵀ = U E Uᵀ`` (N×N) and
    ``Z = U_K E_K^{1/2}`` (since ``X = U E^{1/2} Vᵀ``). The sign of each component is arbitrary; see
    :func:`orient_projections`.

    Args:
        features: ``(B, h, w, D)`` patch features.
        components: K; clamped to ``min(D, N)``.

    Returns:
        ``(projections (B, K, h, w), ratios (B, K))`` in float32 (float64 for float64 input).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, h, w, D), got shape {tuple(features.shape)}.")
    if components < 1:
        raise ValueError(f"components must be at least 1, got {components}.")
    b, h, w, d = features.shape
    n = h * w
    k = min(components, d, n)
    x = features.to(_work_dtype(features)).reshape(b, n, d)
    x = x - x.mean(dim=1, keepdim=True)
    if d <= n:
        evals, evecs = torch.linalg.eigh(x.transpose(1, 2) @ x)  # ascending
        top = evecs[..., -k:].flip(-1)  # (B, D, K), largest first
        proj = x @ top  # (B, N, K)
    else:
        evals, evecs = torch.linalg.eigh(x @ x.transpose(1, 2))
        top_vals = evals[..., -k:].flip(-1).clamp_min(0)
        proj = evecs[..., -k:].flip(-1) * top_vals.sqrt().unsqueeze(1)  # (B, N, K)
    evals = evals.clamp_min(0)
    total = evals.sum(dim=-1, keepdim=True)
    ratios = evals[..., -k:].flip(-1) / total.clamp_min(torch.finfo(evals.dtype).tiny)
    return proj.transpose(1, 2).reshape(b, k, h, w), ratios


# --------------------------------------------------------------------------------------------------
# Sign rule
# --------------------------------------------------------------------------------------------------


def _border_weights(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(h·w,)`` weights averaging over the outermost ring of patches (a mask, not indexing: no sync)."""
    mask = torch.zeros(h, w, dtype=dtype, device=device)
    mask[0, :] = mask[-1, :] = 1
    mask[:, 0] = mask[:, -1] = 1
    return (mask / mask.sum()).flatten()


def component_signs(projections: torch.Tensor, sign_rule: SignRule = "border") -> torch.Tensor:
    """Sign ``s_j ∈ {−1, +1}`` per component so that ``s_j z_j`` is high on the subject.

    ``"border"`` (default) uses two perceptual priors, in order:

    1. *Subjects sit away from the image border*: ``s = sign(mean(z) − mean_border(z))``, i.e. the ring
       of outermost patches, mostly background, is made low. This is the prior behind saliency methods'
       "boundary background" assumption, and it decides most generated images (centred subjects).
    2. Tie (``|mean(z) − mean_border(z)| < 10⁻³·std(z)``, e.g. a subject spanning the frame, or grids too
       small to have an interior): *subjects are smaller than the background*:
       ``s = sign(skewness(z))``, which makes the minority side of a bimodal projection high (the third
       moment of a two-cluster mixture points from the large cluster towards the small one).
    3. Tie again (a symmetric field, for which no sign can be preferred): ``s = +1``.

    Both statistics are odd in ``z`` (``stat(−z) = −stat(z)``, exactly also in floating point) and the
    tie tests are even, so ``s(−z)·(−z) = s(z)·z``: the oriented projection, hence the map, is the same
    whichever sign the eigen-decomposition returned. ``"skew"`` uses rule 2 then 3 only. ``"reference"``
    is the released code's ``s = −1`` ("more negative = subject"), which depends on the solver's sign.

    Args:
        projections: ``(B, K, h, w)``.
        sign_rule: ``"border"``, ``"skew"`` or ``"reference"``.

    Returns:
        ``(B, K)`` signs in the projections' dtype.
    """
    check_choice("sign_rule", sign_rule, SIGN_RULES)
    b, k, h, w = projections.shape
    ones = torch.ones(b, k, dtype=projections.dtype, device=projections.device)
    if sign_rule == "reference":
        return -ones
    z = projections.flatten(2)
    centred = z - z.mean(dim=-1, keepdim=True)
    std = centred.square().mean(dim=-1).sqrt()
    tol = _SIGN_TIE_TOL * std
    skew = centred.pow(3).mean(dim=-1) / std.clamp_min(torch.finfo(z.dtype).tiny).pow(2)  # in units of std
    signs = torch.where(skew.abs() > tol, torch.sign(skew), ones)
    if sign_rule == "border":
        border = _border_weights(h, w, z.dtype, z.device)
        interior_score = z.mean(dim=-1) - z @ border
        signs = torch.where(interior_score.abs() > tol, torch.sign(interior_score), signs)
    return signs


def orient_projections(projections: torch.Tensor, sign_rule: SignRule = "border") -> torch.Tensor:
    """Oriented, min-max mapped projections ``z'_j = (s_j z_j − min) / (max − min) ∈ [0, 1]``.

    With ``s_j = −1`` this is the reference ``z'_j = (max z_j − z_j) / (max z_j − min z_j)``. See
    :func:`component_signs` for ``s_j``. Input and output ``(B, K, h, w)``; constant components → ones.
    """
    signs = component_signs(projections, sign_rule)
    return minmax_normalize(projections * signs[..., None, None], start_dim=2)


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def aggregate_components(
    oriented: torch.Tensor, ratios: torch.Tensor, aggregation: Aggregation = "weighted"
) -> torch.Tensor:
    """Combine oriented components ``(B, K, h, w)`` into one map ``(B, h, w)``.

    ``"weighted"``: ``S = clip(Σ_j λ_j z'_j, 0, 1)``; ``"average"``: ``S = (1/K) Σ_j z'_j``;
    ``"first_pc"``: ``S = z'_1``; ``"ones"``: ``S = 1``.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if aggregation == "weighted":
        return (oriented * ratios[..., None, None]).sum(dim=1).clamp(0, 1)
    if aggregation == "average":
        return oriented.mean(dim=1)
    if aggregation == "first_pc":
        return oriented[:, 0]
    return torch.ones_like(oriented[:, 0])


# --------------------------------------------------------------------------------------------------
# Smoothing and resampling
# --------------------------------------------------------------------------------------------------


def gaussian_kernel1d(sigma: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalized kernel ``g(t) ∝ exp(−t² / 2σ²)`` for ``t = −r … r``, ``r = ⌈3σ⌉``."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _blur_last_dim(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Convolve the last dimension with a Gaussian, reflect padding (the kernel is cut to fit short axes)."""
    n = x.shape[-1]
    if sigma <= 0 or n < 2:
        return x
    kernel = gaussian_kernel1d(sigma, dtype=x.dtype, device=x.device)
    radius = kernel.numel() // 2
    if radius > n - 1:  # reflect padding needs pad < size
        kernel = kernel[radius - (n - 1) : radius + n]
        kernel = kernel / kernel.sum()
        radius = n - 1
    flat = x.reshape(-1, 1, n)
    flat = torch.nn.functional.pad(flat, (radius, radius), mode="reflect")
    return torch.nn.functional.conv1d(flat, kernel.view(1, 1, -1)).view_as(x)


def gaussian_blur2d(maps: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(..., h, w)`` maps, ``σ`` in patches, reflect padding.

    ``S ← g_σ ∗_w (g_σ ∗_h S)``; ``σ ≤ 0`` returns the input.
    """
    if sigma <= 0:
        return maps
    out = _blur_last_dim(maps, sigma)
    return _blur_last_dim(out.transpose(-1, -2), sigma).transpose(-1, -2).contiguous()


def resize_map(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of ``(B, h, w)`` maps to ``(B, H, W)`` (``align_corners=False``)."""
    size = as_pair(size, "size")
    if tuple(maps.shape[-2:]) == size:
        return maps
    x = maps.unsqueeze(1)
    # torch's CPU antialiased bilinear kernel returns wrong values along H when W is 1 in and out
    # (seen in torch 2.13); resizing the transposed map is exact and avoids it.
    transpose = maps.shape[-1] == 1 and size[1] == 1
    if transpose:
        x, size = x.transpose(-1, -2), size[::-1]
    out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (out.transpose(-1, -2) if transpose else out).squeeze(1)


def time_resampling_matrix(
    num_in: int, num_out: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """``(T, F)`` weights of linear, antialiased resampling with the end frames aligned.

    Output frame ``t`` sits at ``c_t = t·s`` input frames, ``s = (F − 1)/(T − 1)`` (``c_0 = 0`` when
    ``T = 1``), and takes ``w_tf ∝ max(0, 1 − |f − c_t| / max(s, 1))`` normalized over the frames that
    exist: plain linear interpolation when upsampling (``s ≤ 1``), a triangle filter as wide as the step
    when downsampling, so that frames between two latent frames are averaged rather than skipped.
    """
    scale = (num_in - 1) / (num_out - 1) if num_out > 1 else 0.0
    support = max(scale, 1.0)
    centres = torch.arange(num_out, dtype=dtype, device=device) * scale
    frames = torch.arange(num_in, dtype=dtype, device=device)
    weights = (1 - (frames[None, :] - centres[:, None]).abs() / support).clamp_min(0)
    return weights / weights.sum(dim=1, keepdim=True)


def resample_time(maps: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Resample ``(B, F, H, W)`` maps along time to ``(B, T, H, W)``: ``M_t = Σ_f w_tf M_f``.

    The first and last frames map onto the first and last latent frames, which is how causal video VAEs
    line frames up (Wan: frame ``4t`` ↔ latent frame ``t``); see :func:`time_resampling_matrix`. (Done with
    an explicit matrix: ``interpolate(antialias=True)`` does not honour ``align_corners``.)
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}.")
    if maps.shape[1] == num_frames:
        return maps
    weights = time_resampling_matrix(maps.shape[1], num_frames, dtype=maps.dtype, device=maps.device)
    return torch.einsum("tf,bfhw->bthw", weights, maps)


def gaussian_blur_time(maps: torch.Tensor, sigma: float = 0.3) -> torch.Tensor:
    """Gaussian smoothing of ``(B, T, H, W)`` maps along T (σ in frames, reflect padding)."""
    if sigma <= 0:
        return maps
    return _blur_last_dim(maps.movedim(1, -1), sigma).movedim(-1, 1).contiguous()


def pool_to_tokens(maps: torch.Tensor, patch_size: int = 2, *, flatten: bool = False) -> torch.Tensor:
    """Average-pool a map on the latent pixel grid onto a packed-token grid.

    ``M_tok(i, j) = mean_{a,b < p} M(p·i + a, p·j + b)`` (FLUX packs 2×2 latent patches into one token).
    Pooling keeps the mean (a ``"mean_one"`` map stays mean 1) and stays inside [0, 1].

    Args:
        maps: ``(B, H, W)`` or ``(B, T, H, W)``; H and W must be multiples of ``patch_size``.
        patch_size: p.
        flatten: return tokens in row-major order, ``(B, H/p · W/p)`` (``(B, T · H/p · W/p)`` for video),
            the order FLUX packs them in.
    """
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must be (B, H, W) or (B, T, H, W), got shape {tuple(maps.shape)}.")
    h, w = maps.shape[-2:]
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(
            f"cannot pool a {h}×{w} map into {patch_size}×{patch_size} tokens: the latent height and width "
            f"must be multiples of the patch size."
        )
    lead = maps.shape[:-2]
    pooled = torch.nn.functional.avg_pool2d(maps.reshape(-1, 1, h, w), patch_size)
    pooled = pooled.view(*lead, h // patch_size, w // patch_size)
    return pooled.flatten(1) if flatten else pooled


# --------------------------------------------------------------------------------------------------
# The released code's variant
# --------------------------------------------------------------------------------------------------


def released_minmax(x: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """The released min-max, ``x' = (x − min x) / (max x − min x + 10⁻⁸)``, per sample over the dimensions
    from ``start_dim`` on. A constant sample becomes zeros (where :func:`minmax_normalize` gives ones)."""
    flat = x.flatten(start_dim)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    return ((flat - lo) / (hi - lo + _RELEASED_EPS)).view_as(x)


def svd_flip_signs(features: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Signs ``(B, K)`` that orient each principal component as scikit-learn's ``PCA`` does (version ≥ 1.5).

    scikit-learn ≥ 1.5 calls ``svd_flip(U, Vᵀ, u_based_decision=False)`` for every solver: each component
    vector ``v_j`` is flipped so that its entry of largest magnitude is positive (the first such entry on a
    tie). ``v_j ∝ Xᵀ z_j`` with a positive factor (``X`` the centred features ``(N, D)``, ``z_j = X v_j``),
    so the sign is read from ``Xᵀ z_j``, whichever Gram matrix gave ``z_j``. (Before 1.5 scikit-learn
    decided on ``U``, the largest entry of ``z_j``; that older rule is not the one followed here.)

    Args:
        features: ``(B, h, w, D)`` patch features.
        projections: ``(B, K, h, w)`` from :func:`pca_projections`.
    """
    x = features.to(projections.dtype).flatten(1, 2)
    x = x - x.mean(dim=1, keepdim=True)
    directions = x.transpose(1, 2) @ projections.flatten(2).transpose(1, 2)  # (B, D, K)
    largest = directions.abs().argmax(dim=1, keepdim=True)
    return torch.sign(directions.gather(1, largest)).squeeze(1)


def _scipy_reflect_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices padding an axis of ``size`` by ``radius`` on both sides the way ``scipy.ndimage``'s
    ``mode="reflect"`` does (``d c b a | a b c d | d c b a``, the edge repeated), for any radius: the
    extended axis is periodic with period ``2·size``."""
    index = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(index < size, index, 2 * size - 1 - index)


def gaussian_filter1d_reflect(x: torch.Tensor, sigma: float, dim: int = -1) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter1d(x, sigma, axis=dim)`` with its defaults, in torch.

    Kernel ``g(t) ∝ exp(−t² / 2σ²)`` for ``t = −r … r``, ``r = int(4σ + 0.5)`` (``truncate=4``), normalized
    to sum 1; the axis is extended with ``mode="reflect"`` (:func:`_scipy_reflect_indices`). ``σ ≤ 0``
    returns the input.
    """
    if sigma <= 0:
        return x
    radius = int(_SCIPY_TRUNCATE * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    moved = x.movedim(dim, -1)
    size = moved.shape[-1]
    padded = moved.index_select(-1, _scipy_reflect_indices(size, radius, x.device))
    out = torch.nn.functional.conv1d(padded.reshape(-1, 1, size + 2 * radius), kernel.view(1, 1, -1))
    return out.view(moved.shape).movedim(-1, dim).contiguous()


def released_frame_maps(
    features: torch.Tensor,
    grid_size: tuple[int, int],
    components: int = 3,
    aggregation: Aggregation = "weighted",
    smoothing_sigma: float = 1.0,
) -> torch.Tensor:
    """The released per-image (per-frame) map for finite ``(B, h, w, D)`` features: ``(B, H, W)``.

    With ``m(x) = (x − min) / (max − min + 10⁻⁸)`` (:func:`released_minmax`):

    1. PCA (:func:`pca_projections`; ratios ``λ_j`` over all components), each component signed like
       scikit-learn (:func:`svd_flip_signs`);
    2. ``z'_j = (max z_j − z_j) / (max z_j − min z_j + 10⁻⁸)``: the more negative side is the subject;
    3. ``S = clip(Σ_j λ_j z'_j, 0, 1)`` (or another aggregation, :func:`aggregate_components`);
    4. ``M = m(resize(m(gaussian_filter(S, σ)), H×W))`` with ``scipy.ndimage.gaussian_filter`` semantics
       (:func:`gaussian_filter1d_reflect` on both axes) and the bilinear antialiased :func:`resize_map`.
    """
    projections, ratios = pca_projections(features, components)
    signs = svd_flip_signs(features, projections)
    oriented = released_minmax(-(projections * signs[..., None, None]), start_dim=2)
    maps = aggregate_components(oriented, ratios, aggregation)
    maps = gaussian_filter1d_reflect(
        gaussian_filter1d_reflect(maps, smoothing_sigma, -2), smoothing_sigma, -1
    )
    return released_minmax(resize_map(released_minmax(maps), grid_size))


def released_video_maps(
    frame_maps: torch.Tensor, num_frames: int, temporal_sigma: float = 0.3
) -> torch.Tensor:
    """The released temporal path: per-frame maps ``(B, F, H, W)`` → ``(B, T, H, W)``.

    Trilinear resampling with ``align_corners=False`` (latent frame ``t`` reads input frame
    ``(t + ½)·F/T − ½``, clamped to the ends), a temporal Gaussian along T with ``scipy.ndimage`` semantics
    (:func:`gaussian_filter1d_reflect`), and :func:`released_minmax` over the whole volume.
    """
    if frame_maps.shape[1] != num_frames:
        size = (num_frames, *frame_maps.shape[-2:])
        frame_maps = torch.nn.functional.interpolate(
            frame_maps.unsqueeze(1), size=size, mode="trilinear", align_corners=False
        ).squeeze(1)
    return released_minmax(gaussian_filter1d_reflect(frame_maps, temporal_sigma, dim=1))


# --------------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------------


def _patch_maps(
    features: torch.Tensor,
    grid_size: tuple[int, int],
    components: int,
    aggregation: Aggregation,
    smoothing_sigma: float,
    sign_rule: SignRule,
    variant: Variant = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1–4 up to the final normalization for ``(N, h, w, D)`` features: ``(N, H, W)`` maps in [0, 1]
    and the ``(N,)`` finite mask. Non-finite samples are zeroed before the PCA (so the decomposition never
    sees NaN) and replaced by ones afterwards. ``variant="released"``: :func:`released_frame_maps`."""
    finite = finite_mask(features)
    n = features.shape[0]
    dtype = _work_dtype(features)
    if aggregation == "ones":
        return torch.ones(n, *grid_size, dtype=dtype, device=features.device), finite
    features = torch.where(finite[:, None, None, None], features, torch.zeros_like(features))
    if variant == "released":
        maps = released_frame_maps(features, grid_size, components, aggregation, smoothing_sigma)
    else:
        projections, ratios = pca_projections(features, components)
        oriented = orient_projections(projections, sign_rule)
        maps = aggregate_components(oriented, ratios, aggregation)
        maps = minmax_normalize(gaussian_blur2d(maps, smoothing_sigma))
        maps = minmax_normalize(resize_map(maps, grid_size))
    maps = torch.where(finite[:, None, None], maps, torch.ones_like(maps))
    return maps, finite


def _final_normalization(
    maps: torch.Tensor, normalization: Normalization, variant: Variant, start_dim: int = 1
) -> torch.Tensor:
    """:func:`normalize_map`, except that a released map is already min-maxed the released way (only
    ``"mean_one"`` rescales it further)."""
    if variant == "released":
        return maps if normalization == "minmax" else mean_one_normalize(maps, start_dim)
    return normalize_map(maps, normalization, start_dim)


def _check_options(aggregation: str, sign_rule: str, normalization: str, variant: str) -> None:
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("sign_rule", sign_rule, SIGN_RULES)
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("variant", variant, VARIANTS)


def perceptual_map(
    features: torch.Tensor,
    grid_size: int | tuple[int, int],
    *,
    components: int = 3,
    aggregation: Aggregation = "weighted",
    smoothing_sigma: float = 1.0,
    sign_rule: SignRule = "border",
    normalization: Normalization = "minmax",
    variant: Variant = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perceptual map of each image on the latent grid.

    ``M = N(resize(minmax(g_σ ∗ clip(Σ_j λ_j z'_j, 0, 1)), H×W))`` with ``N`` the min-max (or mean-one)
    normalization, ``z'_j`` the oriented, min-max mapped PCA projections (:func:`orient_projections`).

    Args:
        features: ``(B, h, w, D)`` backbone patch features of the decoded images.
        grid_size: latent grid ``(H, W)`` (or one int for a square grid).
        components: PCA components K (the paper: 3).
        aggregation: ``"weighted"`` (the paper), ``"average"``, ``"first_pc"`` or ``"ones"``.
        smoothing_sigma: σ of the spatial Gaussian, in patches (``0`` disables it).
        sign_rule: ``"border"`` (sign-invariant, default), ``"skew"`` or ``"reference"``
            (see :func:`component_signs`).
        normalization: ``"minmax"`` (range [0, 1], the paper) or ``"mean_one"`` (mean 1).
        variant: ``"default"`` (this library's choices above) or ``"released"``, the authors' released map
            (:func:`released_frame_maps`; ``sign_rule`` is then scikit-learn's sign, more negative = subject).

    Returns:
        ``(maps, fallback)``: ``maps (B, H, W)`` in float32 (float64 for float64 features) on the features'
        device; ``fallback (B,)`` bool, ``True`` where the features were not finite and the map is all ones.
    """
    _check_options(aggregation, sign_rule, normalization, variant)
    if features.ndim != 4:
        raise ValueError(f"features must be (B, h, w, D), got shape {tuple(features.shape)}.")
    grid = as_pair(grid_size, "grid_size")
    maps, finite = _patch_maps(features, grid, components, aggregation, smoothing_sigma, sign_rule, variant)
    return _final_normalization(maps, normalization, variant), ~finite


def perceptual_video_map(
    features: torch.Tensor,
    grid_size: tuple[int, int, int],
    *,
    components: int = 3,
    aggregation: Aggregation = "weighted",
    smoothing_sigma: float = 1.0,
    temporal_sigma: float = 0.3,
    sign_rule: SignRule = "border",
    normalization: Normalization = "minmax",
    variant: Variant = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perceptual map of each video on the latent grid ``(T, H, W)``.

    Per frame ``f``: ``M_f`` as in :func:`perceptual_map` (PCA per frame) on the ``(H, W)`` grid, min-max;
    then ``M = N(g_τ ∗_t resample_T(M_f))``: linear antialiased resampling from F frames to the latent
    frame count T (:func:`resample_time`), a temporal Gaussian (``τ = temporal_sigma`` frames), and the
    normalization ``N`` over the whole ``(T, H, W)`` volume.

    Args:
        features: ``(B, F, h, w, D)`` patch features per decoded frame.
        grid_size: latent grid ``(T, H, W)``.
        components, aggregation, smoothing_sigma, sign_rule, normalization: as in :func:`perceptual_map`.
        temporal_sigma: σ of the temporal Gaussian, in latent frames (``0`` disables it).
        variant: ``"released"``: the released per-frame map and temporal path (:func:`released_video_maps`:
            trilinear ``align_corners=False`` resampling instead of our end-aligned one).

    Returns:
        ``(maps (B, T, H, W), fallback (B,))``; a video with any non-finite feature falls back to all ones.
    """
    _check_options(aggregation, sign_rule, normalization, variant)
    if features.ndim != 5:
        raise ValueError(f"features must be (B, F, h, w, D), got shape {tuple(features.shape)}.")
    if len(grid_size) != 3:
        raise ValueError(f"grid_size must be (T, H, W), got {grid_size!r}.")
    t = int(grid_size[0])
    grid = as_pair(tuple(grid_size[1:]), "grid_size[1:]")
    b, f = features.shape[:2]
    frame_maps, _ = _patch_maps(
        features.flatten(0, 1), grid, components, aggregation, smoothing_sigma, sign_rule, variant
    )
    frame_maps = frame_maps.view(b, f, *grid)
    return video_maps_from_frames(
        frame_maps, finite_mask(features), t, temporal_sigma, normalization, variant
    )


# --------------------------------------------------------------------------------------------------
# Controls and user maps
# --------------------------------------------------------------------------------------------------


def shuffle_maps(maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The maps moved to other samples of the batch: same masses, wrong places (a control for experiments).

    With ``π`` a random order of the ``B ≥ 2`` samples (``torch.randperm`` on ``generator``), sample ``π_k``
    gets the map of ``π_{k+1}`` (``π_B`` that of ``π_1``): a cyclic derangement, so no sample keeps its own map
    and every map is used once. ``B = 2`` swaps the two maps. A batch of one is returned unchanged.
    """
    b = maps.shape[0]
    if b < 2:
        return maps
    order = torch.randperm(b, generator=generator)
    source = torch.empty_like(order)
    source[order] = order.roll(-1)
    return maps[source.to(maps.device)]


def check_user_maps(raw: torch.Tensor, count: int) -> None:
    """Raise unless a ``map_fn``'s output is ``(count, h, w)`` and non-negative where finite."""
    if raw.ndim != 3 or raw.shape[0] != count:
        raise ValueError(
            f"map_fn must return one map per image, shape ({count}, h, w); got {tuple(raw.shape)}. For video it "
            "receives the frames (B·F, 3, H, W) and returns (B·F, h, w)."
        )
    if bool((torch.nan_to_num(raw, nan=0.0) < 0).any()):
        raise ValueError(
            "map_fn returned negative values: a ViPO map must be >= 0 (A(p) = M(p)·A must not flip the advantage's "
            "sign). Clamp or shift the map in map_fn."
        )


def function_frame_maps(raw: torch.Tensor, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """User maps ``(N, h, w)`` on the latent grid: ``M = resize(m)`` (bilinear, antialiased), and the ``(N,)``
    finite mask; a map with a non-finite value becomes all ones. No PCA, smoothing or min-max: the final
    normalization (:func:`normalize_map`) follows in :func:`function_map` / :func:`function_video_map`."""
    check_user_maps(raw, raw.shape[0])
    raw = raw.to(_work_dtype(raw))
    finite = finite_mask(raw)
    maps = resize_map(torch.where(finite[:, None, None], raw, torch.ones_like(raw)), grid_size)
    return maps, finite


def function_map(
    raw: torch.Tensor, grid_size: int | tuple[int, int], normalization: Normalization = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps from a user's ``map_fn`` (a segmenter, a saliency model, an oracle) in place of the PCA map.

    ``M = N(resize(m))`` for each map ``m ≥ 0`` ``(B, h, w)``, with ``N`` the min-max (or mean-one)
    normalization: a binary mask stays a binary mask; a constant map becomes all ones. Returns ``(maps (B, H,
    W), fallback (B,))`` as :func:`perceptual_map` does (non-finite maps fall back to ones).
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    maps, finite = function_frame_maps(raw, as_pair(grid_size, "grid_size"))
    maps = normalize_map(maps, normalization)
    return torch.where(finite[:, None, None], maps, torch.ones_like(maps)), ~finite


def video_maps_from_frames(
    frame_maps: torch.Tensor,
    finite: torch.Tensor,
    num_frames: int,
    temporal_sigma: float = 0.3,
    normalization: Normalization = "minmax",
    variant: Variant = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame maps ``(B, F, H, W)`` on the latent grid → ``(B, T, H, W)``: resampled along time, a temporal
    Gaussian, the final normalization over each volume (the ``variant``'s way); a video with a non-finite
    frame (``finite (B,)`` False) falls back to all ones. Returns ``(maps, fallback (B,))``."""
    if variant == "released":
        maps = released_video_maps(frame_maps, num_frames, temporal_sigma)
    else:
        maps = gaussian_blur_time(resample_time(frame_maps, num_frames), temporal_sigma)
    maps = _final_normalization(maps, normalization, variant)
    return torch.where(finite[:, None, None, None], maps, torch.ones_like(maps)), ~finite


def function_video_map(
    raw: torch.Tensor,
    grid_size: tuple[int, int, int],
    *,
    temporal_sigma: float = 0.3,
    normalization: Normalization = "minmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of videos from a user's per-frame maps ``(B, F, h, w)``: each frame resized to the latent grid
    (:func:`function_frame_maps`), then the video path of :func:`perceptual_video_map` (time resampling to T,
    temporal Gaussian, normalization over the volume). Returns ``(maps (B, T, H, W), fallback (B,))``."""
    check_choice("normalization", normalization, NORMALIZATIONS)
    if raw.ndim != 4 or len(grid_size) != 3:
        raise ValueError(
            f"raw maps must be (B, F, h, w) and grid_size (T, H, W); got {tuple(raw.shape)}, {grid_size}."
        )
    b, f = raw.shape[:2]
    frame_maps, finite = function_frame_maps(
        raw.flatten(0, 1), as_pair(tuple(grid_size[1:]), "grid_size[1:]")
    )
    finite = finite.view(b, f).all(dim=1)
    return video_maps_from_frames(
        frame_maps.view(b, f, *frame_maps.shape[-2:]),
        finite,
        int(grid_size[0]),
        temporal_sigma,
        normalization,
    )


def dense_policy_loss(
    log_ratio: torch.Tensor, advantage_maps: torch.Tensor, epsilon: float, epsilon_high: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViPO's clipped objective with one policy ratio per latent position, averaged over positions.

    With ``log_ratio`` the per-element ``log p_θ − log p_old`` viewed as ``(B, C, *grid)`` and
    ``A(p) = M(p) · A`` the advantage map ``(B, *grid)``:

    ``ρ_p = exp(Σ_c (log p_θ − log p_old)_{c,p})``,
    ``L = (1/P) Σ_p max(−A(p) ρ_p, −A(p) clip(ρ_p, 1 − ε, 1 + ε_high))`` (``ε_high = ε`` unless given).

    ``ρ_p`` is the ratio of the joint Gaussian density of the C channels at position ``p``. Returns the
    loss ``(B,)`` and the fraction of each sample's positions where the clipped term is active ``(B,)``.
    """
    if log_ratio.shape[:1] + log_ratio.shape[2:] != advantage_maps.shape:
        raise ValueError(
            f"log-ratio grid {tuple(log_ratio.shape)} (B, C, *grid) does not match the advantage maps "
            f"{tuple(advantage_maps.shape)} (B, *grid)."
        )
    loss, clipped = clipped_policy_loss(log_ratio.sum(dim=1), advantage_maps, epsilon, epsilon_high)
    return loss.flatten(1).mean(dim=1), clipped.flatten(1).float().mean(dim=1)


def spread_advantages(advantages: torch.Tensor, maps: torch.Tensor, clip: float | None = 5.0) -> torch.Tensor:
    """ViPO's advantage maps ``A(p) = clamp(M(p) · A, ±clip)`` from per-sample advantages ``A`` ``(B,)`` and maps
    ``M`` ``(B, *grid)`` (or per-sample map means ``(B,)``, the ``dense_level="sample"`` form ``A · mean(M)``).

    The clamp is applied again after the maps, per position, as the released code does: a ``"mean_one"`` map
    peaks at 3–5, so without it ``|A(p)|`` would reach ~15 where ``|A| ≤ clip`` was meant.
    """
    shaped = advantages.view(-1, *[1] * (maps.ndim - 1)) * maps.to(advantages)
    return shaped if clip is None else shaped.clamp(-clip, clip)


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``(3, H, W)`` image blended with a jet-coloured map ``(h, w)``: with ``m`` the map scaled to its maximum and
    upsampled (bilinear), ``colour_c = clamp(1.5 − |4 (m − c)|, 0, 1)`` for centres ``c`` = 0.75 (red), 0.5
    (green), 0.25 (blue), and ``out = (1 − α) · image + α · colour``."""
    m = heat.float() / heat.float().max().clamp_min(1e-8)
    m = torch.nn.functional.interpolate(m[None, None], size=image.shape[-2:], mode="bilinear")[0, 0]
    centres = torch.tensor([0.75, 0.5, 0.25], device=m.device)[:, None, None]  # red, green, blue
    colour = (1.5 - (4 * (m[None] - centres)).abs()).clamp(0, 1)
    return (1 - alpha) * image.float().clamp(0, 1) + alpha * colour.to(image.device)


def reward_map_advantages(
    rewards: torch.Tensor,
    maps: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    clip: float | None = 5.0,
) -> torch.Tensor:
    """The paper's ``map_target="reward"`` ablation: ``R_i(p) = M_i(p) · R_i``, then GRPO advantages at
    each position, ``A_i(p) = (R_i(p) − mean_j R_j(p)) / (std_j R_j(p) + 1e-4)`` over the group ``j``.

    ``rewards`` ``(B,)`` and ``maps`` ``(B, *grid)`` hold whole groups (B = N·G, groups consecutive);
    ``scale_rewards`` and ``clip`` as in :func:`trl_visual.core.advantages.group_advantages` (``"batch"``
    takes the std over every sample and position). Returns ``(B, *grid)``.
    """
    flat = maps.flatten(1) if maps.ndim > 1 else maps[:, None]
    reward_maps = rewards[:, None].to(flat) * flat  # (B, P)
    per_position = reward_maps.T.reshape(-1)  # P rows of B: every G consecutive values are one group
    advantages = group_advantages(per_position, num_generations, scale_rewards, clip=clip)
    return advantages.view(flat.shape[1], -1).T.reshape(maps.shape)


def per_reward_advantages(
    rewards_per_func: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    clip: float | None = 5.0,
) -> torch.Tensor:
    """``(B, F)`` group-relative advantages of each reward function on its own: column ``f`` is
    ``A_f = (R_f − R̄_f,group) / (std + 1e-4)``, clamped (:func:`~trl_visual.core.advantages.group_advantages`)."""
    columns = rewards_per_func.unbind(dim=1)
    return torch.stack(
        [group_advantages(r, num_generations, scale_rewards, clip=clip) for r in columns], dim=1
    )
