"""The cheap relatives of null-text: negative-prompt inversion and direct inversion, as host guiders."""

from __future__ import annotations

from typing import Any

import comfy.samplers

from ..inversion.direct import corrected_denoised, trajectory_denoised
from ..inversion.record import Inversion, fingerprint
from ._api import RetraceNode, io
from ._attention_hooks import records_attention, source_branch_options, store_of
from ._guidance import SCHEDULE_FIX, ScheduledGuider
from ._host import Inversion as InversionType, check_conditioning, check_fits, check_steps_and_guidance, make_guider

GUIDANCE_TOOLTIP = "Classifier-free guidance to reconstruct or edit with (7.5 in the papers)."


SOURCE_BRANCH = "direct_inversion_source"


class DirectInversionGuider(ScheduledGuider):
    """CFG plus, at every step, what the guided source branch misses of the inverted trajectory
    (Ju et al. 2024, Algorithm 1). A target prompt gets the source branch's corrections. With the source prompt
    itself (the same CONDITIONING wired to positive and source) the guider is the source branch, which follows
    the trajectory exactly without evaluating the model."""

    what = "this direct-inversion guider"

    def __init__(self, model: Any, inversion: Inversion, positive: list, source: list, negative: list,
                 guidance: float):
        super().__init__(model, inversion.sigmas.flip(0)[:-1], inversion.latent_shape, "the inversion it was given",
                         SCHEDULE_FIX, start=fingerprint(inversion.noise))
        self.on_path = inversion.trajectory.flip(0)[:-1]  # the inverted latent each sampling step starts from
        self.targets = trajectory_denoised(inversion.trajectory, inversion.sigmas)
        self.reconstructs = positive is source
        # What the source branch's estimates depend on: the source pass keeps them in its attention store, and an
        # edit pass from the same inversion, prompts and guidance reuses them instead of calling the model again.
        self.branch_origin = (inversion, source, negative, float(guidance))
        self.inner_set_conds({"positive": positive, "source": source, "negative": negative})
        self.set_cfg(guidance)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (the host's signature)
        k = self.step_of(timestep)
        target = self.targets[k].to(x)
        recording = records_attention(model_options)
        if self.reconstructs and not recording:  # the source branch is the inverted trajectory: its estimate is D*
            return target
        negative = self.conds.get("negative")
        store = store_of(model_options)
        source = None if store is None or recording else store.branch(SOURCE_BRANCH, self.branch_origin, k)
        if source is None:
            # The source branch on the trajectory: an attention store records it when reconstructing; otherwise it
            # is marked, so that neither a store nor an inject touches it.
            branch = model_options if self.reconstructs else source_branch_options(model_options)
            source = comfy.samplers.sampling_function(self.inner_model, self.on_path[k].to(x), timestep, negative,
                                                      self.conds["source"], self.cfg, model_options=branch, seed=seed)
        else:
            source = source.to(x)
        if self.reconstructs:
            if store is not None and recording:
                store.put_branch(SOURCE_BRANCH, self.branch_origin, k, source)
            return target
        denoised = comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, self.conds["positive"],
                                                    self.cfg, model_options=model_options, seed=seed)
        return corrected_denoised(denoised, source, target)


class RetraceNegativePromptGuider(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceNegativePromptGuider",
            display_name="Retrace Negative-Prompt Inversion Guider",
            category="Retrace/inversion/guidance",
            description="Negative-prompt inversion (Miyake et al. 2023): the source prompt takes the place of the "
                        "unconditional embedding, so full guidance reconstructs about as well as null-text with no "
                        "optimisation at all. Use with Retrace Sample Inversion (Guider) or SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The model the image was inverted with, or a patched clone of it from "
                                                "Retrace Attention Store / Inject."),
                io.Conditioning.Input("positive", tooltip="The target prompt to edit with (the source prompt reconstructs)."),
                io.Conditioning.Input("source", tooltip="The prompt that describes the source image, used as the negative."),
                io.Float.Input("guidance", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip=GUIDANCE_TOOLTIP),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to Retrace Sample Inversion (Guider), or to "
                                              "SamplerCustomAdvanced with the inversion's noise and exact schedule.")],
        )

    @classmethod
    def execute(cls, model, positive: list, source: list, guidance: float) -> io.NodeOutput:
        check_steps_and_guidance(1, guidance)
        return io.NodeOutput(make_guider(model, positive, source, guidance))


class RetraceDirectInversionGuider(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceDirectInversionGuider",
            display_name="Retrace Direct Inversion Guider",
            category="Retrace/inversion/guidance",
            description="Direct inversion (Ju et al., ICLR 2024, 'PnP Inversion'): each step adds back what the "
                        "guided source branch misses of the inverted trajectory, so the source prompt reconstructs "
                        "exactly and a target prompt edits with the same corrections. No optimisation; works for "
                        "eps, v and flow models. Needs an Euler/DDIM sampler on the inversion's schedule.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with, or a patched clone of it from "
                                                "Retrace Attention Store / Inject."),
                InversionType.Input("inversion", tooltip="From Retrace Invert (guidance 1, source prompt): the "
                                                         "trajectory every step is corrected toward."),
                io.Conditioning.Input("positive", tooltip="The target prompt to edit with; connect the source prompt "
                                                          "here as well to reconstruct."),
                io.Conditioning.Input("source", tooltip="The prompt that describes the source image."),
                io.Conditioning.Input("negative", tooltip="The unconditional prompt (normally empty)."),
                io.Float.Input("guidance", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip=GUIDANCE_TOOLTIP),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to Retrace Sample Inversion (Guider) with the same inversion, "
                                              "and an Euler/DDIM sampler (its default).")],
        )

    @classmethod
    def execute(cls, model, inversion: Inversion, positive: list, source: list, negative: list,
                guidance: float) -> io.NodeOutput:
        check_steps_and_guidance(inversion.steps, guidance)
        check_fits(inversion, model, "the inversion")
        for what, conditioning in (("positive", positive), ("source", source), ("negative", negative)):
            check_conditioning(model, conditioning, what)
        return io.NodeOutput(DirectInversionGuider(model, inversion, positive, source, negative, guidance))


NODES = [RetraceNegativePromptGuider, RetraceDirectInversionGuider]
