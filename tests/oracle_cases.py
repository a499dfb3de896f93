"""Inversion problems with exact denoisers, shared by the core tests and `make bench`."""

from __future__ import annotations

import math

import torch

from retrace.inversion import samplers as S
from retrace.inversion.oracle import GaussianDenoiser, GaussianMixtureDenoiser

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
