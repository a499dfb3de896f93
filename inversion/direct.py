"""Direct inversion (Ju et al. 2024, "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code",
Algorithm 1) as small pure functions.

Guided sampling from the inverted noise drifts off the inverted trajectory. Direct inversion does not
optimise anything: at every step it evaluates the guided source branch on the inverted latent ``z*_t``,
measures how far its step misses ``z*_{t-1}`` and adds that difference back. The source branch then follows
the trajectory exactly; an edit branch gets the same per-step correction.

In sigma form the correction lives on the denoised estimate: the Euler step from ``z*_t`` lands on
``z*_{t-1}`` exactly when the denoised estimate is :func:`implied_denoised`, so the corrected estimate is
``D(x) + (D* - D_source(z*_t))``. The same holds for eps, v and flow models.

No ComfyUI import here.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .null_text import euler_to
from .samplers import check_sigmas

Denoiser = Callable[..., torch.Tensor]
Callback = Optional[Callable[[dict], None]]


def implied_denoised(x: torch.Tensor, sigma: torch.Tensor, x_next: torch.Tensor,
                     sigma_next: torch.Tensor) -> torch.Tensor:
    """The denoised estimate whose Euler step carries ``x`` at ``sigma`` to ``x_next`` at ``sigma_next``."""
    return x - sigma * (x_next - x) / (sigma_next - sigma)


def trajectory_denoised(trajectory: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``D*`` for every sampling step of an inversion (``sigmas`` ascending, as recorded); sampling order."""
    check_sigmas(sigmas)
    steps = len(sigmas) - 1
    return torch.stack([implied_denoised(trajectory[steps - k], sigmas[steps - k], trajectory[steps - k - 1],
                                         sigmas[steps - k - 1]) for k in range(steps)])


def corrected_denoised(denoised: torch.Tensor, source_denoised: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Ju et al. 2024, Algorithm 1, line 8: add back what the source branch misses on the trajectory.

    Written as ``target + (denoised - source)`` so that an edit branch that equals the source gives ``target``
    exactly."""
    return target + (denoised - source_denoised)


@torch.no_grad()
def sample_direct_inversion(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                            callback: Callback = None, disable: bool | None = None, *, trajectory: torch.Tensor,
                            source_model: Denoiser | None = None) -> torch.Tensor:
    """Sample along an inversion with per-step direct-inversion corrections (Ju et al. 2024, Algorithm 1).

    ``sigmas`` descend and mirror the inversion's; ``trajectory`` is the inversion's, ascending. With
    ``source_model`` (the guided denoiser with the source prompt), ``model`` is the edit branch and gets the
    source branch's per-step corrections. Without it this is the source branch itself, which by construction
    is the inverted trajectory: its corrected estimate is ``D*`` and no model is evaluated.
    """
    check_sigmas(sigmas)
    extra_args = extra_args or {}
    targets = trajectory_denoised(trajectory, sigmas.flip(0))
    steps = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    for k in range(steps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        target = targets[k].to(x)
        if source_model is None:
            denoised = target
        else:
            source = source_model(trajectory[steps - k].to(x), sigma * s_in, **extra_args)
            denoised = corrected_denoised(model(x, sigma * s_in, **extra_args), source, target)
        if callback is not None:
            callback({"x": x, "i": k, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = euler_to(x, sigma, sigma_next, denoised)
    return x
