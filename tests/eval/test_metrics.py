"""Metric math against closed forms and independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from stablexl.eval import metrics as M


def gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T


def random_cov(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def test_frechet_of_a_set_with_itself_is_zero_and_of_two_samples_of_one_gaussian_is_small():
    d = 4
    mu, cov = torch.zeros(d, dtype=torch.float64), random_cov(d, 0)
    x, y = gaussian(20000, mu, cov, 1), gaussian(20000, mu, cov, 2)
    assert abs(M.frechet_distance(x, x)) < 1e-9
    fd = M.frechet_distance(x, y)
    # the estimate's bias is ~2 tr(S)/n (means) plus a covariance term of the same order: ~1e-3 here
    assert 0 < fd < 0.01, fd
    assert M.frechet_distance(x, y) == pytest.approx(M.frechet_distance(y, x), rel=1e-9, abs=1e-12)


def test_frechet_of_shifted_means_is_the_squared_shift():
    d = 5
    cov = random_cov(d, 3)
    x = gaussian(5000, torch.zeros(d, dtype=torch.float64), cov, 4)
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    # same samples shifted: identical covariances, so exactly ||delta||^2 (14.25)
    assert M.frechet_distance(x, x + delta) == pytest.approx(14.25, abs=1e-8)
    # independent samples: up to sampling error
    y = gaussian(20000, delta, cov, 5)
    assert M.frechet_distance(gaussian(20000, torch.zeros(d, dtype=torch.float64), cov, 6), y) == pytest.approx(14.25, abs=0.15)


def test_frechet_of_diagonal_covariances_is_the_sum_of_squared_root_differences():
    a = torch.tensor([1.0, 4.0, 9.0, 0.25], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 9.0, 2.25], dtype=torch.float64)
    mu = torch.zeros(4, dtype=torch.float64)
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum())  # 1 + 1 + 0 + 1 = 3
    assert expected == pytest.approx(3.0)
    assert M.frechet_distance_from_stats(mu, torch.diag(a), mu, torch.diag(b)) == pytest.approx(expected, abs=1e-10)
    x, y = gaussian(40000, mu, torch.diag(a), 7), gaussian(40000, mu, torch.diag(b), 8)
    assert M.frechet_distance(x, y) == pytest.approx(expected, abs=0.1)


def test_frechet_trace_term_matches_the_eigenvalues_of_the_unsymmetrised_product():
    # Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1 S2)): S1 S2 is similar to a PSD matrix, so its eigenvalues are real
    # and non-negative. numpy's general (non-symmetric) eigensolver is an independent route.
    d = 6
    s1, s2 = random_cov(d, 9), random_cov(d, 10)
    mu1 = torch.arange(d, dtype=torch.float64) / 3
    mu2 = torch.zeros(d, dtype=torch.float64)
    ev = np.linalg.eigvals(s1.numpy() @ s2.numpy())
    assert np.abs(ev.imag).max() < 1e-9
    expected = float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2)) - 2 * np.sqrt(ev.real).sum()
    assert M.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    d = 8
    x, y = gaussian(300, torch.zeros(d, dtype=torch.float64), random_cov(d, 11), 12), \
        gaussian(200, torch.ones(d, dtype=torch.float64), random_cov(d, 13), 14)
    mu1, s1 = x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False)
    mu2, s2 = y.mean(0).numpy(), np.cov(y.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert M.frechet_distance(x, y) == pytest.approx(expected, rel=1e-7)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same D"):
        M.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        M.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# --------------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------------


def test_kid_equals_the_unbiased_mmd_written_out_as_sums():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    k = lambda a, b: (float(a @ b) / 3 + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert M.kernel_inception_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    d = 8
    mu, cov = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    x, y = gaussian(2000, mu, cov, 1), gaussian(2000, mu, cov, 2)
    same = M.kernel_inception_distance(x, y)
    near = M.kernel_inception_distance(x, gaussian(2000, mu + 0.25, cov, 3))
    far = M.kernel_inception_distance(x, gaussian(2000, mu + 1.0, cov, 4))
    assert abs(same) < 0.01, same
    assert 0.05 < near < far, (near, far)


# --------------------------------------------------------------------------------------------------
# CLIP score and retrieval
# --------------------------------------------------------------------------------------------------


def test_clip_score_is_100_cos_clipped_at_zero_per_pair():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    txt = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5 * 3**0.5]])  # cos 1, 0, -1, 0.5
    assert M.clip_score(img, txt) == pytest.approx((100 + 0 + 0 + 50) / 4)
    assert M.clip_score(img[1:3], txt[1:3]) == 0.0  # negative cosine counts as 0, not below
    with pytest.raises(ValueError):
        M.clip_score(img, txt[:2])


def test_retrieval_ranks_and_accuracy_on_a_constructed_case():
    # candidates are the basis vectors, so cos(image, candidate k) orders as the image's k-th component
    cands = torch.eye(12)
    imgs = torch.zeros(4, 12)
    imgs[0, 0] = 1  # own caption 0, most similar: rank 0
    imgs[1, :6] = torch.tensor([5.0, 4, 3, 2, 1, 0.5])  # own caption 3: three candidates are closer
    imgs[2, :11] = torch.arange(1.0, 12)  # own caption 11 at 0: all eleven others are closer
    imgs[3, :2] = 1  # own caption 1 ties with caption 0: ties count for the image
    targets = torch.tensor([0, 3, 11, 1])
    assert M.retrieval_ranks(imgs, cands, targets).tolist() == [0, 3, 11, 0]
    acc = M.retrieval_accuracy(imgs, cands, targets, ks=(1, 5))
    assert acc == {1: 0.5, 5: 0.75}


def test_retrieval_ranks_agree_with_sorting():
    g = torch.Generator().manual_seed(0)
    imgs, cands = torch.randn(30, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (30,), generator=g)
    sim = torch.nn.functional.normalize(imgs, dim=-1) @ torch.nn.functional.normalize(cands, dim=-1).T
    order = sim.argsort(dim=1, descending=True)
    expected = [int((order[i] == targets[i]).nonzero()) for i in range(30)]
    assert M.retrieval_ranks(imgs, cands, targets).tolist() == expected
    with pytest.raises(ValueError, match="indices"):
        M.retrieval_ranks(imgs, cands, torch.full((30,), 50))


# --------------------------------------------------------------------------------------------------
# Pixel metrics
# --------------------------------------------------------------------------------------------------


def square(color, size: int, box=None) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).rectangle(box or [size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=color)
    return im


def test_pixel_identity_finds_the_nearest_reference_across_sizes():
    refs = [square((220, 30, 30), 32), square((30, 170, 60), 32), square((40, 60, 220), 32)]
    names = ["red", "green", "blue"]
    noisy = np.clip(np.asarray(square((210, 40, 35), 64), dtype=np.int16)
                    + np.random.default_rng(0).integers(-20, 21, (64, 64, 3)), 0, 255).astype(np.uint8)
    gen = [Image.fromarray(noisy), square((45, 65, 210), 64), square((30, 170, 60), 64)]
    acc, nearest = M.pixel_identity(gen, ["red", "blue", "blue"], refs, names, size=16)
    assert nearest == ["red", "blue", "green"]
    assert acc == pytest.approx(2 / 3)


def test_sharpness_of_an_impulse_and_of_blur():
    im = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    im[..., 2, 2] = 1.0  # white impulse: Laplacian -4 at it, 1 at its 4 neighbours, valid 3x3 region
    assert float(M.sharpness(im)[0]) == pytest.approx(20 / 9)
    assert float(M.sharpness(torch.full((1, 3, 8, 8), 0.7))[0]) == 0.0
    img = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(img)
    for k in range(0, 64, 8):
        d.rectangle([k, 0, k + 3, 63], fill=(200, 20, 20))
    d.ellipse([16, 16, 48, 48], fill=(20, 20, 200))
    blurred = [img.filter(ImageFilter.GaussianBlur(r)) for r in (0.7, 1.5)]
    s = M.sharpness(M.images_to_tensor([img, *blurred])).tolist()
    assert s[0] > s[1] > s[2] > 0, s


def test_border_fraction_of_centred_and_cut_discs():
    centred = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(centred).ellipse([12, 12, 52, 52], fill=(0, 120, 0))
    cut = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(cut).ellipse([-20, 10, 20, 50], fill=(0, 120, 0))  # the left edge cuts it
    frame_only = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(frame_only).rectangle([0, 0, 63, 1], fill=(0, 0, 0))  # top 2 rows only
    blank = Image.new("RGB", (64, 64), "white")
    f = M.border_fraction(M.images_to_tensor([centred, cut, frame_only, blank]), frame=2).tolist()
    assert f[0] == 0.0
    assert 0.02 < f[1] < 0.5, f[1]
    assert f[2] == 1.0 and f[3] == 0.0
    # the threshold decides what counts as object: light grey is background at 240, object at 250
    grey = Image.new("RGB", (64, 64), (245, 245, 245))
    ImageDraw.Draw(grey).rectangle([20, 20, 40, 40], fill=(0, 0, 0))
    t = M.images_to_tensor([grey])
    assert float(M.border_fraction(t, 2, 240 / 255)[0]) == 0.0
    assert float(M.border_fraction(t, 2, 250 / 255)[0]) == pytest.approx((64**2 - 60**2) / 64**2)  # all object
    with pytest.raises(ValueError, match="frame"):
        M.border_fraction(t, frame=32)
