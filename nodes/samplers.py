"""Retrace's core solvers as host SAMPLERs (comfy.samplers.KSAMPLER), for SamplerCustomAdvanced and Retrace nodes."""

from __future__ import annotations

from typing import Any, Callable

import comfy.model_management
import comfy.samplers
import torch

from ..inversion import samplers as core
from ._api import RetraceNode, io
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


class RetraceInversionSampler(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceInversionSampler",
            display_name="Retrace Inversion Sampler (DDIM / RF)",
            category="Retrace/inversion/samplers",
            description="Deterministic ODE sampler for inversion: DDIM inversion on eps/v models (SD1.x, SD2, SDXL), "
                        "Euler or RF-Solver-style inversion on flow models (Flux, SD3). Use with SamplerCustomAdvanced, "
                        "DisableNoise and ascending sigmas (FlipSigmas or Retrace Inversion Sigmas); with descending "
                        "sigmas it samples back.",
            inputs=[io.Combo.Input("solver", options=list(SOLVERS), default="euler", tooltip=SOLVER_TOOLTIP)],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustomAdvanced, or to the sampler input of Retrace "
                                               "Invert, Sample Inversion or Sample Inversion (Guider).")],
        )

    @classmethod
    def execute(cls, solver: str) -> io.NodeOutput:
        return io.NodeOutput(ode_sampler(solver))


class RetraceRFInversionSampler(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceRFInversionSampler",
            display_name="Retrace RF-Inversion Sampler (invert)",
            category="Retrace/inversion/samplers",
            description="RF-Inversion's controlled forward ODE (Rout et al., ICLR 2025) for flow models (Flux, SD3): "
                        "the inversion is steered toward a fixed noise sample so the result is editable.",
            inputs=[
                io.Float.Input("gamma", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Controller strength: 0 is plain inversion (faithful), 1 lands on the noise sample "
                                       "(editable). Paper default 0.5."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the noise sample the controller steers toward."),
                io.Combo.Input("solver", options=list(SOLVERS), default="euler", tooltip=SOLVER_TOOLTIP),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to Retrace Invert's sampler (or to SamplerCustomAdvanced "
                                               "with Retrace Inversion Sigmas).")],
        )

    @classmethod
    def execute(cls, gamma: float, seed: int, solver: str) -> io.NodeOutput:
        options = {"gamma": gamma, "seed": seed, "solver": solver}
        return io.NodeOutput(RetraceSampler(core.sample_rf_inversion, options, "rf_inversion", ("flow",), "invert"))


class RetraceRFInversionEditSampler(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceRFInversionEditSampler",
            display_name="Retrace RF-Inversion Sampler (edit)",
            category="Retrace/inversion/samplers",
            description="RF-Inversion's controlled reverse ODE (Rout et al., ICLR 2025) for flow models: while "
                        "sampling with the new prompt, pull toward the source image with strength eta over a step range.",
            inputs=[
                io.Float.Input("eta", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Pull toward the source: 0 ignores it, 1 follows it. Paper default 0.9."),
                io.Int.Input("start_step", default=0, min=0, max=10000, tooltip="First step with the pull."),
                io.Int.Input("stop_step", default=7, min=0, max=10000,
                             tooltip="Step at which the pull ends (exclusive). Paper default 7 of 28."),
                io.Combo.Input("eta_trend", options=list(core.ETA_TRENDS), default="constant",
                               tooltip="How eta changes across [start_step, stop_step)."),
                io.Combo.Input("solver", options=list(SOLVERS), default="euler", tooltip=SOLVER_TOOLTIP),
                io.Latent.Input("source", optional=True,
                                tooltip="The encoded source image. Leave empty under Retrace Sample Inversion, "
                                        "which takes it from the inversion."),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to Retrace Sample Inversion's sampler (or Sample Inversion "
                                               "(Guider)); the edit prompt goes to its positive.")],
        )

    @classmethod
    def execute(cls, eta: float, start_step: int, stop_step: int, eta_trend: str, solver: str,
                source: dict | None = None) -> io.NodeOutput:
        if stop_step < start_step:
            raise ValueError(f"stop_step ({stop_step}) must not be before start_step ({start_step}).")
        options = {"eta": eta, "start_step": start_step, "stop_step": stop_step, "eta_trend": eta_trend,
                   "solver": solver}
        if source is not None:
            options["source_latent"] = source["samples"]
        return io.NodeOutput(RetraceSampler(core.sample_rf_inversion_edit, options, "rf_inversion_edit", ("flow",),
                                            "sample", needs_source=True))


NODES = [RetraceInversionSampler, RetraceRFInversionSampler, RetraceRFInversionEditSampler]
