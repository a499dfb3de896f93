"""Guiders that act per sampling step of a known schedule (null-text, direct inversion), for SamplerCustomAdvanced."""

from __future__ import annotations

from typing import Any

import comfy.conds
import comfy.samplers
import torch

from ..inversion.record import fingerprint, same_fingerprint
from ..inversion.schedules import step_index
from ._host import InversionCFGGuider

SCHEDULE_FIX = ("Sample with the inversion's own schedule: Retrace Sample Inversion (Guider), or BasicScheduler "
                "with the scheduler and steps the inversion used.")


def with_crossattn(conds: list[dict], embedding: torch.Tensor) -> list[dict]:
    """A copy of processed host conds whose cross-attention embedding is ``embedding`` (the originals stay)."""
    return [{**c, "model_conds": {**c["model_conds"], "c_crossattn": comfy.conds.CONDCrossAttn(embedding)}}
            for c in conds]


class ScheduledGuider(InversionCFGGuider):
    """A CFGGuider bound to one inversion schedule and latent shape, checked before sampling starts."""

    what = "this guider"

    def __init__(self, model: Any, step_sigmas: torch.Tensor, latent_shape: tuple[int, ...],
                 made_for: str, fix: str, start: list[float] | None = None):
        super().__init__(model)
        self.step_sigmas = step_sigmas.detach().cpu()
        self.latent_shape = tuple(latent_shape)
        self.made_for, self.fix = made_for, fix
        self.start = start  # the fingerprint of the inverted noise it was made from (None: unknown, not checked)

    def check_start(self, noise: torch.Tensor) -> None:
        """Refuse to sample from another inversion's noise (model space): the per-step terms would not apply."""
        if self.start is not None and not same_fingerprint(self.start, fingerprint(noise)):
            raise ValueError(f"{self.what} was made from another inversion: the noise it is given is not the one it "
                             "was made from. Connect the noise (LATENT) of the Retrace Invert run it came from, or "
                             "make it again from this inversion.")

    def step_of(self, sigma: torch.Tensor) -> int:
        k = step_index(self.step_sigmas, sigma)
        if k is None:
            raise ValueError(f"{self.what} has no step at sigma {float(sigma.flatten()[0]):.6g}. {self.fix}")
        return k

    def check_schedule(self, sigmas: torch.Tensor) -> None:
        starts = sigmas[:-1].detach().cpu()
        unknown = [float(s) for s in starts if step_index(self.step_sigmas, s) is None]
        if unknown or len(starts) > len(self.step_sigmas):
            raise ValueError(
                f"{self.what} was made for {self.made_for}: {len(self.step_sigmas)} steps from sigma "
                f"{float(self.step_sigmas[0]):.4g} down to {float(self.step_sigmas[-1]):.4g}; the sampler's schedule "
                f"has {len(starts)} steps from {float(starts[0]):.4g} and {len(unknown)} sigmas that are not among "
                f"them (first: {unknown[0] if unknown else 'none'}). {self.fix}")

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if tuple(latent_image.shape) != self.latent_shape:
            raise ValueError(f"{self.what} was made for a latent of shape {list(self.latent_shape)}; this latent is "
                             f"{list(latent_image.shape)}. Use the latent (the noise) of the inversion it was made from.")
        self.check_schedule(sigmas)
        if torch.any(latent_image):  # SamplerCustomAdvanced: the latent is the noise (Retrace's own path passes zeros)
            self.check_start(self.model_patcher.model.process_latent_in(latent_image.float()))
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
