"""Exact denoisers for Gaussian and Gaussian-mixture data: network-free models to test solvers against.

For data drawn from a Gaussian, or a mixture of Gaussians, the minimum-MSE denoiser ``E[x0 | x]`` is
known in closed form, so the probability-flow ODE is exactly the one the solvers integrate and only
discretisation error is left (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Eq. 3 with the Gaussian posterior mean). Coordinates are independent.
"""

from __future__ import annotations

import torch


class GaussianMixtureDenoiser:
    """``E[x0 | x]`` for ``x = x0 + sigma * n`` ("ve": eps/v models in the host's scale) or
    ``x = (1 - sigma) * x0 + sigma * n`` ("flow"), with each coordinate of x0 drawn from a mixture of
    Gaussians: ``means`` and ``variances`` are ``[K, 1, *x.shape[1:]]`` (components first), ``weights`` sums to 1.
    """

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor, kind: str = "ve"):
        if kind not in ("ve", "flow"):
            raise ValueError(f"kind must be 've' or 'flow'; got {kind!r}.")
        self.means, self.variances, self.weights, self.kind = means, variances, weights, kind
        self.calls = 0

    def _scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """The factor on x0 at this sigma: 1 for ve, 1 - sigma for flow."""
        return torch.ones_like(sigma) if self.kind == "ve" else 1 - sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        self.calls += 1
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        a = self._scale(s)
        mean = a * self.means  # [K, B, ...]
        var = a**2 * self.variances + s**2
        log_p = -0.5 * ((x - mean) ** 2 / var + var.log()) + self.weights.log().reshape(-1, *([1] * x.ndim))
        resp = torch.softmax(log_p, dim=0)
        posterior = self.means + a * self.variances / var * (x - mean)
        return (resp * posterior).sum(0)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        dtype = self.means.dtype
        component = torch.multinomial(self.weights, int(torch.tensor(shape).prod()), replacement=True,
                                      generator=generator).reshape(shape)
        means = torch.gather(self.means.expand(-1, *shape), 0, component.unsqueeze(0))[0]
        variances = torch.gather(self.variances.expand(-1, *shape), 0, component.unsqueeze(0))[0]
        return means + variances.sqrt() * torch.randn(shape, generator=generator, dtype=dtype)


class GaussianDenoiser(GaussianMixtureDenoiser):
    """A single Gaussian ``N(mu, diag(var))``: its ODE also has a closed-form solution (:meth:`transport`)."""

    def __init__(self, mu: torch.Tensor, var: torch.Tensor, kind: str = "ve"):
        super().__init__(mu.unsqueeze(0), var.unsqueeze(0), torch.ones(1, dtype=mu.dtype), kind)
        self.mu, self.var = mu, var

    def transport(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact probability-flow ODE solution from ``sigma_from`` to ``sigma_to``.

        The ODE keeps each coordinate's standard score fixed: ``(x - m(s)) / sd(s)`` is constant, with
        ``m, sd`` the marginal mean and standard deviation at sigma s.
        """
        def moments(s: float) -> tuple[torch.Tensor, torch.Tensor]:
            a = 1.0 if self.kind == "ve" else 1 - s
            return a * self.mu, (a**2 * self.var + s**2).sqrt()

        m0, sd0 = moments(sigma_from)
        m1, sd1 = moments(sigma_to)
        return m1 + sd1 / sd0 * (x - m0)
