"""StyleGAN projection: find the W or W+ latent (and noise maps) that render a given image.

The published recipe is the StyleGAN2 projector (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN", section 5 and appendix D): start at the mean w, Adam with a linear warm-up and
cosine ramp-down of the learning rate, Gaussian noise on w that fades out (``0.05 * w_std * (1 - t/0.75)^2``),
noise maps optimised beside w under a multi-scale autocorrelation penalty, renormalised after every step.

Retrace's own recipe keeps that structure and changes what the appendix leaves open: it starts from the
best of 64 sampled latents (and the mean) instead of the mean alone, starts the noise maps at the generator's
own instead of fresh noise, spends 30% of the steps on Adam (peak 0.03, faster warm-up, no latent noise) and
the rest on L-BFGS with a strong-Wolfe line search (Nocedal & Wright, algorithm 7.5), which keeps converging
where Adam's step size stalls. The loss is pixel MSE plus SSIM, plus LPIPS when a backbone is given. A :class:`Degradation` puts an observation model inside the loss
(Pan et al. 2021, "Exploiting Deep Generative Prior", eq. 2): the render is degraded the way the input was,
so the projection fills in what the input lacks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RECIPES = ("retrace", "nvlabs")
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ProjectionSettings:
    """``recipe='nvlabs'`` is the published projector exactly (1000 steps); ``'retrace'`` the faster default."""

    space: str = "w+"
    steps: int = 250
    recipe: str = "retrace"
    learning_rate: float | None = None
    optimize_noise: bool = True
    noise_regularize: float = 1e5
    mse_weight: float = 1.0
    ssim_weight: float = 1.0
    lpips_weight: float = 1.0
    w_avg_samples: int = 10000
    loss_resolution: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.space not in ("w", "w+"):
            raise ValueError(f"space must be 'w' or 'w+', got {self.space!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    @property
    def peak_lr(self) -> float:
        """Adam's peak learning rate: as given, else 0.1 (published) or 0.03 (retrace: L-BFGS finishes the job)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 0.1 if self.recipe == "nvlabs" else 0.03

    @property
    def schedule(self) -> dict[str, float]:
        """Warm-up and ramp-down fractions, initial latent noise (in w_std) and when it has faded out."""
        if self.recipe == "nvlabs":
            return {"rampup": 0.05, "rampdown": 0.25, "noise_factor": 0.05, "noise_ramp": 0.75}
        return {"rampup": 0.02, "rampdown": 0.6, "noise_factor": 0.0, "noise_ramp": 0.5}

    @property
    def init_candidates(self) -> int:
        return 0 if self.recipe == "nvlabs" else 64

    @property
    def adam_steps(self) -> int:
        """Steps of the Adam phase; the retrace recipe spends the rest on L-BFGS refinement."""
        return self.steps if self.recipe == "nvlabs" else max(1, round(self.steps * 0.3))


NVLABS = ProjectionSettings(space="w", steps=1000, recipe="nvlabs")


@dataclass(frozen=True)
class Degradation:
    """What the input lacks. ``known`` is ``[B or 1, 1, H, W]``, 1 where a pixel counts (0 = to fill in);
    ``downscale`` compares an area-downscaled render with a low-resolution input; ``grayscale`` compares
    luminance only."""

    known: torch.Tensor | None = None
    downscale: int = 1
    grayscale: bool = False

    def __post_init__(self) -> None:
        if self.downscale < 1:
            raise ValueError(f"downscale must be at least 1, got {self.downscale}")

    def detached(self) -> Degradation:
        """A copy whose mask autograd can use (call under ``inference_mode(False)``; the host makes masks in
        inference mode)."""
        known = None if self.known is None else self.known.detach().clone()
        return Degradation(known=known, downscale=self.downscale, grayscale=self.grayscale)

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        """The render as the input would have seen it."""
        if self.grayscale:
            img = luminance(img)
        if self.downscale > 1:
            img = F.avg_pool2d(img, self.downscale)
        return img

    def observe(self, target: torch.Tensor, resolution: int) -> torch.Tensor:
        """The input brought to the degraded render's form (a full-size input is downscaled here)."""
        if self.grayscale:
            target = luminance(target)
        if self.downscale > 1 and target.shape[-1] == resolution:
            target = F.avg_pool2d(target, self.downscale)
        return target

    def weights(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Per-pixel weights of the loss in the degraded frame, ``[B or 1, 1, h, w]``."""
        if self.known is None:
            return torch.ones(1, 1, *shape[-2:], device=device)
        known = self.known.to(device=device, dtype=torch.float32)
        if self.downscale > 1:
            known = F.avg_pool2d(known, self.downscale)
        return known


def luminance(img: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of an RGB image (single-channel images pass through)."""
    if img.shape[1] == 1:
        return img
    weights = torch.tensor(LUMA, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    return (img[:, :3] * weights).sum(dim=1, keepdim=True)


def psnr(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), one value per image."""
    err = (a.float() - b.float()).square()
    if weights is None:
        mse = err.flatten(1).mean(dim=1)
    else:
        w = weights.float().expand_as(err)
        mse = (err * w).flatten(1).sum(dim=1) / w.flatten(1).sum(dim=1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


@dataclass
class Projection:
    """The result: ``ws`` ``[B, num_ws, w_dim]`` (rows repeated in W), optimised ``noise`` maps, the last
    render, and the per-image PSNR of the degraded render against the input at each step."""

    ws: torch.Tensor
    noise: dict[str, torch.Tensor]
    image: torch.Tensor
    psnr_history: list[torch.Tensor] = field(default_factory=list)


def autograd_copy(G: nn.Module) -> nn.Module:
    """A frozen copy of ``G`` whose weights autograd can save (the host loads weights as inference tensors)."""
    with torch.inference_mode(False):
        G = copy.deepcopy(G)
    return G.eval().requires_grad_(False)


@torch.no_grad()
def sample_ws(G: nn.Module, samples: int, seed: int = 0, batch: int = 1000) -> torch.Tensor:
    """``samples`` ws from the mapping network ``[samples, w_dim]`` (float32, on G's device), from seeded z and, for
    a class-conditional generator, seeded random classes; no truncation."""
    device = next(G.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, G.z_dim, generator=gen)
    c = None
    if G.c_dim:
        c = F.one_hot(torch.randint(G.c_dim, [samples], generator=gen), G.c_dim).float()
    ws = [G.mapping(z[i:i + batch].to(device), None if c is None else c[i:i + batch].to(device))[:, 0].float()
          for i in range(0, samples, batch)]
    return torch.cat(ws)


@torch.no_grad()
def w_statistics(G: nn.Module, samples: int = 10000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean w, the RMS distance of w from it (one scalar, as the projector uses), and the sampled ws."""
    ws = sample_ws(G, samples, seed)
    w_avg = ws.mean(dim=0)
    w_std = (ws - w_avg).square().sum(dim=1).mean().sqrt()
    return w_avg, w_std, ws


def lr_at(t: float, base: float, rampup: float, rampdown: float) -> float:
    """Linear warm-up over ``rampup``, flat, cosine ramp-down over the last ``rampdown`` of the run."""
    ramp = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    warm = min(1.0, t / rampup) if rampup > 0 else 1.0
    return base * warm * (0.5 - 0.5 * math.cos(math.pi * ramp))


def noise_regularization(noise: dict[str, torch.Tensor], per_image: bool = False) -> torch.Tensor:
    """Squared autocorrelation of each noise map at one-pixel shifts, over an octave pyramid down to 8 px
    (per image; summed over the batch unless ``per_image``)."""
    reg = 0.0
    for n in noise.values():
        while True:
            reg = reg + (n * torch.roll(n, shifts=1, dims=3)).mean(dim=(1, 2, 3)).square()
            reg = reg + (n * torch.roll(n, shifts=1, dims=2)).mean(dim=(1, 2, 3)).square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return reg if per_image else reg.sum()


def _normalize_noise(noise: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n in noise.values():
            n -= n.mean(dim=(1, 2, 3), keepdim=True)
            n *= n.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()


def _ssim_window(size: int) -> int:
    return max(3, min(11, (size // 2) | 1))


def image_loss(synth: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, mse_weight: float,
               ssim_weight: float, lpips: nn.Module | None, lpips_weight: float,
               loss_resolution: int) -> torch.Tensor:
    """Per-image loss between a render and the input (both already in the degraded frame), compared at no more
    than ``loss_resolution`` pixels (area-downscaled, as the published projector does at 256); ``weights`` masks
    out pixels that do not count."""
    import kornia

    if synth.shape[-1] > loss_resolution:
        factor = synth.shape[-1] / loss_resolution
        synth = F.interpolate(synth, size=(loss_resolution, loss_resolution), mode="area")
        target = F.interpolate(target, size=(loss_resolution, loss_resolution), mode="area")
        weights = F.interpolate(weights, scale_factor=1 / factor, mode="area") if weights.shape[-1] > 1 else weights
    total = synth.new_zeros(synth.shape[0])
    w = weights.expand(synth.shape[0], 1, *synth.shape[-2:])
    denom = w.flatten(1).sum(dim=1).clamp_min(1e-8) * synth.shape[1]
    if mse_weight:
        total = total + mse_weight * ((synth - target).square() * w).flatten(1).sum(dim=1) / denom
    if ssim_weight:
        ssim = kornia.metrics.ssim((synth + 1) / 2, (target + 1) / 2, _ssim_window(synth.shape[-1]))
        total = total + ssim_weight * ((1 - ssim) * w).flatten(1).sum(dim=1) / denom
    if lpips is not None and lpips_weight:
        total = total + lpips_weight * lpips(synth * w, target * w)
    return total


def _render(G: nn.Module, ws: torch.Tensor, noise: dict[str, torch.Tensor] | None) -> torch.Tensor:
    return G.synthesis(ws, noise_mode="const", noise=noise or None)


@torch.no_grad()
def _best_start(G: nn.Module, candidates: torch.Tensor, target: torch.Tensor, degradation: Degradation,
                weights: torch.Tensor, noise: dict[str, torch.Tensor], chunk: int = 8) -> torch.Tensor:
    """For each target, the candidate w whose render is closest (plain MSE in the degraded frame)."""
    errors = []
    for start in range(0, candidates.shape[0], chunk):
        ws = candidates[start:start + chunk, None].repeat(1, G.num_ws, 1)
        one_noise = {k: v[:1].expand(ws.shape[0], -1, -1, -1) for k, v in noise.items()}
        seen = degradation.apply(_render(G, ws, one_noise))
        err = (seen[None] - target[:, None]).square() * weights[:, None]
        errors.append(err.flatten(2).mean(dim=2))
    return candidates[torch.cat(errors, dim=1).argmin(dim=1)]


class _Problem:
    """The loss of a batch of latents (and noise maps) against their inputs, image by image."""

    def __init__(self, G: nn.Module, rows: int, observed: torch.Tensor, weights: torch.Tensor,
                 degradation: Degradation, settings: ProjectionSettings, lpips: nn.Module | None):
        self.G, self.rows, self.observed, self.weights = G, rows, observed, weights
        self.degradation, self.settings, self.lpips = degradation, settings, lpips

    def per_image(self, w: torch.Tensor, noise: dict[str, torch.Tensor], index: slice
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's loss, the render and its PSNR (in the degraded frame) for the images ``index``."""
        s = self.settings
        ws = w.expand(-1, self.G.num_ws, -1) if self.rows == 1 else w
        synth = _render(self.G, ws, noise)
        seen = self.degradation.apply(synth)
        observed, weights = self.observed[index], self.weights[index]
        loss = image_loss(seen, observed, weights, s.mse_weight, s.ssim_weight, self.lpips, s.lpips_weight,
                          s.loss_resolution)
        if s.optimize_noise and noise:
            loss = loss + s.noise_regularize * noise_regularization(noise, per_image=True)
        with torch.no_grad():
            quality = psnr(seen, observed, weights)
        return loss, synth, quality

    def __call__(self, w: torch.Tensor, noise: dict[str, torch.Tensor], index: slice
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed loss, the render and its PSNR for the images ``index``."""
        loss, synth, quality = self.per_image(w, noise, index)
        return loss.sum(), synth, quality


def _adam_phase(problem: _Problem, w_opt: torch.Tensor, noise: dict[str, torch.Tensor], steps: int,
                w_std: torch.Tensor, gen: torch.Generator, total: int,
                callback: Callable[[dict[str, Any]], None] | None) -> list[torch.Tensor]:
    """The projector's Adam loop: scheduled learning rate, fading latent noise, noise maps renormalised."""
    s = problem.settings
    schedule = s.schedule
    trainable = [w_opt] + (list(noise.values()) if s.optimize_noise else [])
    optimizer = torch.optim.Adam(trainable, betas=(0.9, 0.999), lr=s.peak_lr)
    everything = slice(None)
    history = []
    for step in range(steps):
        t = step / steps
        for group in optimizer.param_groups:
            group["lr"] = lr_at(t, s.peak_lr, schedule["rampup"], schedule["rampdown"])
        fade = max(0.0, 1.0 - t / schedule["noise_ramp"]) ** 2
        w_noise = torch.randn(w_opt.shape, generator=gen).to(w_opt.device) * (w_std * schedule["noise_factor"] * fade)
        loss, synth, quality = problem(w_opt + w_noise, noise, everything)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if s.optimize_noise:
            _normalize_noise(noise)
        history.append(quality.cpu())
        if callback is not None:
            callback({"step": step, "steps": total, "loss": float(loss.detach()), "psnr": quality.cpu(),
                      "image": synth.detach()})
    return history


def _lbfgs_phase(problem: _Problem, w_opt: torch.Tensor, noise: dict[str, torch.Tensor], evaluations: int,
                 done: int, total: int, callback: Callable[[dict[str, Any]], None] | None) -> list[torch.Tensor]:
    """Refine each image's latent with L-BFGS (strong-Wolfe line search) for ``evaluations`` loss evaluations.

    Adam's step size stalls near a minimum; a quasi-Newton step does not, so the last part of the budget buys
    decibels where Adam buys fractions of one. Images run one at a time, so each result is independent of the batch.
    """
    if evaluations <= 0:
        return []
    s = problem.settings
    per_image: list[list[torch.Tensor]] = []
    for i in range(w_opt.shape[0]):
        index = slice(i, i + 1)
        w_i = w_opt[index].detach().clone().requires_grad_(True)
        noise_i = {k: v[index].detach().clone().requires_grad_(s.optimize_noise) for k, v in noise.items()}
        params = [w_i] + (list(noise_i.values()) if s.optimize_noise else [])
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=evaluations, max_eval=evaluations, history_size=20,
                                      tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")
        seen: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss, synth, quality = problem(w_i, noise_i, index)
            loss.backward()
            seen.append(quality.cpu())
            if callback is not None:
                callback({"step": done + i * evaluations + len(seen) - 1, "steps": total, "loss": float(loss.detach()),
                          "psnr": quality.cpu(), "image": synth.detach()})
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            w_opt[index] = w_i.detach()
            for k, v in noise.items():
                v[index] = noise_i[k].detach()
        per_image.append(seen + [seen[-1]] * (evaluations - len(seen)) if seen else [])
    return [torch.cat([p[k] for p in per_image]) for k in range(evaluations)] if all(per_image) else []


def project(G: nn.Module, target: torch.Tensor, settings: ProjectionSettings = ProjectionSettings(),
            degradation: Degradation = Degradation(), lpips: nn.Module | None = None,
            callback: Callable[[dict[str, Any]], None] | None = None, start: torch.Tensor | None = None,
            start_noise: dict[str, torch.Tensor] | None = None) -> Projection:
    """Project ``target`` (``[B, C, H, W]`` in [-1, 1], at the generator's resolution, or at 1/downscale of it
    for super-resolution) into ``settings.space``. Every image of the batch is optimised independently.

    ``callback`` gets ``{'step', 'steps', 'loss', 'psnr', 'image'}`` after every step; raising in it stops the run.
    """
    G = autograd_copy(G)
    device = next(G.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        target = target.detach().clone().to(device, torch.float32)
        degradation = degradation.detached()
        batch = target.shape[0]
        observed = degradation.observe(target, G.img_resolution)
        weights = degradation.weights(observed.shape, device)
        weights = weights.expand(batch, 1, *observed.shape[-2:]) if weights.shape[0] == 1 else weights
        w_avg, w_std, samples = w_statistics(G, settings.w_avg_samples, settings.seed)

        gen = torch.Generator().manual_seed(settings.seed)
        noise: dict[str, torch.Tensor] = {}
        for name, const in G.noise_maps().items():
            if settings.recipe == "nvlabs":
                first = torch.randn(batch, 1, *const.shape, generator=gen)
            else:
                first = const.detach().float().cpu().expand(batch, 1, *const.shape)
            noise[name] = first.to(device).clone()
        if start_noise:
            noise = {k: v.detach().clone().to(device, torch.float32) for k, v in start_noise.items()}
        if start is not None:
            start_w = start.detach().to(device, torch.float32)
        elif settings.init_candidates:
            picks = torch.randperm(samples.shape[0], generator=gen)[:settings.init_candidates].to(samples.device)
            candidates = torch.cat([w_avg[None], w_avg.lerp(samples[picks], 0.7)])
            start_w = _best_start(G, candidates, observed, degradation, weights, noise)
        else:
            start_w = w_avg[None].expand(batch, -1)
        if start_w.ndim == 2:
            start_w = start_w[:, None, :]
        rows = G.num_ws if settings.space == "w+" else 1
        w_opt = (start_w.expand(-1, rows, -1) if start_w.shape[1] == 1 else start_w[:, :rows])
        w_opt = w_opt.detach().clone().requires_grad_(True)
        for n in noise.values():
            n.requires_grad_(settings.optimize_noise)
        problem = _Problem(G, rows, observed, weights, degradation, settings, lpips)
        adam_steps = settings.adam_steps
        total = adam_steps + batch * (settings.steps - adam_steps)
        history = _adam_phase(problem, w_opt, noise, adam_steps, w_std, gen, total, callback)
        history += _lbfgs_phase(problem, w_opt, noise, settings.steps - adam_steps, adam_steps, total, callback)

        with torch.no_grad():
            ws = w_opt.detach().expand(-1, G.num_ws, -1) if rows == 1 else w_opt.detach()
            final_noise = {k: v.detach().clone() for k, v in noise.items()}
            image = _render(G, ws, final_noise)
        return Projection(ws=ws.clone(), noise=final_noise, image=image, psnr_history=history)
