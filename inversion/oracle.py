"""The exact denoiser for Gaussian data: a network-free model to test solvers against.

For data ``x0 ~ N(mu, diag(var))`` the minimum-MSE denoiser is linear and known in closed form, so
the probability-flow ODE is exactly the one the solvers integrate and only discretisation error is
left (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Eq. 3
with the Gaussian posterior mean).
"""

from __future__ import annotations

import torch


class GaussianDenoiser:
    """``E[x0 | x]`` for ``x = x0 + sigma * n`` ("ve", eps/v models in the host's scale) or
    ``x = (1 - sigma) * x0 + sigma * n`` ("flow")."""

    def __init__(self, mu: torch.Tensor, var: torch.Tensor, kind: str = "ve"):
        if kind not in ("ve", "flow"):
            raise ValueError(f"kind must be 've' or 'flow'; got {kind!r}.")
        self.mu, self.var, self.kind = mu, var, kind
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        self.calls += 1
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        if self.kind == "ve":
            return self.mu + self.var / (self.var + s**2) * (x - self.mu)
        a = 1 - s
        return self.mu + a * self.var / (a**2 * self.var + s**2) * (x - a * self.mu)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return self.mu + self.var.sqrt() * torch.randn(shape, generator=generator, dtype=self.mu.dtype)

    def transport(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact probability-flow ODE solution from ``sigma_from`` to ``sigma_to``.

        The ODE keeps each coordinate's standard score fixed: ``(x - m(s)) / sd(s)`` is constant, with
        ``m, sd`` the marginal mean and standard deviation at sigma s.
        """
        def moments(s: float) -> tuple[torch.Tensor, torch.Tensor]:
            if self.kind == "ve":
                return self.mu, (self.var + s**2).sqrt()
            return (1 - s) * self.mu, ((1 - s) ** 2 * self.var + s**2).sqrt()

        m0, sd0 = moments(sigma_from)
        m1, sd1 = moments(sigma_to)
        return m1 + sd1 / sd0 * (x - m0)
