"""Retrace's core solvers as host SAMPLERs (comfy.samplers.KSAMPLER), for SamplerCustomAdvanced and Retrace nodes."""

from __future__ import annotations

from ..inversion import samplers as core
from ._api import RetraceNode, io
from ._sampling import SOLVER_TOOLTIP, SOLVERS, RetraceSampler, ode_sampler


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
