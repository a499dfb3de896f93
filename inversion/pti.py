"""Pivotal tuning (Roich et al. 2022, "Pivotal Tuning for Latent-based Editing of Real Images", eq. 3-5).

With the latent fixed at a projected pivot, fine-tune a copy of the generator so that the pivot renders
the photo (eq. 3: L2 plus LPIPS); an optional locality regulariser (eq. 4) keeps renders of latents near the
pivot as the original generator made them, so edits around the pivot still behave. The generator passed
in is never changed; the result is the tuned values of the weights that changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .gan_projection import Degradation, autograd_copy, image_loss, psnr


@dataclass(frozen=True)
class PTISettings:
    """Defaults from the paper's code: 350 steps of Adam at 3e-4, L2 + LPIPS (weight 1 each), stop at
    LPIPS 0.06; locality off (``locality_weight`` 0.1 and ``locality_alpha`` 30 when on)."""

    steps: int = 350
    learning_rate: float = 3e-4
    mse_weight: float = 1.0
    ssim_weight: float = 0.0
    lpips_weight: float = 1.0
    lpips_threshold: float = 0.06
    locality_weight: float = 0.0
    locality_alpha: float = 30.0
    locality_psi: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class TunedGenerator:
    """``weights``: the tuned value of every parameter that changed; ``psnr_before`` / ``psnr_after`` per image;
    ``steps_run`` (less than asked when LPIPS reached the threshold)."""

    weights: dict[str, torch.Tensor]
    psnr_before: torch.Tensor
    psnr_after: torch.Tensor
    steps_run: int
    image: torch.Tensor


def _toward(G: nn.Module, pivot: torch.Tensor, alpha: float, psi: float, gen: torch.Generator) -> torch.Tensor:
    """A latent at distance ``alpha`` from the pivot toward a random (truncated) sample, per eq. 4."""
    z = torch.randn(pivot.shape[0], G.z_dim, generator=gen).to(pivot.device)
    c = torch.zeros(z.shape[0], G.c_dim, device=pivot.device) if G.c_dim else None
    w_z = G.mapping(z, c, truncation_psi=psi)
    direction = w_z - pivot
    return pivot + alpha * direction / direction.flatten(1).norm(dim=1).clamp_min(1e-8).view(-1, 1, 1)


def pivotal_tuning(G: nn.Module, pivot: torch.Tensor, target: torch.Tensor, settings: PTISettings = PTISettings(),
                   noise: dict[str, torch.Tensor] | None = None, degradation: Degradation = Degradation(),
                   lpips: nn.Module | None = None,
                   callback: Callable[[dict[str, Any]], None] | None = None) -> TunedGenerator:
    """Tune a copy of ``G`` so that ``pivot`` (``[B, num_ws, w_dim]``) renders ``target`` (``[B, C, H, W]`` in
    [-1, 1]); one generator serves the whole batch (the paper's multi-image variant when B > 1)."""
    original = autograd_copy(G)
    tuned = autograd_copy(G)
    device = next(tuned.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        pivot = pivot.detach().clone().to(device, torch.float32)
        target = target.detach().clone().to(device, torch.float32)
        noise = {k: v.detach().clone().to(device, torch.float32) for k, v in (noise or {}).items()} or None
        degradation = degradation.detached()
        observed = degradation.observe(target, tuned.img_resolution)
        weights = degradation.weights(observed.shape, device)
        weights = weights.expand(target.shape[0], 1, *observed.shape[-2:]) if weights.shape[0] == 1 else weights
        params = {name: p for name, p in tuned.named_parameters() if p.dtype.is_floating_point}
        for p in params.values():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(list(params.values()), lr=settings.learning_rate, betas=(0.9, 0.999))
        gen = torch.Generator().manual_seed(settings.seed)

        with torch.no_grad():
            first = tuned.synthesis(pivot, noise_mode="const", noise=noise, force_fp32=True)
            psnr_before = psnr(degradation.apply(first), observed, weights).cpu()
        steps_run = 0
        for step in range(settings.steps):
            synth = tuned.synthesis(pivot, noise_mode="const", noise=noise, force_fp32=True)
            seen = degradation.apply(synth)
            loss = image_loss(seen, observed, weights, settings.mse_weight, settings.ssim_weight, None, 0.0,
                              seen.shape[-1]).sum()
            distance = None
            if lpips is not None and settings.lpips_weight:
                distance = lpips(seen * weights, observed * weights)
                loss = loss + settings.lpips_weight * distance.sum()
            if settings.locality_weight:
                w_r = _toward(original, pivot, settings.locality_alpha, settings.locality_psi, gen)
                with torch.no_grad():
                    reference = original.synthesis(w_r, noise_mode="const", force_fp32=True)
                drift = tuned.synthesis(w_r, noise_mode="const", force_fp32=True)
                loss = loss + settings.locality_weight * (drift - reference).square().mean()
                if lpips is not None:
                    loss = loss + settings.locality_weight * lpips(drift, reference).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps_run = step + 1
            if callback is not None:
                callback({"step": step, "steps": settings.steps, "loss": float(loss.detach()), "image": synth.detach()})
            if distance is not None and float(distance.max()) <= settings.lpips_threshold:
                break

        with torch.no_grad():
            image = tuned.synthesis(pivot, noise_mode="const", noise=noise, force_fp32=True)
            psnr_after = psnr(degradation.apply(image), observed, weights).cpu()
            base = dict(original.named_parameters())
            weights = {name: p.detach().clone() for name, p in params.items() if not torch.equal(p, base[name])}
    return TunedGenerator(weights=weights, psnr_before=psnr_before, psnr_after=psnr_after, steps_run=steps_run,
                          image=image)
