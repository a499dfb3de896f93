"""StyleGAN benchmarks: projection quality, steps to the published recipe's quality, pivotal tuning's gain."""

from __future__ import annotations

import logging
import time

import torch

from retrace.editing.directions import apply_direction, ganspace, sefa
from retrace.inversion.gan_projection import NVLABS, ProjectionSettings, project, psnr, sample_ws
from retrace.models import build_generator

from bench.timing import best_time
from retrace.inversion.pti import PTISettings, pivotal_tuning
from stylegan_files import tiny_generator

log = logging.getLogger("retrace.bench")

DESCRIPTIONS = {
    "gan_wplus_psnr": "tiny StyleGAN2 (32 px), 3 images it made from known W+ latents: PSNR after the default "
                      "projection (W+, 250 steps, retrace recipe, noise maps optimised)",
    "gan_w_psnr": "the same in W",
    "gan_nvlabs_w_psnr": "the published recipe (W, 1000 steps) on the same images",
    "gan_steps_to_target_ratio": "(steps + start search in step-equivalents, timed) the retrace recipe needs in W "
                                 "to reach gan_nvlabs_w_psnr, / 1000 (goal <= 0.25)",
    "gan_time_to_target_ratio": "wall time of that retrace run / wall time of the published 1000 steps (same run)",
    "gan_nvlabs_wplus_psnr": "the published recipe run in W+ (1000 steps)",
    "gan_steps_to_target_ratio_wplus": "the same ratio in W+",
    "gan_time_to_target_ratio_wplus": "the wall-time ratio in W+",
    "gan_pti_psnr_gain_db": "pivotal tuning (350 steps, 3e-4) on images another generator made, after a 250-step W "
                            "projection: PSNR gain",
    "gan_project_1024_ms_per_step": "GPU only: StyleGAN2 config F at 1024 px, random weights, one projection step",
    "sefa_ms": "SeFa over all 26 style layers (9,088 x 512 weights) of StyleGAN2 config F at 1024, random weights, CPU",
    "ganspace_ms": "GANSpace on the same generator: 10,000 w from the mapping network, then PCA (20 components), CPU",
    "direction_apply_ms": "one direction applied to a W+ latent (18 x 512), rows 0-7, CPU",
}
STEP_GRID = (25, 50, 75, 100, 150, 200, 250, 300, 400, 500, 750, 1000)


@torch.no_grad()
def known_wplus_images(G: torch.nn.Module, batch: int = 3, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ws = G.mapping(torch.randn(batch, G.z_dim, generator=gen), None, truncation_psi=0.8)
    spread = (ws - G.mapping.w_avg).norm(dim=-1, keepdim=True) / G.w_dim ** 0.5
    return G.synthesis(ws + 0.2 * spread * torch.randn(ws.shape, generator=gen), noise_mode="const")


def timed_psnr(G: torch.nn.Module, target: torch.Tensor, settings: ProjectionSettings) -> tuple[float, float]:
    """Mean PSNR of the projection's render, and the projection's wall time in seconds."""
    start = time.perf_counter()
    image = project(G, target, settings).image
    return float(psnr(image, target).mean()), time.perf_counter() - start


def mean_psnr(G: torch.nn.Module, target: torch.Tensor, settings: ProjectionSettings) -> float:
    return timed_psnr(G, target, settings)[0]


def search_in_steps(G: torch.nn.Module, target: torch.Tensor, space: str) -> float:
    """The best-of-N start search, in units of one optimisation step, timed: runs of 1 and 101 steps differ by
    100 steps and share the search."""
    _, one = timed_psnr(G, target, ProjectionSettings(space=space, steps=1))
    _, many = timed_psnr(G, target, ProjectionSettings(space=space, steps=101))
    per_step = (many - one) / 100
    return max(0.0, one - per_step) / per_step


def steps_to_reach(G: torch.nn.Module, target: torch.Tensor, space: str, goal: float) -> tuple[float, float]:
    """Fewest grid steps (plus the start search, in step-equivalents) that reach ``goal``, and that run's time."""
    search = search_in_steps(G, target, space)
    for steps in STEP_GRID:
        quality, seconds = timed_psnr(G, target, ProjectionSettings(space=space, steps=steps))
        if quality >= goal:
            return steps + search, seconds
    return float("inf"), float("inf")


def gpu_step_ms() -> float | None:
    if not torch.cuda.is_available():
        return None
    G = build_generator("stylegan2", dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3,
                                          channel_base=32768, channel_max=512)).cuda().eval().requires_grad_(False)
    target = torch.rand(1, 3, 1024, 1024, device="cuda") * 2 - 1
    settings = ProjectionSettings(steps=60, w_avg_samples=2000)
    project(G, target, ProjectionSettings(steps=5, w_avg_samples=2000))
    torch.cuda.synchronize()
    start = time.perf_counter()
    project(G, target, settings)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / settings.steps


def gan_metrics(quick: bool) -> dict[str, float]:
    G = tiny_generator("stylegan2", seed=0, img_resolution=32)
    target = known_wplus_images(G, batch=2 if quick else 3)
    metrics = {"gan_wplus_psnr": mean_psnr(G, target, ProjectionSettings()),
               "gan_w_psnr": mean_psnr(G, target, ProjectionSettings(space="w"))}
    metrics["gan_nvlabs_w_psnr"], published = timed_psnr(G, target, NVLABS)
    steps, seconds = steps_to_reach(G, target, "w", metrics["gan_nvlabs_w_psnr"])
    metrics["gan_steps_to_target_ratio"], metrics["gan_time_to_target_ratio"] = steps / 1000, seconds / published
    if not quick:
        nvlabs_wplus = ProjectionSettings(space="w+", steps=1000, recipe="nvlabs")
        metrics["gan_nvlabs_wplus_psnr"], published = timed_psnr(G, target, nvlabs_wplus)
        steps, seconds = steps_to_reach(G, target, "w+", metrics["gan_nvlabs_wplus_psnr"])
        metrics["gan_steps_to_target_ratio_wplus"] = steps / 1000
        metrics["gan_time_to_target_ratio_wplus"] = seconds / published
    other = tiny_generator("stylegan2", seed=7, img_resolution=32)
    with torch.no_grad():
        foreign = other(torch.randn(target.shape[0], 32, generator=torch.Generator().manual_seed(3)),
                        noise_mode="const")
    pivot = project(G, foreign, ProjectionSettings(space="w"))
    tuned = pivotal_tuning(G, pivot.ws, foreign, PTISettings(), noise=pivot.noise)
    metrics["gan_pti_psnr_gain_db"] = float((tuned.psnr_after - tuned.psnr_before).mean())
    step_ms = gpu_step_ms()
    if step_ms is not None:
        metrics["gan_project_1024_ms_per_step"] = step_ms
    log.info("gan: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


@torch.no_grad()
def direction_metrics(quick: bool) -> dict[str, float]:
    """Edit directions at full StyleGAN2-1024 size (random weights, CPU)."""
    G = build_generator("stylegan2", dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3,
                                          channel_base=32768, channel_max=512)).eval().requires_grad_(False)
    weights = [affine.weight for _, _, affine in G.style_layers()]
    vectors, _ = sefa(weights, 10)
    ws = G.mapping(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), None)
    metrics = {
        "sefa_ms": 1000 * best_time(lambda: sefa(weights, 10), 3),
        "ganspace_ms": 1000 * best_time(lambda: ganspace(sample_ws(G, 10_000, seed=0), 20), 1 if quick else 2),
        "direction_apply_ms": 1000 * best_time(lambda: apply_direction(ws, vectors[0], 2.0, (0, 8)), 50),
    }
    log.info("directions: %s", {k: round(v, 3) for k, v in metrics.items()})
    return metrics
