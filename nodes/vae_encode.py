"""VAE encoding built for inversion: the posterior mean, optionally refined against the decoder."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch

from ..inversion.vae_refine import psnr, refine_latent
from ._api import RetraceNode, io, ui
from ._host import Differentiable


def encode_for_inversion(vae, image: torch.Tensor, refine_steps: int, refine_lr: float) -> tuple[torch.Tensor, float, float]:
    """Encode to the posterior mean and run ``refine_steps`` of decoder-side refinement.

    Returns the latent (LATENT space, on the host's intermediate device) and the PSNR of its decoding
    against the image before and after refinement.
    """
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"image must be [batch, height, width, channels>=3]; got {tuple(image.shape)}.")
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0; got {refine_steps}.")
    pixels = vae.vae_encode_crop_pixels(image[..., :3])
    latent = vae.encode(pixels)  # the host's regulariser returns the posterior mode, not a sample
    target = pixels.to(vae.device, torch.float32)

    comfy.model_management.load_models_gpu([vae.patcher])

    def decoder_of(decode_fn):
        return lambda z: vae.process_output(decode_fn(z.to(vae.device, vae.vae_dtype)).float()).movedim(1, -1)

    before = psnr(vae.decode(latent).to(target), target)
    if refine_steps == 0:
        return latent, before, before
    pbar = comfy.utils.ProgressBar(refine_steps)

    def on_step(i: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update(1)

    with torch.inference_mode(False), torch.enable_grad():
        decode = decoder_of(Differentiable(vae.first_stage_model, "decode"))
        z, _ = refine_latent(decode, latent.clone().to(vae.device), target.clone(), refine_steps, refine_lr, on_step)
        with torch.no_grad():
            after = psnr(decode(z), target)
    out_device = comfy.model_management.intermediate_device()
    return z.detach().to(out_device).clone(), before, after


class RetraceVAEEncodeForInversion(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceVAEEncodeForInversion",
            display_name="Retrace VAE Encode for Inversion",
            category="Retrace/encode",
            description="Encode an image deterministically (the posterior mean, never a sample) and optionally "
                        "refine the latent so the decoder reproduces the image more closely. Reports PSNR before "
                        "and after refinement.",
            inputs=[
                io.Image.Input("image", tooltip="The photo to invert (alpha is dropped); a side that is not a "
                                                "multiple of the VAE's factor (8) is cropped to one."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you will invert with; its latent channels "
                                            "must match that model's."),
                io.Int.Input("refine_steps", default=0, min=0, max=1000,
                             tooltip="Adam steps on the latent against the decoder; 0 is the plain encoder mean. Each step "
                                     "is one decode and its backward pass; the PSNR outputs show what they gained."),
                io.Float.Input("refine_lr", default=0.05, min=0.0001, max=1.0, step=0.0001, round=0.0001,
                               tooltip="Adam learning rate of the refinement."),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The posterior-mean latent (refined if refine_steps > 0); connect to "
                                         "Retrace Invert."),
                io.Float.Output("psnr_before", display_name="psnr_before", tooltip="PSNR (dB) of decode(encode(image))."),
                io.Float.Output("psnr_after", display_name="psnr_after", tooltip="PSNR (dB) after refinement."),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, vae, refine_steps: int, refine_lr: float) -> io.NodeOutput:
        latent, before, after = encode_for_inversion(vae, image, refine_steps, refine_lr)
        text = f"PSNR {before:.2f} dB -> {after:.2f} dB after {refine_steps} refinement steps"
        return io.NodeOutput({"samples": latent}, before, after, ui=ui.PreviewText(text))


NODES = [RetraceVAEEncodeForInversion]
