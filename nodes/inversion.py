"""Invert a latent to its noise and trajectory, and sample back from an inversion."""

from __future__ import annotations

import comfy.samplers
import comfy.utils
import torch

from ..inversion.record import Inversion
from ..inversion.schedules import SIGMA_FLOOR, inversion_sigmas, reconstruction_sigmas
from ._api import RetraceNode, io
from ._guidance import ScheduledGuider
from ._host import (Inversion as InversionType, check_fits, check_latent, check_steps_and_guidance, make_guider,
                    model_family, model_name)
from ._sampling import SOLVERS, RetraceSampler, ode_sampler, run_guider

# Highest sigma of a flow-model inversion schedule meant for SamplerCustomAdvanced: the host divides the
# result by (1 - sigma), so it must stay below 1. Mirrors FlipSigmas' floor at the other end.
FLOW_TOP_FOR_HOST = 1.0 - SIGMA_FLOOR


def schedule(model, scheduler: str, steps: int) -> torch.Tensor:
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def invert(model, latent: dict, positive: list, negative: list | None, steps: int, guidance: float, scheduler: str,
           sampler: RetraceSampler | None = None) -> tuple[dict, Inversion]:
    """The host path of an inversion: schedule, guider and sampler from the host, the solver from the core."""
    check_steps_and_guidance(steps, guidance)
    samples = check_latent(model, latent)
    family = model_family(model)
    sampler = sampler if sampler is not None else ode_sampler("euler")
    if not isinstance(sampler, RetraceSampler) or sampler.direction == "sample":
        raise ValueError("Retrace Invert needs an inversion sampler (Retrace Inversion Sampler or RF-Inversion "
                         f"Sampler (invert)); got {type(sampler).__name__} {getattr(sampler, 'method', '')}.")
    sampler.check_family(family)
    sigmas = inversion_sigmas(schedule(model, scheduler, steps))
    guider = make_guider(model, positive, negative, guidance)
    start = model.model.process_latent_in(samples.float())
    trajectory = torch.stack(run_guider(guider, sampler, start, samples, sigmas, model))
    inv = Inversion(trajectory=trajectory, sigmas=sigmas.float(), family=family, model_name=model_name(model),
                    method=sampler.method, guidance=float(guidance), extra={"scheduler": scheduler, **sampler.settings})
    out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
    out["samples"] = model.model.process_latent_out(inv.noise.clone())
    return out, inv


def sample_inversion(model, inversion: Inversion, positive: list, negative: list | None, guidance: float,
                     sampler: RetraceSampler | None = None) -> dict:
    """Run an inversion's schedule backwards from its noise, with any prompt: reconstruction or edit."""
    check_steps_and_guidance(inversion.steps, guidance)
    return sample_with_guider(model, inversion, make_guider(model, positive, negative, guidance), sampler)


def sample_with_guider(model, inversion: Inversion, guider, sampler: RetraceSampler | None = None) -> dict:
    """Sample back along the inversion's exact schedule from its noise, with any host guider."""
    check_fits(inversion, model, "the inversion")
    if sampler is None:
        solver = inversion.method if inversion.method in SOLVERS else inversion.extra.get("solver", "euler")
        sampler = ode_sampler(solver)
    if not isinstance(sampler, RetraceSampler) or sampler.direction == "invert":
        raise ValueError("sampling an inversion back needs a sampling sampler (Retrace Inversion Sampler or "
                         f"RF-Inversion Sampler (edit)); got {type(sampler).__name__} {getattr(sampler, 'method', '')}.")
    sampler.check_family(inversion.family)
    if isinstance(guider, ScheduledGuider):  # Retrace's per-step guiders: made from this inversion?
        guider.check_start(inversion.noise)
    shape_source = torch.zeros(inversion.latent_shape)
    record = run_guider(guider, sampler, inversion.noise, shape_source, reconstruction_sigmas(inversion.sigmas), model,
                        retrace_source=inversion.source)
    return {"samples": model.model.process_latent_out(record[-1])}


SCHEDULER_TOOLTIP = "The host's scheduler that spaces the sigmas (the same names as in KSampler)."


class RetraceInversionSigmas(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceInversionSigmas",
            display_name="Retrace Inversion Sigmas",
            category="Retrace/inversion",
            description="Ascending sigmas for inverting with SamplerCustomAdvanced: like FlipSigmas, but a flow "
                        "model's top sigma stays just below 1, where the host's final rescale would divide by zero.",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert; its sampling settings give the sigmas (a flow "
                                                "model's top sigma is capped at 1 - 1e-4)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               tooltip=SCHEDULER_TOOLTIP),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Number of inversion steps."),
            ],
            outputs=[io.Sigmas.Output(tooltip="Ascending sigmas; connect to SamplerCustomAdvanced with DisableNoise "
                                              "and a Retrace inversion sampler.")],
        )

    @classmethod
    def execute(cls, model, scheduler: str, steps: int) -> io.NodeOutput:
        check_steps_and_guidance(steps, 1.0)
        top = FLOW_TOP_FOR_HOST if model_family(model) == "flow" else None
        return io.NodeOutput(inversion_sigmas(schedule(model, scheduler, steps), flow_top=top))


class RetraceInvert(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceInvert",
            display_name="Retrace Invert",
            category="Retrace/inversion",
            description="Invert an encoded image to the noise the model would denoise into it: DDIM inversion for "
                        "SD1.x/SD2/SDXL, rectified-flow inversion for Flux/SD3. Returns the noise and the whole "
                        "trajectory (for Retrace Sample Inversion, null-text and direct inversion).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to invert into (SD1.x, SD2, SDXL, Flux, SD3); "
                                                "sample back with the same model."),
                io.Latent.Input("latent", tooltip="The image encoded by this model's VAE (Retrace VAE Encode for Inversion)."),
                io.Conditioning.Input("positive", tooltip="The prompt that describes the source image."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Inversion steps; sampling back uses the same schedule. 50 in the DDIM-inversion papers."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance while inverting. 1 (none) inverts most faithfully; "
                                       "any other value needs a negative."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               tooltip=SCHEDULER_TOOLTIP),
                io.Conditioning.Input("negative", optional=True, tooltip="Only needed for a guidance other than 1."),
                io.Sampler.Input("sampler", optional=True,
                                 tooltip="A Retrace inversion sampler (solver choice, RF-Inversion). Default: Euler / DDIM."),
            ],
            outputs=[
                io.Latent.Output("noise", display_name="noise", tooltip="The inverted noise latent."),
                InversionType.Output("inversion", display_name="inversion",
                                     tooltip="Noise, trajectory, sigmas and the model it belongs to."),
            ],
        )

    @classmethod
    def execute(cls, model, latent: dict, positive: list, steps: int, guidance: float, scheduler: str,
                negative: list | None = None, sampler=None) -> io.NodeOutput:
        out, inv = invert(model, latent, positive, negative, steps, guidance, scheduler, sampler)
        return io.NodeOutput(out, inv)


class RetraceSampleInversion(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceSampleInversion",
            display_name="Retrace Sample Inversion",
            category="Retrace/inversion",
            description="Sample back from an inversion along its own schedule. With the source prompt it "
                        "reconstructs the image; with a new prompt (or an edit sampler) it edits it.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with (the same checkpoint type)."),
                InversionType.Input("inversion", tooltip="From Retrace Invert or Retrace Load Inversion: the noise "
                                                         "to start from and the schedule to follow."),
                io.Conditioning.Input("positive", tooltip="Source prompt to reconstruct, target prompt to edit."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance. 1 reconstructs a plain inversion best; higher "
                                       "values edit harder but drift from the photo (for 7.5 use a null-text, "
                                       "negative-prompt or direct-inversion guider); Flux takes its guidance from "
                                       "the conditioning, so keep 1 there."),
                io.Conditioning.Input("negative", optional=True, tooltip="Only needed for a guidance other than 1."),
                io.Sampler.Input("sampler", optional=True,
                                 tooltip="A Retrace sampling sampler, e.g. RF-Inversion (edit). Default: the solver "
                                         "the inversion was made with."),
            ],
            outputs=[io.Latent.Output(tooltip="The reconstructed or edited latent; connect to VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, inversion: Inversion, positive: list, guidance: float, negative: list | None = None,
                sampler=None) -> io.NodeOutput:
        return io.NodeOutput(sample_inversion(model, inversion, positive, negative, guidance, sampler))


class RetraceSampleInversionGuided(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceSampleInversionGuided",
            display_name="Retrace Sample Inversion (Guider)",
            category="Retrace/inversion",
            description="Sample back from an inversion along its exact schedule with any guider: Retrace Null-Text, "
                        "Negative-Prompt or Direct Inversion Guider, or the host's CFGGuider.",
            inputs=[
                InversionType.Input("inversion", tooltip="From Retrace Invert or Retrace Load Inversion: the noise to "
                                                         "start from and the exact schedule to follow."),
                io.Guider.Input("guider", tooltip="Its model must be the one the inversion was made with."),
                io.Sampler.Input("sampler", optional=True,
                                 tooltip="A Retrace sampling sampler. Default: Euler (DDIM), which the null-text and "
                                         "direct-inversion guiders need."),
            ],
            outputs=[io.Latent.Output(tooltip="The reconstructed or edited latent; connect to VAE Decode, or to "
                                              "Attention Inject's source_result after a source pass.")],
        )

    @classmethod
    def execute(cls, inversion: Inversion, guider, sampler=None) -> io.NodeOutput:
        sampler = sampler if sampler is not None else ode_sampler("euler")
        return io.NodeOutput(sample_with_guider(guider.model_patcher, inversion, guider, sampler))


NODES = [RetraceInvert, RetraceSampleInversion, RetraceInversionSigmas, RetraceSampleInversionGuided]
