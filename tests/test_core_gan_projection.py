"""StyleGAN projection, restoration by projection and pivotal tuning on tiny seeded generators (no host)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retrace.inversion.gan_latent import GanLatent, concat_latents, load_gan_latent, save_gan_latent
from retrace.inversion.gan_projection import (
    Degradation,
    ProjectionSettings,
    lr_at,
    noise_regularization,
    project,
    psnr,
)
from retrace.inversion.pti import PTISettings, pivotal_tuning
from stylegan_files import tiny_generator

pytestmark = pytest.mark.core

SAMPLES = 2000  # w statistics: fewer than the published 10,000 keeps the tests fast


@pytest.fixture(scope="module")
def sg2() -> torch.nn.Module:
    return tiny_generator("stylegan2", seed=0)


@pytest.fixture(scope="module")
def sg3() -> torch.nn.Module:
    return tiny_generator("stylegan3", seed=0)


@torch.no_grad()
def known_wplus(G: torch.nn.Module, seed: int = 5, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A W+ latent off the mapping's output (each row moved on its own) and the image it renders."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, G.z_dim, generator=gen)
    ws = G.mapping(z, None, truncation_psi=0.8)
    spread = (ws - G.mapping.w_avg).norm(dim=-1, keepdim=True) / G.w_dim ** 0.5
    ws = ws + 0.2 * spread * torch.randn(ws.shape, generator=gen)
    return ws, G.synthesis(ws, noise_mode="const")


def region_psnr(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> float:
    return float(psnr(a, b, region).mean())


@pytest.mark.parametrize("family", ["stylegan2", "stylegan3"])
def test_wplus_projection_of_a_self_made_image_reaches_30_db(family: str, sg2, sg3) -> None:
    G = sg2 if family == "stylegan2" else sg3
    _, target = known_wplus(G)
    # The target was rendered with the generator's own noise maps; keep them (the published noise regulariser
    # would otherwise pull them off that particular draw).
    result = project(G, target, ProjectionSettings(space="w+", steps=250, optimize_noise=False, w_avg_samples=SAMPLES))
    quality = psnr(result.image, target)
    # Measured: StyleGAN2 64.9 / 68.7 dB, StyleGAN3 62.6 / 57.3 dB.
    assert float(quality.min()) >= 30.0, quality
    assert result.ws.shape == (2, G.num_ws, G.w_dim)


def test_w_projection_keeps_one_w_and_wplus_reconstructs_better(sg2) -> None:
    _, target = known_wplus(sg2)
    settings = dict(steps=150, optimize_noise=False, w_avg_samples=SAMPLES)
    in_w = project(sg2, target, ProjectionSettings(space="w", **settings))
    in_wplus = project(sg2, target, ProjectionSettings(space="w+", **settings))
    assert torch.equal(in_w.ws, in_w.ws[:, :1].expand_as(in_w.ws)), "a W latent has one w for every layer"
    # Measured: W+ 56.4 / 61.7 dB, W 41.0 / 39.2 dB.
    assert float(psnr(in_wplus.image, target).mean()) > float(psnr(in_w.image, target).mean()) + 5.0


def test_noise_maps_are_optimised_returned_and_reproduce_the_render(sg2) -> None:
    _, target = known_wplus(sg2)
    result = project(sg2, target, ProjectionSettings(steps=40, w_avg_samples=SAMPLES))
    const = sg2.noise_maps()
    assert set(result.noise) == set(const)
    for name, n in result.noise.items():
        assert n.shape == (2, 1, *const[name].shape)
        assert not torch.equal(n[0, 0], const[name]), f"noise map {name} was not optimised"
    start = {k: v.expand(2, 1, *v.shape).clone() for k, v in const.items()}
    assert float(noise_regularization(result.noise)) < float(noise_regularization(start))
    with torch.no_grad():
        again = sg2.synthesis(result.ws, noise_mode="const", noise=result.noise)
    torch.testing.assert_close(again, result.image, rtol=0, atol=1e-5)


def test_nvlabs_recipe_starts_at_w_avg_and_runs_every_step(sg2) -> None:
    _, target = known_wplus(sg2, batch=1)
    seen = []
    result = project(sg2, target, ProjectionSettings(space="w", steps=12, recipe="nvlabs", w_avg_samples=SAMPLES),
                     callback=lambda d: seen.append((d["step"], d["steps"])))
    assert seen == [(i, 12) for i in range(12)]
    assert len(result.psnr_history) == 12


def test_callback_counts_every_evaluation_and_can_stop_the_run(sg2) -> None:
    _, target = known_wplus(sg2)
    settings = ProjectionSettings(steps=20, w_avg_samples=SAMPLES)
    steps = []
    project(sg2, target, settings, callback=lambda d: steps.append((d["step"], d["steps"])))
    total = settings.adam_steps + 2 * (settings.steps - settings.adam_steps)
    assert steps[-1][1] == total and len(steps) <= total and steps[:settings.adam_steps] == \
        [(i, total) for i in range(settings.adam_steps)]

    class Interrupted(Exception):
        pass

    def stop(d: dict) -> None:
        if d["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        project(sg2, target, settings, callback=stop)


def test_batch_entries_are_projected_independently(sg2) -> None:
    _, target = known_wplus(sg2)
    settings = ProjectionSettings(steps=20, w_avg_samples=SAMPLES)
    both = project(sg2, target, settings)
    alone = project(sg2, target[1:], settings)
    torch.testing.assert_close(both.ws[1:], alone.ws, rtol=0, atol=1e-3)


def test_learning_rate_schedule() -> None:
    assert lr_at(0.0, 0.1, 0.05, 0.25) == 0.0
    assert lr_at(0.5, 0.1, 0.05, 0.25) == pytest.approx(0.1)
    assert lr_at(0.025, 0.1, 0.05, 0.25) == pytest.approx(0.05)
    assert lr_at(1 - 0.125, 0.1, 0.05, 0.25) == pytest.approx(0.05)
    assert lr_at(1.0, 0.1, 0.05, 0.25) == pytest.approx(0.0)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="space must be 'w' or 'w\\+', got 'z'"):
        ProjectionSettings(space="z")
    with pytest.raises(ValueError, match="recipe"):
        ProjectionSettings(recipe="magic")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        ProjectionSettings(steps=0)
    with pytest.raises(ValueError, match="downscale"):
        Degradation(downscale=0)


# --- restoration by projection -------------------------------------------------------------------------


def test_inpainting_fills_a_masked_quarter_closer_than_the_masked_input(sg2) -> None:
    _, original = known_wplus(sg2)
    hidden = torch.zeros(1, 1, 16, 16)
    hidden[..., :8, :8] = 1
    damaged = original * (1 - hidden)  # the hidden quarter is mid-gray
    result = project(sg2, damaged, ProjectionSettings(space="w", steps=150, optimize_noise=False, w_avg_samples=SAMPLES),
                     Degradation(known=1 - hidden))
    filled = region_psnr(result.image, original, hidden)
    given = region_psnr(damaged, original, hidden)
    # In W, the stronger prior (W+ fits the visible part with freedom to spare). Measured: 22.8 dB inside the
    # hidden quarter against 12.8 dB for the damaged input.
    assert filled > given + 6.0, (filled, given)


def test_super_resolution_4x_beats_upscaling_the_small_input(sg2) -> None:
    _, original = known_wplus(sg2)
    small = F.avg_pool2d(original, 4)
    result = project(sg2, small, ProjectionSettings(steps=150, optimize_noise=False, w_avg_samples=SAMPLES),
                     Degradation(downscale=4))
    upscaled = F.interpolate(small, scale_factor=4, mode="bicubic", align_corners=False)
    # Measured: 26.7 / 30.7 dB against 22.2 / 24.1 dB for bicubic upscaling (full image).
    assert float(psnr(result.image, original).mean()) > float(psnr(upscaled, original).mean()) + 3.0
    assert result.image.shape == original.shape


def test_colorization_compares_luminance_only(sg2) -> None:
    _, original = known_wplus(sg2)
    gray = Degradation(grayscale=True).observe(original, 16).expand(-1, 3, -1, -1)
    result = project(sg2, gray, ProjectionSettings(steps=150, optimize_noise=False, w_avg_samples=SAMPLES),
                     Degradation(grayscale=True))
    # Measured: 17.1 / 28.2 dB against 14.5 / 16.5 dB for the gray input.
    assert float(psnr(result.image, original).mean()) > float(psnr(gray, original).mean()) + 3.0


# --- pivotal tuning ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign(sg2) -> tuple[torch.Tensor, object]:
    """An image the tiny generator cannot make (another generator's render) and its W projection."""
    other = tiny_generator("stylegan2", seed=7)
    with torch.no_grad():
        target = other(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), noise_mode="const")
    return target, project(sg2, target, ProjectionSettings(space="w", steps=100, w_avg_samples=SAMPLES))


def test_pivotal_tuning_raises_psnr_and_leaves_the_generator_untouched(sg2, foreign) -> None:
    target, pivot = foreign
    before = {k: v.clone() for k, v in sg2.state_dict().items()}
    tuned = pivotal_tuning(sg2, pivot.ws, target, PTISettings(steps=350), noise=pivot.noise)
    # Measured: 15.7 / 15.7 dB at the pivot, 29.9 / 29.2 dB after 350 steps at the paper's 3e-4.
    assert float((tuned.psnr_after - tuned.psnr_before).min()) > 8.0, (tuned.psnr_before, tuned.psnr_after)
    assert tuned.steps_run == 350
    for k, v in sg2.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    params = dict(sg2.named_parameters())
    assert tuned.weights and set(tuned.weights) <= set(params)
    patched = tiny_generator("stylegan2", seed=0)
    with torch.no_grad():
        for k, w in tuned.weights.items():
            patched.get_parameter(k).copy_(w)
        again = patched.synthesis(pivot.ws, noise_mode="const", noise=pivot.noise)
    assert torch.equal(again, tuned.image)


def test_locality_regulariser_keeps_edits_near_the_pivot_closer_to_the_original(sg2, foreign) -> None:
    target, pivot = foreign
    direction = torch.randn(1, 1, sg2.w_dim, generator=torch.Generator().manual_seed(11))
    direction = 3 * direction / direction.norm()

    def edit_error(settings: PTISettings) -> float:
        tuned = pivotal_tuning(sg2, pivot.ws, target, settings, noise=pivot.noise)
        G = tiny_generator("stylegan2", seed=0)
        with torch.no_grad():
            for k, w in tuned.weights.items():
                G.get_parameter(k).copy_(w)
            far = pivot.ws + direction
            return float(F.mse_loss(G.synthesis(far, noise_mode="const"), sg2.synthesis(far, noise_mode="const")))

    free = edit_error(PTISettings(steps=150, learning_rate=1e-3))
    local = edit_error(PTISettings(steps=150, learning_rate=1e-3, locality_weight=10.0, locality_alpha=3.0))
    # Measured: mean squared drift 0.064 with the regulariser, 0.092 without.
    assert local < 0.85 * free, (local, free)


# --- the latent type -----------------------------------------------------------------------------------


def test_gan_latent_round_trip_and_refusals(tmp_path) -> None:
    ws = torch.randn(2, 6, 32)
    latent = GanLatent(ws=ws, space="w+", model_id="abc", family="stylegan2", noise={"b4.conv1": torch.randn(2, 1, 4, 4)})
    path = save_gan_latent(tmp_path / "l.safetensors", latent)
    back = load_gan_latent(path)
    assert torch.equal(back.ws, ws) and torch.equal(back.noise["b4.conv1"], latent.noise["b4.conv1"])
    assert (back.space, back.model_id, back.family) == ("w+", "abc", "stylegan2")
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_gan_latent(path, latent)
    with pytest.raises(ValueError, match=r"\[batch, num_ws, w_dim\]"):
        GanLatent(ws=torch.zeros(6, 32), space="w", model_id="", family="stylegan2")
    with pytest.raises(ValueError, match="noise map"):
        GanLatent(ws=ws, space="w+", model_id="", family="", noise={"x": torch.zeros(1, 1, 4, 4)})
    both = concat_latents([latent, latent.rows([0])])
    assert both.batch_size == 3 and both.noise["b4.conv1"].shape[0] == 3
