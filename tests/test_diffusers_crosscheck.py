"""Retrace's DDIM inversion against an independent implementation: diffusers' DDIMInverseScheduler.

One set of seeded random weights drives a diffusers ``UNet2DConditionModel`` (SD1.5 layout, one level) and
the host's SD1.5 UNet of the same shape (weights moved with the host's ``comfy.utils.unet_to_diffusers``
key map). Retrace integrates with its core Euler solver on the host's denoiser in the host's
variance-exploding scale; diffusers steps its own scheduler in the variance-preserving scale. The two
trajectories must agree step by step to about what the two UNets alone agree to.
"""

from __future__ import annotations

import logging

import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
diffusers = pytest.importorskip("diffusers")
ensure_host()

import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import tiny_models  # noqa: E402
from retrace.inversion import samplers as core  # noqa: E402

pytestmark = pytest.mark.host
log = logging.getLogger("retrace.tests")

# SD1.5 family at one level: 320 channels, 8 heads (diffusers calls the head count attention_head_dim),
# CLIP-L context 768; one res block and one transformer per block, as the host's SD15 config expects.
DIFFUSERS_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (320,),
    "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
    "layers_per_block": 1, "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
}
HOST_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1],
    "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# SD1.5's training schedule, as the host's SD15 model_sampling builds it.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1, "timestep_spacing": "leading"}
INFERENCE_STEPS = 10

# Measured: the two UNets agree to 6e-7 relative in float32 (different attention kernels and summation
# order) and the trajectories to 1e-6 over nine steps. 1e-3 leaves room for other CPUs and torch builds,
# and still separates "same algorithm" from any misalignment: evaluating eps at the next timestep instead
# of the current one (the usual shortcut in diffusers' inversion pipelines) differs by about 0.19.
UNET_TOL = 1e-3
TRAJECTORY_TOL = 1e-3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def unets() -> tuple:
    """(diffusers UNet, host SD15 BaseModel) with the same seeded weights."""
    torch.manual_seed(0)  # diffusers initialises before we overwrite; keep even that reproducible
    theirs = diffusers.UNet2DConditionModel(**DIFFUSERS_CONFIG).eval()
    tiny_models.fill_weights(theirs, seed=11)
    config = comfy.supported_models.SD15(HOST_CONFIG)
    config.set_inference_dtype(torch.float32, None)
    ours = config.get_model({}).to(torch.float32).eval()
    key_map = comfy.utils.unet_to_diffusers(ours.model_config.unet_config)
    source = theirs.state_dict()
    target = ours.diffusion_model.state_dict()
    moved = {key_map[k]: v for k, v in source.items() if k in key_map}
    assert sorted(k for k in source if k not in key_map) == [], "diffusers tensors the host map does not know"
    assert sorted(set(target) - set(moved)) == [], "host tensors left uninitialised"
    missing, unexpected = ours.diffusion_model.load_state_dict(moved, strict=True)
    assert not missing and not unexpected
    log.info("moved %d tensors from diffusers to the host UNet", len(moved))
    return theirs, ours


def test_unets_agree(unets: tuple) -> None:
    """The host UNet and the diffusers UNet are the same function (this bounds the trajectory tolerance)."""
    theirs, ours = unets
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((2, 4, 8, 8), generator=generator)
    context = torch.randn((2, 77, 768), generator=generator)
    for t in (1, 501, 901):
        timesteps = torch.full((2,), float(t))
        with torch.no_grad():
            a = theirs(x, timesteps, encoder_hidden_states=context).sample
            b = ours.diffusion_model(x, timesteps, context=context)
        diff = rel(b, a)
        log.info("UNets at t=%d: rel diff %.3g, abs %.3g (output scale %.3g)", t, diff,
                 float((a - b).abs().max()), float(a.abs().max()))
        assert diff <= UNET_TOL
        assert float(a.abs().max()) > 0.1  # a real output, not a degenerate zero network


def diffusers_inversion(unet, x_vp: torch.Tensor, context: torch.Tensor, aligned: bool = True) -> list[torch.Tensor]:
    """DDIM inversion with diffusers' DDIMInverseScheduler, one latent per timestep.

    ``step(eps, t, x)`` moves ``x`` from ``t - ratio`` (its internal ``timestep``, the current level) to
    ``t`` (its ``prev_timestep``, the noisier target): ``x0 = (x - sqrt(1 - a_cur) eps) / sqrt(a_cur)``,
    ``x' = sqrt(a_next) x0 + sqrt(1 - a_next) eps``. Retrace's DDIM inversion evaluates eps at the current
    point and moves to the next one, so the aligned loop evaluates the UNet at ``ts[i]`` and calls
    ``step(eps, ts[i + 1], x)``: with leading spacing ``ts[i + 1] - ratio == ts[i]``, so the step goes
    exactly from ``ts[i]`` to ``ts[i + 1]``. In the VE scale ``x_ve = x_vp / sqrt(a)``,
    ``sigma = sqrt((1 - a) / a)`` this is ``x_ve' = x_ve + (sigma' - sigma) eps``: the Euler step.
    ``aligned=False`` evaluates eps at the target ``ts[i + 1]`` instead (the pipelines' shortcut).
    """
    scheduler = diffusers.DDIMInverseScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(INFERENCE_STEPS)
    ts = [int(t) for t in scheduler.timesteps]
    out = [x_vp]
    with torch.no_grad():
        for i in range(len(ts) - 1):
            t_eval = ts[i] if aligned else ts[i + 1]
            eps = unet(x_vp, torch.tensor([t_eval]), encoder_hidden_states=context).sample
            x_vp = scheduler.step(eps, ts[i + 1], x_vp).prev_sample
            out.append(x_vp)
    return out


def test_ddim_inversion_matches_diffusers(unets: tuple) -> None:
    theirs, ours = unets
    scheduler = diffusers.DDIMInverseScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(INFERENCE_STEPS)
    timesteps = scheduler.timesteps.float()
    assert timesteps.tolist() == [1 + 100 * i for i in range(INFERENCE_STEPS)]

    # The two implementations must share the noise schedule for the comparison to mean anything.
    sigmas = ours.model_sampling.sigma(timesteps).float()
    theirs_sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()[timesteps.long()]
    assert rel(sigmas, theirs_sigmas) <= 1e-5
    assert torch.equal(ours.model_sampling.timestep(sigmas).float(), timesteps)

    cond = [[torch.randn((1, 77, 768), generator=torch.Generator().manual_seed(2)), {}]]
    x_ve = tiny_models.latent("sd15", seed=4)["samples"] * 0.18215  # model space, about unit spread
    record: list[torch.Tensor] = []
    with torch.inference_mode():
        patcher = comfy.model_patcher.ModelPatcher(ours, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
        final = core.sample_euler_ode(tiny_models.host_denoiser(patcher, cond), x_ve, sigmas,
                                      callback=lambda d: record.append(d["x"]))
    ours_vp = [x / (1 + s**2).sqrt() for x, s in zip([*record, final], sigmas)]

    theirs_vp = diffusers_inversion(theirs, ours_vp[0].clone(), cond[0][0])
    assert len(theirs_vp) == len(ours_vp) == INFERENCE_STEPS
    diffs = [rel(a, b) for a, b in zip(ours_vp, theirs_vp)]
    log.info("Retrace vs diffusers DDIM inversion, rel diff per step: %s", ", ".join(f"{d:.2g}" for d in diffs))
    assert max(diffs) <= TRAJECTORY_TOL
    assert rel(ours_vp[-1], ours_vp[0]) > 0.5  # the inversion went somewhere

    # The tolerance tells alignments apart: eps taken at the next timestep is a different algorithm.
    shortcut = diffusers_inversion(theirs, ours_vp[0].clone(), cond[0][0], aligned=False)
    off = max(rel(a, b) for a, b in zip(ours_vp, shortcut))
    log.info("eps at the next timestep instead: rel diff %.3g", off)
    assert off > 10 * TRAJECTORY_TOL
