"""Null-text inversion in the host: optimise per-step unconditional embeddings, then guide with them."""

from __future__ import annotations

import math
from typing import Any

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from ..inversion.null_text import SOLVERS, STARTS, NullTextSettings, NullTextStep, loss_weight, solve_step
from ..inversion.record import Inversion, NullText, fingerprint
from ..inversion.schedules import reconstruction_sigmas
from ._api import RetraceNode, io
from ._guidance import SCHEDULE_FIX, ScheduledGuider, with_crossattn
from ._host import (
    Differentiable,
    Inversion as InversionType,
    NullTextType,
    check_conditioning,
    check_fits,
    check_steps_and_guidance,
    check_unconditional_branch,
)
from ._sampling import ode_sampler, run_guider



class _GradientModel:
    """The host's BaseModel for ``calc_cond_batch``, with ``apply_model`` run through weight copies autograd
    accepts (see :class:`Differentiable`); every other attribute is the model's own."""

    def __init__(self, base: Any):
        self._base = base
        self.apply_model = Differentiable(base, "apply_model")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class _HostBranches:
    """A host guider's cond and uncond branches and its CFG combination, as the core's GuidedDenoiser."""

    def __init__(self, guider: comfy.samplers.CFGGuider, gradient_model: _GradientModel, model_options: dict):
        self.guider, self.gradient_model, self.model_options = guider, gradient_model, model_options

    def _timestep(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.to(x).reshape(-1).expand(x.shape[0])

    def cond(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return comfy.samplers.calc_cond_batch(self.guider.inner_model, [self.guider.conds["positive"]], x,
                                              self._timestep(x, sigma), self.model_options)[0]

    def uncond(self, x: torch.Tensor, sigma: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        negative = with_crossattn(self.guider.conds["negative"], embedding)
        return comfy.samplers.calc_cond_batch(self.gradient_model, [negative], x, self._timestep(x, sigma),
                                              self.model_options)[0]

    def guide(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        g = self.guider
        return comfy.samplers.cfg_function(g.inner_model, cond, uncond, g.cfg, x, self._timestep(x, sigma),
                                           self.model_options, cond=g.conds["positive"], uncond=g.conds["negative"])


class NullTextOptimizer(ScheduledGuider):
    """Samples an inversion back with the source prompt while optimising each step's unconditional embedding
    (Mokady et al. 2023, Algorithm 1); run only by :func:`optimize_null_text`, under ``inference_mode(False)``."""

    what = "null-text optimization"

    def __init__(self, model: Any, inversion: Inversion, settings: NullTextSettings):
        super().__init__(model, reconstruction_sigmas(inversion.sigmas)[:-1], inversion.latent_shape,
                         "the inversion", "Use the inversion's schedule.")
        self.inversion, self.settings = inversion, settings
        self.ascending = inversion.sigmas
        self.steps: list[NullTextStep] = []
        self.embedding: torch.Tensor | None = None
        self.gradient_model: _GradientModel | None = None

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (the host's signature)
        k = self.step_of(timestep)
        n = self.inversion.steps
        if self.embedding is None:
            branch = "negative" if self.settings.start == "negative" else "positive"
            initial = self.conds[branch][0]["model_conds"]["c_crossattn"].cond
            self.embedding = comfy.utils.repeat_to_batch_size(initial, x.shape[0]).to(x.device, torch.float32)
        if math.isclose(self.cfg, 1.0):  # the uncond branch has no say at guidance 1: nothing to optimise
            idle = torch.zeros(x.shape[0], dtype=torch.long)
            self.steps.append(NullTextStep(self.embedding, x, idle.float(), idle))
            return super().predict_noise(x, timestep, model_options, seed)
        if self.gradient_model is None:
            self.gradient_model = _GradientModel(self.inner_model)
        # Clones: the inversion's tensors were made under inference mode, which autograd refuses to save.
        sigma, sigma_next = (self.ascending[i].to(x.device, copy=True) for i in (n - k, n - k - 1))
        target = self.inversion.trajectory[n - k - 1].to(x.device, copy=True)
        step = solve_step(_HostBranches(self, self.gradient_model, model_options), x.clone(), sigma, sigma_next, target,
                          self.embedding, self.settings, k, loss_weight(sigma_next, self.inversion.family),
                          on_iteration=lambda _: comfy.model_management.throw_exception_if_processing_interrupted())
        self.embedding = step.embedding
        self.steps.append(step)
        return step.denoised


def negative_options(negative: list) -> dict[str, Any]:
    """The negative's scalar options (SDXL size embeddings and the like), kept with the embeddings."""
    return {k: v for k, v in negative[0][1].items() if isinstance(v, (int, float, str, bool))}


def check_single(conditioning: list, batch: int, what: str) -> None:
    if not isinstance(conditioning, list) or len(conditioning) != 1 or not isinstance(conditioning[0][0], torch.Tensor):
        count = len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__
        raise ValueError(f"null-text optimises one unconditional embedding: connect a single {what} conditioning "
                         f"(one CLIP Text Encode, not a combination); got {count} entries.")
    if conditioning[0][0].shape[0] not in (1, batch):
        raise ValueError(f"the {what} has a batch of {conditioning[0][0].shape[0]}; it must be 1 or the latent's {batch}.")


def optimize_null_text(model: Any, inversion: Inversion, positive: list, negative: list, guidance: float,
                       settings: NullTextSettings) -> tuple[NullText, dict]:
    """Null-text inversion through the host's guider and model manager; returns the embeddings and the
    reconstruction they give."""
    check_steps_and_guidance(inversion.steps, guidance)
    check_fits(inversion, model, "the inversion")
    check_unconditional_branch(model, "Null-text inversion")
    check_conditioning(model, positive, "positive")
    check_conditioning(model, negative, "negative")
    batch = inversion.latent_shape[0]
    check_single(negative, batch, "negative")
    if settings.start == "source":
        check_single(positive, batch, "positive (source)")
    optimizer = NullTextOptimizer(model, inversion, settings)
    optimizer.set_conds(positive, negative)
    optimizer.set_cfg(guidance)
    sigmas = reconstruction_sigmas(inversion.sigmas)
    with torch.inference_mode(False):
        record = run_guider(optimizer, ode_sampler("euler"), inversion.noise, torch.zeros(inversion.latent_shape),
                            sigmas, model)
    device = comfy.model_management.intermediate_device()
    embeddings = torch.stack([s.embedding.detach().to(device) for s in optimizer.steps])
    pooled = negative[0][1].get("pooled_output")
    extra = {"solver": settings.solver, "start": settings.start, "gauss_newton_steps": settings.gauss_newton_steps,
             "inner_steps": settings.inner_steps, "lr": settings.lr, "early_stop": settings.early_stop,
             "negative_options": negative_options(negative),
             "loss": [s.loss.tolist() for s in optimizer.steps],
             "iterations": [s.iterations.tolist() for s in optimizer.steps],
             "noise_fingerprint": fingerprint(inversion.noise)}
    null_text = NullText(embeddings=embeddings, sigmas=inversion.sigmas, family=inversion.family,
                         model_name=inversion.model_name, latent_shape=inversion.latent_shape, guidance=float(guidance),
                         pooled=None if pooled is None else pooled.detach().to(device), extra=extra)
    return null_text, {"samples": model.model.process_latent_out(record[-1])}


class NullTextGuider(ScheduledGuider):
    """CFG with the null-text embedding of the current step as the unconditional branch."""

    what = "this null-text"

    def __init__(self, model: Any, null_text: NullText, positive: list):
        super().__init__(model, null_text.step_sigmas, null_text.latent_shape, "the inversion it was optimised on",
                         SCHEDULE_FIX, start=null_text.extra.get("noise_fingerprint"))
        self.null_text = null_text
        options = dict(null_text.extra.get("negative_options", {}))
        if null_text.pooled is not None:
            options["pooled_output"] = null_text.pooled
        self.set_conds(positive, [[null_text.embeddings[0], options]])
        self.set_cfg(null_text.guidance)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (the host's signature)
        embedding = self.null_text.embeddings[self.step_of(timestep)].to(x.device)
        negative = with_crossattn(self.conds["negative"], embedding)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, self.conds.get("positive"),
                                                self.cfg, model_options=model_options, seed=seed)


class RetraceNullTextInversion(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceNullTextInversion",
            display_name="Retrace Null-Text Inversion",
            category="Retrace/inversion/guidance",
            description="Null-text inversion (Mokady et al., CVPR 2023): optimise one unconditional embedding per "
                        "step so that sampling at full guidance reconstructs the image, with the paper's Adam recipe "
                        "or a faster Gauss-Newton solver. Feed the result to "
                        "Retrace Null-Text Guider to reconstruct or edit. Gradients flow only to the embeddings; "
                        "the model is never changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with; only the embeddings are "
                                                "optimised, its weights never change."),
                InversionType.Input("inversion", tooltip="From Retrace Invert, made at guidance 1 with the source prompt."),
                io.Conditioning.Input("positive", tooltip="The source prompt: the one the image was inverted with."),
                io.Conditioning.Input("negative", tooltip="The unconditional prompt, normally empty: its pooled output and "
                                                          "sizes (SDXL) stay; with start = negative its embedding is "
                                                          "where the optimisation starts."),
                io.Float.Input("guidance", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The guidance you will edit with (7.5 in the paper). At 1 there is nothing "
                                       "to optimise and the result is the plain inversion's."),
                io.Combo.Input("solver", options=list(SOLVERS), default="gauss_newton",
                               tooltip="gauss_newton: Gauss-Newton with CGLS, about 2.5x the cost of plain inversion "
                                       "and reconstruction. adam: the paper's recipe (inner_steps, learning_rate, "
                                       "early_stop), up to about 9x. Start 'negative' with adam is the paper exactly."),
                io.Combo.Input("start", options=list(STARTS), default="source",
                               tooltip="Where each image's optimisation starts. source: the source prompt's embedding, "
                                       "negative-prompt inversion's answer (fast, faithful; Miyake et al. 2023). "
                                       "negative: the negative's embedding, as in the null-text paper."),
                io.Int.Input("gauss_newton_steps", default=1, min=1, max=50,
                             tooltip="CGLS iterations per sampling step (gauss_newton only); each costs about one "
                                     "forward and one backward pass."),
                io.Int.Input("inner_steps", default=10, min=0, max=100,
                             tooltip="Most Adam steps per sampling step (adam only; 10 in the paper)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-5, max=1.0, step=0.001, round=1e-5,
                               tooltip="Adam learning rate at the first step (adam only); it decays to about half "
                                       "by step 50 (1e-2 in the paper)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=1e-8,
                               tooltip="Skip or stop a step's optimisation once its loss is below this (the paper's "
                                       "1e-5; adam adds 2e-5 per step, as the paper does). 0 always optimises."),
            ],
            outputs=[
                NullTextType.Output("null_text", display_name="null_text",
                                    tooltip="Per-step unconditional embeddings, tied to this model and schedule."),
                io.Latent.Output("reconstruction", display_name="reconstruction",
                                 tooltip="The image latent the embeddings reconstruct at this guidance."),
            ],
        )

    @classmethod
    def execute(cls, model, inversion: Inversion, positive: list, negative: list, guidance: float, solver: str,
                start: str, gauss_newton_steps: int, inner_steps: int, learning_rate: float,
                early_stop: float) -> io.NodeOutput:
        settings = NullTextSettings(inner_steps=inner_steps, lr=learning_rate, early_stop=early_stop, solver=solver,
                                    start=start, gauss_newton_steps=gauss_newton_steps)
        return io.NodeOutput(*optimize_null_text(model, inversion, positive, negative, guidance, settings))


class RetraceNullTextGuider(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceNullTextGuider",
            display_name="Retrace Null-Text Guider",
            category="Retrace/inversion/guidance",
            description="A guider that uses each step's null-text embedding as the unconditional branch, at the "
                        "guidance it was optimised for. The source prompt reconstructs; a target prompt edits. "
                        "Use with Retrace Sample Inversion (Guider) or SamplerCustomAdvanced + DisableNoise.",
            inputs=[
                io.Model.Input("model", tooltip="The model the null-text was optimised with, or a patched clone of "
                                                "it from Retrace Attention Store / Inject."),
                NullTextType.Input("null_text", tooltip="From Retrace Null-Text Inversion or Retrace Load Null-Text; "
                                                        "it fixes the guidance and the schedule."),
                io.Conditioning.Input("positive", tooltip="The source prompt to reconstruct, a target prompt to edit."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to Retrace Sample Inversion (Guider) with the inversion the "
                                              "null-text was optimised on.")],
        )

    @classmethod
    def execute(cls, model, null_text: NullText, positive: list) -> io.NodeOutput:
        check_fits(null_text, model, "the null-text")
        check_conditioning(model, positive, "positive")
        return io.NodeOutput(NullTextGuider(model, null_text, positive))


NODES = [RetraceNullTextInversion, RetraceNullTextGuider]
