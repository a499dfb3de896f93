"""Project photos into a StyleGAN (W / W+, with restoration by a degraded loss) and tune it around the pivot."""

from __future__ import annotations

import torch

from ..inversion.gan_latent import GanLatent
from ..inversion.gan_projection import Degradation, ProjectionSettings, project
from ..inversion.pti import PTISettings, pivotal_tuning
from ._api import RetraceNode, io
from ._stylegan import (
    ON_MISMATCH,
    GanLatentType,
    StyleGAN,
    StyleGANType,
    check_latent_fits,
    fit_image,
    fit_mask,
    latent_noise,
    lpips_network,
    perceptual_exists,
    perceptual_options,
    progress,
    register_folders,
    tensor_to_image,
    tuned_copy,
)

CATEGORY = "Retrace/stylegan"
SPACES = {"W+": "w+", "W": "w"}
RECIPES = {"retrace (fast)": "retrace", "nvlabs (published, 1000 steps)": "nvlabs"}

LPIPS_TOOLTIP = ("LPIPS perceptual loss from a torchvision VGG16 (vgg16-397923af.pth) or AlexNet "
                 "(alexnet-owt-7be5be79.pth) file in models/retrace_perceptual/; LPIPS' lin weights (vgg.pth, "
                 "alex.pth) in the same folder are used with the matching trunk. none = pixel MSE and SSIM only.")
MISMATCH_TOOLTIP = ("An image whose size or channels do not fit the generator: resize (centre crop to a square, then "
                    "resize) or refuse with an error.")


class RetraceStyleGANProject(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folders()
        return io.Schema(
            node_id="RetraceStyleGANProject",
            display_name="Retrace StyleGAN Project",
            category=CATEGORY,
            description="Find the latent that renders the image (Karras et al. 2020 projector: Adam on w from the "
                        "mean, latent noise ramp, optimised noise maps). With a mask, a downscale factor or "
                        "grayscale, only what the input shows is compared, so the render fills in the rest "
                        "(inpainting, super-resolution, colorization).",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="From Retrace Load StyleGAN (or a tuned copy)."),
                io.Image.Input("image", tooltip="One or more photos; each is projected on its own."),
                io.Combo.Input("space", options=list(SPACES), default="W+",
                               tooltip="W+: one w per layer (closer reconstructions). W: one w for all layers "
                                       "(more editable)."),
                io.Int.Input("steps", default=250, min=1, max=10000,
                             tooltip="Optimisation steps. The published recipe uses 1000."),
                io.Combo.Input("recipe", options=list(RECIPES), default="retrace (fast)",
                               tooltip="retrace: best-of-64 start, the model's noise maps, Adam then L-BFGS. nvlabs: "
                                       "the published projector (start at w_avg, random noise maps)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=0.005,
                               tooltip="Peak Adam learning rate; 0 = the recipe's own (0.1 published, 0.03 retrace)."),
                io.Boolean.Input("optimize_noise", default=True,
                                 tooltip="Optimise the noise maps too (StyleGAN2); they are returned in the latent."),
                io.Combo.Input("lpips_backbone", options=perceptual_options(), default="none", tooltip=LPIPS_TOOLTIP),
                io.Float.Input("ssim_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the SSIM term beside pixel MSE (weight 1)."),
                io.Int.Input("downscale", default=1, min=1, max=16,
                             tooltip="Super-resolution: the input is this many times smaller than the generator's "
                                     "output (or full size, then downscaled); the downscaled render is compared."),
                io.Boolean.Input("grayscale", default=False,
                                 tooltip="Colorization: compare luminance only; the render brings the colours."),
                io.Combo.Input("on_mismatch", options=list(ON_MISMATCH), default="resize", tooltip=MISMATCH_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1,
                             tooltip="Seeds the latent noise and the start candidates."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Inpainting: masked pixels (1) do not count; the render fills them. Use space W: "
                                      "W+ can fit the visible part without constraining the hole."),
            ],
            outputs=[GanLatentType.Output(display_name="latent",
                                          tooltip="The found W/W+ latent with its optimised noise maps; render it "
                                                  "with Generate, edit it with Apply Direction or tune around it "
                                                  "with Pivotal Tuning."),
                     io.Image.Output(display_name="image",
                                     tooltip="The render of the found latent (the reconstruction, with the "
                                             "filled-in parts), at the generator's resolution.")],
        )

    @classmethod
    def validate_inputs(cls, lpips_backbone: str) -> bool | str:
        return perceptual_exists(lpips_backbone)

    @classmethod
    def execute(cls, stylegan: StyleGAN, image: torch.Tensor, space: str, steps: int, recipe: str,
                learning_rate: float, optimize_noise: bool, lpips_backbone: str, ssim_weight: float, downscale: int,
                grayscale: bool, on_mismatch: str, seed: int, mask: torch.Tensor | None = None) -> io.NodeOutput:
        info = stylegan.info
        size = info.img_resolution
        if size % downscale:
            raise ValueError(f"downscale {downscale} does not divide the generator's size {size}; use a power of two")
        low_res = size // downscale
        input_size = size if image.shape[1:3] == (size, size) and downscale > 1 else low_res
        target = fit_image(image, input_size, info.img_channels, on_mismatch)
        known = None if mask is None else fit_mask(mask, target.shape[0], size)
        if known is not None and input_size != size:
            raise ValueError("give a mask with a full-size image; a mask on a low-resolution input is not supported")
        settings = ProjectionSettings(space=SPACES[space], steps=steps, recipe=RECIPES[recipe],
                                      learning_rate=learning_rate or None, optimize_noise=optimize_noise,
                                      ssim_weight=ssim_weight, seed=seed)
        degradation = Degradation(known=known, downscale=downscale, grayscale=grayscale)
        G = stylegan.load()
        device = next(G.parameters()).device
        lpips = lpips_network(lpips_backbone, device)
        result = project(G, target.to(device), settings, degradation, lpips, progress(steps, "projection"))
        latent = GanLatent(ws=result.ws.float().cpu(), space=settings.space, model_id=stylegan.model_id,
                           family=stylegan.family, noise={k: v.cpu() for k, v in result.noise.items()})
        return io.NodeOutput(latent, tensor_to_image(result.image))


class RetraceStyleGANPivotalTuning(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folders()
        return io.Schema(
            node_id="RetraceStyleGANPivotalTuning",
            display_name="Retrace StyleGAN Pivotal Tuning",
            category=CATEGORY,
            description="Pivotal tuning (Roich et al. 2022): fine-tune a copy of the generator so the projected "
                        "latent renders the photo exactly. The output is a patched copy; the loaded generator is "
                        "never changed. Edit the latent and render it with the tuned generator.",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="The generator the pivot was projected with."),
                io.Image.Input("image", tooltip="The photos the latents were projected from (same batch order)."),
                GanLatentType.Input("latent", tooltip="The pivot: the projection of the image (W in the paper)."),
                io.Int.Input("steps", default=350, min=1, max=10000, tooltip="Tuning steps (350 in the paper)."),
                io.Float.Input("learning_rate", default=3e-4, min=1e-6, max=1e-1, step=1e-5,
                               tooltip="Adam learning rate for the generator's weights (3e-4 in the paper)."),
                io.Float.Input("locality_weight", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Locality regulariser (eq. 4): keeps renders of latents near the pivot as the "
                                       "original made them. 0 = off; the paper uses 0.1."),
                io.Float.Input("locality_distance", default=30.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="How far from the pivot the regulariser samples (alpha, 30 in the paper)."),
                io.Combo.Input("lpips_backbone", options=perceptual_options(), default="none", tooltip=LPIPS_TOOLTIP),
                io.Combo.Input("on_mismatch", options=list(ON_MISMATCH), default="resize", tooltip=MISMATCH_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seeds the regulariser's samples."),
            ],
            outputs=[StyleGANType.Output(display_name="stylegan",
                                          tooltip="A tuned copy of the generator (the loaded one is unchanged); "
                                                  "render the pivot and its edits with it in Generate or Sweep."),
                     io.Image.Output(display_name="image",
                                     tooltip="The tuned copy's render of the pivot, to compare with the photo.")],
        )

    @classmethod
    def validate_inputs(cls, lpips_backbone: str) -> bool | str:
        return perceptual_exists(lpips_backbone)

    @classmethod
    def execute(cls, stylegan: StyleGAN, image: torch.Tensor, latent: GanLatent, steps: int, learning_rate: float,
                locality_weight: float, locality_distance: float, lpips_backbone: str, on_mismatch: str,
                seed: int) -> io.NodeOutput:
        check_latent_fits(latent, stylegan, "pivot latent")
        info = stylegan.info
        target = fit_image(image, info.img_resolution, info.img_channels, on_mismatch)
        if target.shape[0] != latent.batch_size:
            raise ValueError(f"{target.shape[0]} images but {latent.batch_size} pivot latents; give one latent per "
                             "image (the projection of this image batch)")
        settings = PTISettings(steps=steps, learning_rate=learning_rate, locality_weight=locality_weight,
                               locality_alpha=locality_distance, seed=seed)
        G = stylegan.load()
        device = next(G.parameters()).device
        lpips = lpips_network(lpips_backbone, device)
        result = pivotal_tuning(G, latent.ws.to(device), target.to(device), settings, latent_noise(latent, device),
                                lpips=lpips, callback=progress(steps, "pivotal tuning"))
        tuned = tuned_copy(stylegan, result.weights)
        return io.NodeOutput(tuned, tensor_to_image(result.image))


NODES: list[type[io.ComfyNode]] = [RetraceStyleGANProject, RetraceStyleGANPivotalTuning]
