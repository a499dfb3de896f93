"""Decoder-side refinement of an encoded latent."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in ``[0, peak]`` of the same shape (inf if identical)."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def refine_latent(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, image: torch.Tensor,
                  steps: int, lr: float = 0.05,
                  callback: Optional[Callable[[int, float], None]] = None) -> tuple[torch.Tensor, list[float]]:
    """Lower ``||decode(z) - image||^2`` over z by Adam, starting from the encoder's latent.

    The encoder is amortised and leaves a gap the decoder could close; optimising the latent against the
    decoder closes part of it (the "decoder inversion" of Hong et al. 2023, "On Exact Inversion of
    DPM-Solvers", Sec. 4.1). ``decode`` maps a latent to an image in [0, 1] with the same layout as
    ``image``. Returns the best latent seen and the loss before each step and after the last.
    Call with gradients enabled; only z receives them.
    """
    if steps < 0:
        raise ValueError(f"refinement steps must be >= 0; got {steps}.")
    z = latent.detach().clone().requires_grad_(True)
    target = image.detach()
    opt = torch.optim.Adam([z], lr=lr)
    losses: list[float] = []
    best, best_loss = latent.detach().clone(), float("inf")
    for i in range(steps + 1):
        loss = torch.mean((decode(z) - target) ** 2)
        value = float(loss.detach())
        losses.append(value)
        if value < best_loss:
            best, best_loss = z.detach().clone(), value
        if i == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(i, value)
    return best, losses
