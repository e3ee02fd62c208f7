"""Evaluation metrics as pure functions of tensors (no model weights, no I/O).

Distribution distances take feature matrices (N, D); image metrics take float RGB batches (N, 3, H, W) in
[0, 1] (`images_to_tensor` makes them from PIL images). Accumulation is in float64 where it matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# ITU-R BT.601 luma weights (PIL's "L" conversion)
_LUMA = (0.299, 0.587, 0.114)


def images_to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """PIL images of one size -> float32 (N, 3, H, W) in [0, 1]."""
    if not images:
        raise ValueError("no images")
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------------------------------
# Distances between feature distributions
# --------------------------------------------------------------------------------------------------


def mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2; got {tuple(x.shape)}")
    x = x.double()
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_sqrt(s: Tensor) -> Tensor:
    """Principal square root of a symmetric PSD matrix (negative rounding-error eigenvalues clamped to 0)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), as in FID (Heusel et al.
    2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the two matrices are similar, and the second is
    symmetric PSD, so a symmetric eigendecomposition gives it stably (no scipy.linalg.sqrtm, no complex parts).
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]) or mu1.shape != mu2.shape:
        raise ValueError(f"mismatched statistics: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)}/{tuple(s2.shape)}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features x (N, D) and y (M, D)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D; got {tuple(x.shape)}, {tuple(y.shape)}")
    return frechet_distance_from_stats(*mean_cov(x), *mean_cov(y))


def kernel_inception_distance(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None,
                              coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between features x (N, D) and y (M, D) with the polynomial kernel
    k(a, b) = (gamma a.b + coef0)^degree, gamma = 1/D by default: KID (Bińkowski et al. 2018, "Demystifying
    MMD GANs", eq. 2 with the cubic kernel). Unbiased, so it can be slightly negative for equal distributions.
    Computed on the whole sets (the reference implementations average it over random subsets, which has
    the same expectation)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D; got {tuple(x.shape)}, {tuple(y.shape)}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples per set; got {m} and {n}")
    x, y = x.double(), y.double()
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (g * x @ x.T + coef0) ** degree
    kyy = (g * y @ y.T + coef0) ** degree
    kxy = (g * x @ y.T + coef0) ** degree
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


# --------------------------------------------------------------------------------------------------
# Text-image alignment
# --------------------------------------------------------------------------------------------------


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """CLIP score of matched pairs (N, P) x (N, P): mean over pairs of max(100 cos, 0) (Hessel et al. 2021,
    "CLIPScore", with w = 100 as torchmetrics' `CLIPScore`; the papers' raw cosine is this / 100 without the clip)."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"need matched (N, P) embeddings; got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = F.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return float((100 * cos).clamp(min=0).mean())


def retrieval_ranks(image_emb: Tensor, candidate_emb: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each image's own caption among all candidates by cosine similarity: the number of
    candidates strictly more similar than the target (ties count in the image's favour). image_emb (N, P),
    candidate_emb (M, P), targets (N,) indices into the candidates -> (N,) int64."""
    if image_emb.ndim != 2 or candidate_emb.ndim != 2 or image_emb.shape[1] != candidate_emb.shape[1]:
        raise ValueError(f"need (N, P) and (M, P) embeddings; got {tuple(image_emb.shape)}, {tuple(candidate_emb.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.shape != (image_emb.shape[0],) or targets.min() < 0 or targets.max() >= candidate_emb.shape[0]:
        raise ValueError(f"targets must be {image_emb.shape[0]} indices into {candidate_emb.shape[0]} candidates")
    sim = F.normalize(image_emb.double(), dim=-1) @ F.normalize(candidate_emb.double(), dim=-1).T  # (N, M)
    own = sim.gather(1, targets[:, None])  # (N, 1)
    return (sim > own).sum(dim=1)


def retrieval_accuracy(image_emb: Tensor, candidate_emb: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)
                       ) -> dict[int, float]:
    """Share of images whose own caption is among the top-k candidates, for each k."""
    ranks = retrieval_ranks(image_emb, candidate_emb, targets)
    return {k: float((ranks < k).double().mean()) for k in ks}


# --------------------------------------------------------------------------------------------------
# Pixel metrics (independent of any learned model)
# --------------------------------------------------------------------------------------------------


def thumbnails(images: Sequence[Image.Image], size: int = 16) -> Tensor:
    """PIL images -> (N, 3*size*size) float64 in [0, 1], each resized to size x size with a box (area) filter."""
    return images_to_tensor([im.convert("RGB").resize((size, size), Image.BOX) for im in images]).flatten(1).double()


def nearest_neighbours(queries: Tensor, references: Tensor) -> Tensor:
    """Index of the L2-nearest reference row for each query row: (N, D), (M, D) -> (N,)."""
    return torch.cdist(queries.double(), references.double()).argmin(dim=1)


def pixel_identity(generated: Sequence[Image.Image], prompted: Sequence[str], references: Sequence[Image.Image],
                   reference_names: Sequence[str], size: int = 16) -> tuple[float, list[str]]:
    """Does a generated image look, pixel for pixel at size x size, most like the dataset image of the emoji it
    was prompted with? -> (share correct, the nearest reference's name for each generated image)."""
    if len(generated) != len(prompted) or len(references) != len(reference_names):
        raise ValueError("one name per image is needed")
    idx = nearest_neighbours(thumbnails(generated, size), thumbnails(references, size))
    nearest = [reference_names[i] for i in idx.tolist()]
    return sum(a == b for a, b in zip(nearest, prompted)) / len(prompted), nearest


def grayscale(images: Tensor) -> Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma."""
    w = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (images * w).sum(dim=1, keepdim=True)


def sharpness(images: Tensor) -> Tensor:
    """High-frequency energy: mean squared 4-neighbour Laplacian of the luma (valid pixels only), per image.
    (N, 3, H, W) in [0, 1] -> (N,). Blur lowers it; flat images give 0."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)[None, None]
    lap = F.conv2d(grayscale(images.double()), k)  # (N, 1, H-2, W-2)
    return lap.square().mean(dim=(1, 2, 3))


def object_mask(images: Tensor, white_threshold: float = 240 / 255) -> Tensor:
    """Object pixels of images on white: any channel below `white_threshold`. (N, 3, H, W) -> (N, H, W) bool."""
    return (images < white_threshold).any(dim=1)


def border_fraction(images: Tensor, frame: int = 2, white_threshold: float = 240 / 255) -> Tensor:
    """Share of each image's object pixels that lie in the outer `frame`-pixel band: ~0 for an object inside
    the canvas, large when the object is cut by the edge. Images without object pixels score 0. -> (N,)."""
    if frame < 1 or 2 * frame >= min(images.shape[-2:]):
        raise ValueError(f"frame must be in [1, {min(images.shape[-2:]) // 2 - 1}] for {tuple(images.shape[-2:])} images")
    obj = object_mask(images, white_threshold)
    band = torch.ones(obj.shape[-2:], dtype=torch.bool, device=obj.device)
    band[frame:-frame, frame:-frame] = False
    total = obj.sum(dim=(1, 2))
    on_band = (obj & band).sum(dim=(1, 2))
    return torch.where(total > 0, on_band.double() / total.clamp(min=1), torch.zeros((), dtype=torch.float64))
