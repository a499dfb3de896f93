"""Adapters between host objects (ModelPatcher, LATENT, the k-diffusion model wrapper) and the core."""

from __future__ import annotations

import logging
from typing import Any, Callable

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch

from ._api import io

log = logging.getLogger("retrace")

Inversion = io.Custom("RETRACE_INVERSION")
NullTextType = io.Custom("RETRACE_NULL_TEXT")

FAMILY_NAMES = {"eps": "eps-prediction (SD1.x, SDXL)", "v": "v-prediction (SD2.x 768-v)",
                "flow": "rectified flow (Flux, SD3)"}


def family_of_sampling(model_sampling: Any) -> str:
    """The prediction family the core solvers support: 'eps', 'v' or 'flow'."""
    unsupported = (comfy.model_sampling.EDM, comfy.model_sampling.X0, comfy.model_sampling.COSMOS_RFLOW)
    if isinstance(model_sampling, unsupported):
        raise ValueError(
            f"Retrace inverts eps-, v-prediction and rectified-flow models; this model samples with "
            f"{type(model_sampling).__name__}, which is not supported."
        )
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "eps"
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    raise ValueError(f"unknown model sampling {type(model_sampling).__name__}: Retrace cannot tell its family.")


def model_family(model: Any) -> str:
    return family_of_sampling(model.get_model_object("model_sampling"))


def model_name(model: Any) -> str:
    """The host's model config class name, e.g. 'SD15', 'SDXL', 'Flux'."""
    return type(model.model.model_config).__name__


def base_model_of(k_model: Any) -> Any:
    """The host's BaseModel behind the model object a KSAMPLER function receives (read only)."""
    obj, seen = k_model, 0
    while obj is not None and not hasattr(obj, "model_sampling") and seen < 4:
        obj, seen = getattr(obj, "inner_model", None), seen + 1
    if obj is None or not hasattr(obj, "model_sampling"):
        raise RuntimeError("Retrace samplers must be run by the host's sampling (SamplerCustomAdvanced or a Retrace node).")
    return obj


def check_fits(record: Any, model: Any, what: str, latent_shape: tuple[int, ...] | None = None) -> None:
    """Raise if an inversion or null-text record was made for another model (or latent shape)."""
    record.check(family=model_family(model), model_name=model_name(model), latent_shape=latent_shape, what=what)


def check_latent(model: Any, latent: dict, what: str = "latent") -> torch.Tensor:
    """Return the LATENT's samples after checking they fit the model; raise a clear error if not."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = None if samples is None else tuple(getattr(samples, "shape", ()))
        raise ValueError(f"{what} must be an image latent [batch, channels, height, width]; got {shape}.")
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels:
        raise ValueError(
            f"{what} has {samples.shape[1]} channels but this {model_name(model)} model expects {channels}. "
            "Encode the image with the VAE that belongs to this model."
        )
    check_latent_size(model, tuple(samples.shape[-2:]), what)
    return samples


def check_latent_size(model: Any, size: tuple[int, int], what: str = "latent") -> None:
    """Raise where the model cannot take a latent this large: MMDiT (SD3) position embeddings cover a fixed grid."""
    diffusion_model = model.get_model_object("diffusion_model")
    grid, patch = getattr(diffusion_model, "pos_embed_max_size", None), getattr(diffusion_model, "patch_size", None)
    if not (isinstance(grid, int) and isinstance(patch, int)):
        return
    limit = grid * patch
    if max(size) > limit:
        raise ValueError(f"{what} is {size[0]}x{size[1]} (height x width, latent pixels), but this "
                         f"{model_name(model)} model's position embedding covers at most {limit}x{limit}. Use a "
                         f"smaller image (at most {limit} latent pixels a side) or crop it.")


def check_unconditional_branch(model: Any, what: str) -> None:
    """Raise where the model is guidance-distilled: guidance is an input of the network, there is no
    unconditional branch of classifier-free guidance to optimise."""
    if model.model.model_config.unet_config.get("guidance_embed"):
        raise ValueError(f"{what} optimises the unconditional branch of classifier-free guidance, but this "
                         f"{model_name(model)} model is guidance-distilled: it takes the guidance as an input and "
                         f"has no unconditional branch. Use the Retrace Direct Inversion Guider (exact "
                         f"reconstruction) or RF-Inversion with it instead.")


def check_steps_and_guidance(steps: int, guidance: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}.")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (1 means no classifier-free guidance); got {guidance}.")


class InversionCFGGuider(comfy.samplers.CFGGuider):
    """A CFGGuider that samples an inverted latent back on flow models too.

    With no noise (DisableNoise) the host starts a flow model at ``sigma * noise + (1 - sigma) * latent``, which
    is 0 at sigma 1: the inverted latent would never reach the sampler. Given the latent as the noise as well, the
    start is the latent itself at any sigma. Eps and v models start from the latent already and are left alone.
    """

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if model_family(self.model_patcher) == "flow" and not torch.any(noise) and torch.any(latent_image):
            # The host brings latent_image into model space (process_latent_in) but not the noise.
            noise = self.model_patcher.model.process_latent_in(latent_image.float()).to(noise)
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)


def context_width(model: Any) -> int | None:
    """The width of the text embeddings the model's network takes, from the host's config (None: not known)."""
    config = model.model.model_config.unet_config
    for key in ("context_dim", "context_in_dim"):  # UNets; Flux-like DiTs
        if isinstance(config.get(key), int):
            return config[key]
    embedder = getattr(model.get_model_object("diffusion_model"), "context_embedder", None)  # MMDiT (SD3)
    width = getattr(embedder, "in_features", None)
    return width if isinstance(width, int) else None


def check_conditioning(model: Any, conditioning: list | None, what: str) -> None:
    """Raise where a CONDITIONING was encoded for another model: its embeddings would fail inside the network."""
    width = context_width(model) if conditioning is not None else None
    if width is None:
        return
    for entry in conditioning:
        embedding = entry[0] if isinstance(entry, (list, tuple)) and entry else None
        if isinstance(embedding, torch.Tensor) and embedding.ndim == 3 and embedding.shape[-1] != width:
            raise ValueError(f"the {what} conditioning holds text embeddings {embedding.shape[-1]} wide (shape "
                             f"{list(embedding.shape)}), but this {model_name(model)} model takes them {width} wide: "
                             f"it was encoded with another model's text encoder. Encode the prompt with the CLIP "
                             f"that belongs to this model.")


def make_guider(model: Any, positive: list, negative: list | None, guidance: float) -> comfy.samplers.CFGGuider:
    """A CFGGuider (flow-safe for sampling an inversion back); without a negative only guidance 1 makes sense."""
    check_conditioning(model, positive, "positive")
    check_conditioning(model, negative, "negative")
    guider = InversionCFGGuider(model)
    if negative is None:
        if guidance != 1.0:
            raise ValueError(f"guidance {guidance} needs a negative conditioning; connect one or set guidance to 1.")
        guider.inner_set_conds({"positive": positive})
    else:
        guider.set_conds(positive, negative)
    guider.set_cfg(guidance)
    return guider


def step_callback(callback: Callable[[dict], None] | None, record: list | None) -> Callable[[dict], None]:
    """A k-diffusion callback that records x, checks for interrupt, then forwards to the host's callback."""
    def cb(d: dict) -> None:
        if record is not None:
            record.append(d["x"].detach().to(comfy.model_management.intermediate_device(), copy=True))
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(d)
    return cb


class _MethodCall(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


class Differentiable:
    """Calls a host module's method with autograd-capable copies of its weights.

    The host runs every node under ``torch.inference_mode()``, so the weights it loaded are inference
    tensors, which autograd refuses to save for backward. ``torch.func.functional_call`` runs the same
    module with ordinary copies for the length of the call; the module itself is never modified.
    Build it inside ``torch.inference_mode(False)``.
    """

    def __init__(self, module: torch.nn.Module, method: str = "forward"):
        self.call = _MethodCall(module, method)
        named = dict(module.named_parameters(remove_duplicate=False))
        named.update(module.named_buffers(remove_duplicate=False))
        self.tensors = {f"module.{k}": v.detach().clone() for k, v in named.items()}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.call, self.tensors, args, kwargs, tie_weights=False)
