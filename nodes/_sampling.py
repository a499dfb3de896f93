"""The host SAMPLER (comfy.samplers.KSAMPLER) around Retrace's core solvers, and sampling a host guider with it:
shared by the sampler, inversion and null-text nodes."""

from __future__ import annotations

from typing import Any, Callable

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..inversion import samplers as core
from ._host import FAMILY_NAMES, base_model_of, family_of_sampling, step_callback

ALL_FAMILIES = ("eps", "v", "flow")
SOLVERS = ("euler", "midpoint")
SOLVER_TOOLTIP = ("euler: first order, 1 model call per step (deterministic DDIM). "
                  "midpoint: second order in the style of RF-Solver, 2 calls per step, about 4x smaller error per step doubling.")


class RetraceSampler(comfy.samplers.KSAMPLER):
    """A KSAMPLER that runs a Retrace core function and checks the model and schedule before it starts.

    Extra options that only Retrace nodes pass: ``retrace_record`` (a list that receives the latent at
    every sigma), ``retrace_start`` (a model-space latent to start from instead of the host's
    noise-scaled input) and ``retrace_source`` (the source latent in model space, for edit samplers).
    """

    def __init__(self, core_fn: Callable[..., torch.Tensor], options: dict[str, Any], method: str,
                 families: tuple[str, ...] = ALL_FAMILIES, direction: str = "any", needs_source: bool = False):
        self.core_fn, self.method, self.families, self.direction = core_fn, method, families, direction
        self.needs_source = needs_source
        super().__init__(self._run, extra_options=dict(options))

    def with_options(self, **options: Any) -> RetraceSampler:
        """A new sampler with more options; this one (perhaps a cached node output) stays as it is."""
        return RetraceSampler(self.core_fn, {**self.extra_options, **options}, self.method, self.families,
                              self.direction, self.needs_source)

    @property
    def settings(self) -> dict[str, Any]:
        """The user-facing options, for an inversion's metadata."""
        return {k: v for k, v in self.extra_options.items()
                if not k.startswith("retrace_") and isinstance(v, (int, float, str, bool))}

    def check_family(self, family: str) -> None:
        if family not in self.families:
            wanted = ", ".join(FAMILY_NAMES[f] for f in self.families)
            raise ValueError(f"{self.method} works on {wanted} models; this model is {FAMILY_NAMES[family]}.")

    def _run(self, model, x, sigmas, extra_args=None, callback=None, disable=None, retrace_record=None,
             retrace_start=None, retrace_source=None, source_latent=None, **options):
        base = base_model_of(model)
        family = family_of_sampling(base.model_sampling)
        self.check_family(family)
        ascending = bool(sigmas[-1] > sigmas[0])
        if self.direction == "invert" and not ascending:
            raise ValueError(f"{self.method} inverts: its sigmas must ascend. Put FlipSigmas (or Retrace Inversion "
                             "Sigmas) between the scheduler and the sampler.")
        if self.direction == "sample" and ascending:
            raise ValueError(f"{self.method} samples: its sigmas must descend from the inverted noise to the image.")
        if family == "flow" and ascending and float(sigmas[-1]) >= 1.0 and retrace_record is None:
            raise ValueError("this schedule inverts a flow model all the way to sigma 1, where the host divides the "
                             "result by 1 - sigma = 0. Use Retrace Inversion Sigmas instead of FlipSigmas, or Retrace Invert.")
        if retrace_start is not None:
            x = retrace_start.to(x)
        if self.needs_source:
            if source_latent is not None:
                options["source"] = base.process_latent_in(source_latent.to(x))
            elif retrace_source is not None:
                options["source"] = retrace_source.to(x)
            else:
                raise ValueError(f"{self.method} needs the source latent: connect it to the sampler node, "
                                 "or run it through Retrace Sample Inversion, which takes it from the inversion.")
        out = self.core_fn(model, x, sigmas, extra_args, step_callback(callback, retrace_record), disable, **options)
        if retrace_record is not None:
            retrace_record.append(out.detach().to(comfy.model_management.intermediate_device(), copy=True))
        return out


def ode_sampler(solver: str, direction: str = "any") -> RetraceSampler:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
    fn = core.sample_euler_ode if solver == "euler" else core.sample_midpoint_ode
    return RetraceSampler(fn, {}, solver, ALL_FAMILIES, direction)


def run_guider(guider, sampler: RetraceSampler, start: torch.Tensor, latent_shape_source: torch.Tensor, sigmas: torch.Tensor,
         model, **options) -> list[torch.Tensor]:
    """Sample through the host's guider with a Retrace sampler; return the latent at every sigma (model space)."""
    record: list[torch.Tensor] = []
    run = sampler.with_options(retrace_record=record, retrace_start=start, **options)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    noise = torch.zeros_like(latent_shape_source, device="cpu")
    guider.sample(noise, latent_shape_source, run, sigmas, callback=callback,
                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0)
    return record
