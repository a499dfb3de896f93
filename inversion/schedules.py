"""Sigma schedules for inversion."""

from __future__ import annotations

import torch

# The host's FlipSigmas puts the clean image at this sigma instead of 0, where d = (x - x0) / sigma is undefined.
SIGMA_FLOOR = 1e-4

# How far a sampler's sigma may be from a schedule's, relative, and still count as that step. The host hands
# sigmas back in the model's dtype; a flow schedule's top sigma may be 1 or the 1 - 1e-4 an inversion stops at.
SIGMA_MATCH = 1e-3


def step_index(step_sigmas: torch.Tensor, sigma: torch.Tensor | float) -> int | None:
    """Index of the schedule step that starts at ``sigma``, or None if no step does."""
    value = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    gaps = (step_sigmas.double() - value).abs()
    k = int(gaps.argmin())
    return k if float(gaps[k]) <= SIGMA_MATCH * max(abs(value), 1e-6) else None


def inversion_sigmas(sampling_sigmas: torch.Tensor, flow_top: float | None = None) -> torch.Tensor:
    """Turn a sampling schedule (descending, usually ending at 0) into an inversion schedule.

    The result ascends, starts at the smallest non-zero sigma (a 0 becomes ``SIGMA_FLOOR``), and, when
    ``flow_top`` is given, caps a flow model's top sigma there (the host divides a flow latent by
    ``1 - sigma`` after sampling, which is infinite at sigma 1). Returns a new tensor.
    """
    if sampling_sigmas.ndim != 1 or sampling_sigmas.numel() < 2:
        raise ValueError(f"need a schedule of at least 2 sigmas (1 step); got shape {tuple(sampling_sigmas.shape)}.")
    sigmas = sampling_sigmas.flip(0).clone()
    if float(sigmas[0]) == 0.0:
        sigmas[0] = SIGMA_FLOOR
    if flow_top is not None:
        sigmas[-1] = min(float(sigmas[-1]), flow_top)
    return sigmas


def reconstruction_sigmas(inversion_schedule: torch.Tensor) -> torch.Tensor:
    """The exact mirror of an inversion schedule: the same sigmas, descending."""
    return inversion_schedule.flip(0).clone()
