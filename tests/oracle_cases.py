"""Inversion problems with exact denoisers, shared by the core tests and `make bench`."""

from __future__ import annotations

import math

import torch

from retrace.inversion import samplers as S
from oracle_denoisers import GaussianDenoiser, GaussianMixtureDenoiser

STEPS = (10, 20, 40, 80)
SOLVE = {"euler": S.sample_euler_ode, "midpoint": S.sample_midpoint_ode}


def ascending(kind: str, n: int) -> torch.Tensor:
    """A log-spaced VE schedule like SD1.5's sigma range, or a linear flow schedule on (0, 1]."""
    if kind == "ve":
        return torch.exp(torch.linspace(math.log(0.03), math.log(14.6), n + 1, dtype=torch.float64))
    return torch.linspace(1e-3, 1.0, n + 1, dtype=torch.float64)


def problem(kind: str, seed: int = 0) -> tuple[GaussianDenoiser, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    var = 0.2 + 0.8 * torch.rand(1, 4, 8, 8, generator=g, dtype=torch.float64)
    oracle = GaussianDenoiser(mu, var, kind)
    return oracle, oracle.sample((2, 4, 8, 8), g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def roundtrip_errors(kind: str, solver: str) -> list[float]:
    oracle, x0 = problem(kind)
    errs = []
    for n in STEPS:
        sig = ascending(kind, n)
        noise = SOLVE[solver](oracle, x0, sig)
        errs.append(rel(SOLVE[solver](oracle, noise, sig.flip(0)), x0))
    return errs


def mixture(kind: str, seed: int = 0) -> tuple[GaussianMixtureDenoiser, torch.Tensor]:
    """Bimodal data: its ODE trajectories bend where the modes separate, unlike a single Gaussian's."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([-1.0, 1.0], dtype=torch.float64).reshape(2, 1, 1, 1, 1) * torch.ones(2, 1, 4, 8, 8)
    variances = torch.full((2, 1, 4, 8, 8), 0.05, dtype=torch.float64)
    oracle = GaussianMixtureDenoiser(means, variances, torch.tensor([0.5, 0.5], dtype=torch.float64), kind)
    return oracle, oracle.sample((2, 4, 8, 8), g)


def oneway_errors(kind: str, solver: str) -> list[float]:
    """Error of one inversion pass against a 32x finer midpoint solution of the same ODE."""
    oracle, x0 = mixture(kind)
    fine = S.sample_midpoint_ode(oracle, x0, ascending(kind, 32 * STEPS[-1]))
    errs = []
    for n in STEPS:
        errs.append(rel(SOLVE[solver](oracle, x0, ascending(kind, n)), fine))
    return errs


def ratios(errs: list[float]) -> list[float]:
    return [errs[i] / errs[i + 1] for i in range(len(errs) - 1)]


def order(errs: list[float]) -> float:
    """Convergence order from the two finest step counts (each a doubling)."""
    return math.log2(errs[-2] / errs[-1])


class PromptedGaussian:
    """A guided denoiser with exact branches, for null-text and direct inversion.

    Data are Gaussian with variance ``var``; a prompt embedding ``e`` ``[B, tokens, width]`` sets the mean
    through a fixed linear map, ``mu(e) = A e``. Both branches are the exact Gaussian denoiser for their
    mean, so the unconditional prediction is affine in its embedding and the per-step null-text problem is a
    linear least-squares one. As with a text encoder feeding a UNet, the embedding has more numbers than the
    latent (256 against 32), so a small change of embedding can move the prediction anywhere.
    """

    def __init__(self, shape: tuple[int, ...] = (2, 4, 4), tokens: int = 16, width: int = 16, guidance: float = 7.5,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.shape, self.guidance = shape, guidance
        size = int(torch.tensor(shape).prod())
        self.A = 3 * torch.randn(tokens * width, size, generator=g, dtype=torch.float64) / math.sqrt(tokens * width)
        self.var = 0.2 + 0.8 * torch.rand(1, *shape, generator=g, dtype=torch.float64)
        self.cond_embedding = 0.1 * torch.randn(1, tokens, width, generator=g, dtype=torch.float64)
        self.null_embedding = torch.zeros(1, tokens, width, dtype=torch.float64)
        self.calls = 0

    def mean(self, embedding: torch.Tensor) -> torch.Tensor:
        return (embedding.flatten(1) @ self.A).reshape(-1, *self.shape)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        mu = self.mean(embedding)
        return mu + self.var / (self.var + s**2) * (x - mu)

    def cond(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, sigma, self.cond_embedding)

    def uncond(self, x: torch.Tensor, sigma: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, sigma, embedding)

    def guide(self, x, sigma, cond, uncond) -> torch.Tensor:
        return uncond + self.guidance * (cond - uncond)

    def conditional(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        """The unguided conditional denoiser in k-diffusion form (inversion runs at guidance 1)."""
        return self.cond(x, sigma)

    def guided(self, embedding: torch.Tensor):
        """The guided denoiser in k-diffusion form, with one fixed unconditional embedding."""
        return lambda x, sigma, **_: self.guide(x, sigma, self.cond(x, sigma), self.uncond(x, sigma, embedding))

    def image(self, batch: int = 1, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        mu = self.mean(self.cond_embedding)
        return mu + self.var.sqrt() * torch.randn(batch, *self.shape, generator=g, dtype=torch.float64)
