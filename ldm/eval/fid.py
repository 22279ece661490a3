"""Distribution metrics on feature vectors: FID and KID, streamed and rank-aware.

- **FID** (Heusel et al. 2017, eq. 6): the Fréchet distance between Gaussians fitted to two
  feature sets, ``‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})``. The trace of the matrix square
  root is taken as ``Σᵢ √λᵢ`` over the eigenvalues of the symmetric PSD matrix
  ``Σ₁^{1/2} Σ₂ Σ₁^{1/2}``, which has the same spectrum as ``Σ₁ Σ₂`` and stays real and
  stable when the covariances are near singular (few samples, 2048 dimensions).
- **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. 4 with the cubic polynomial
  kernel ``k(x, y) = (xᵀy / d + 1)³``): the unbiased MMD² estimate, averaged over random subsets
  (mean and standard deviation reported, as the paper and torchmetrics do).

:class:`FeatureStats` accumulates the sufficient statistics (count, Σx, Σxxᵀ in float64) batch
by batch, so reference statistics of millions of images need one pass and constant memory, and
sums across ranks with one all-reduce. Reference statistics are saved as ``.npz`` with ``mu``
and ``sigma`` (the layout pytorch-fid's ``--save-stats`` writes), plus ``n``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors (float64)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add a ``(B, dim)`` batch."""
        f = features.detach().to("cpu", torch.float64)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        """Sum the statistics over all ranks (no-op outside torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        packed = torch.cat(
            [torch.tensor([float(self.n)], dtype=torch.float64), self.total, self.outer.flatten()]
        )
        dist.all_reduce(packed)
        dim = self.total.numel()
        self.n = int(round(packed[0].item()))
        self.total = packed[1 : dim + 1].clone()
        self.outer = packed[dim + 1 :].view(dim, dim).clone()

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (divisor n − 1, as numpy's ``np.cov``)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()

    def save(self, path: str | Path) -> Path:
        """Write ``mu``, ``sigma`` and ``n`` to an ``.npz`` file."""
        mu, sigma = self.mean_cov()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=np.array(self.n))
        return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from an ``.npz`` of reference statistics (ours or pytorch-fid's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics not found: {path} (make them with "
            "`python -m ldm.eval.stats --shards ... --out ref.npz`)"
        )
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} lacks 'mu'/'sigma' arrays: not FID reference statistics")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def _sym_sqrt(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6)."""
    m1, m2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.numel(), m1.numel()):
        raise ValueError(
            f"statistics do not match: mu {tuple(m1.shape)} vs {tuple(m2.shape)}, "
            f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}"
        )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root = _sym_sqrt(s1)
    inner = root @ s2 @ root
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two ``(N, dim)`` feature sets."""
    stats = []
    for f in (a, b):
        s = FeatureStats(f.shape[1])
        s.update(f)
        stats.append(s.mean_cov())
    return frechet_distance(*stats[0], *stats[1])


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (Bińkowski et al. 2018, eq. 4)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID mean and standard deviation over ``subsets`` random subsets of each feature set.

    A subset size above the smaller set's size is reduced to it (with a warning-free clamp: a
    small evaluation set still gets a number, and the report says how many were used).
    """
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, have {size}")
    x, y = real.to(torch.float64), fake.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix = torch.randperm(x.shape[0], generator=g)[:size]
        iy = torch.randperm(y.shape[0], generator=g)[:size]
        values.append(mmd2_unbiased(x[ix], y[iy]))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False)) if len(values) > 1 else 0.0
