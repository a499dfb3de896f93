"""Sigma schedules for inversion."""

from __future__ import annotations

import torch

# The host's FlipSigmas puts the clean image at this sigma instead of 0, where d = (x - x0) / sigma is undefined.
SIGMA_FLOOR = 1e-4


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
