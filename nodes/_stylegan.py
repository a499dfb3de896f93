"""Adapters between the host and Retrace's StyleGAN core: the generator in a ModelPatcher, images in and out,
size checks, progress with a preview, and the optional LPIPS network."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..inversion.gan_latent import GanLatent
from ..inversion.gan_projection import luminance
from ..models.loader import GeneratorFile, read_generator_file, weights_sha256
from ..models.perceptual import is_lin_file, load_lpips
from ._api import io

log = logging.getLogger("retrace")

StyleGANType = io.Custom("RETRACE_STYLEGAN")
GanLatentType = io.Custom("RETRACE_GAN_LATENT")

FOLDER = "stylegan"
PERCEPTUAL_FOLDER = "retrace_perceptual"
GENERATOR_EXTENSIONS = {".pkl", ".pt", ".pth", ".safetensors"}
PERCEPTUAL_EXTENSIONS = {".pth", ".pt", ".safetensors"}
NONE = "none"
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ON_MISMATCH = ("resize", "refuse")
PREVIEW_SIZE = 512


def register_folders() -> None:
    """models/stylegan/ for generators, models/retrace_perceptual/ for VGG16/AlexNet (LPIPS) backbones."""
    for name, exts in ((FOLDER, GENERATOR_EXTENSIONS), (PERCEPTUAL_FOLDER, PERCEPTUAL_EXTENSIONS)):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(exts))
        else:
            folder_paths.folder_names_and_paths[name][1].update(exts)


@dataclass(frozen=True)
class StyleGAN:
    """A generator in the host's model manager. ``patcher.model`` is the Generator module; a tuned copy is a
    clone of the same patcher with weight patches, so the loaded weights are never changed in place."""

    patcher: Any
    name: str
    model_id: str
    family: str

    def load(self) -> torch.nn.Module:
        """Put the generator (with this handle's patches) on the compute device and return it."""
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher.model

    @property
    def info(self) -> torch.nn.Module:
        """The module, for reading sizes only (it may sit on the offload device)."""
        return self.patcher.model


def generator_handle(file: GeneratorFile, name: str, dtype: torch.dtype | None) -> StyleGAN:
    module = file.build(device="cpu", dtype=dtype or torch.float32)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)
    return StyleGAN(patcher=patcher, name=name, model_id=weights_sha256(file.state_dict)[:16], family=file.family)


@lru_cache(maxsize=1)  # re-reading is only slow; keeping more would hold their tensors in memory
def _read_cached(path: str, mtime: float) -> GeneratorFile:
    return read_generator_file(path)


def read_generator(name: str) -> GeneratorFile:
    path = folder_paths.get_full_path_or_raise(FOLDER, name)
    return _read_cached(path, os.path.getmtime(path))


def tuned_copy(gan: StyleGAN, weights: dict[str, torch.Tensor]) -> StyleGAN:
    """A clone of the generator's patcher that swaps in tuned weights when it is loaded (object patches: the
    host restores the originals when the untuned generator is loaded again). Weight patches would not do: the
    host patches only leaf modules' weights, and StyleGAN layers hold weights beside their affine sub-layer."""
    patcher = gan.patcher.clone()
    digest = hashlib.sha256()
    for key in sorted(weights):
        value = weights[key].detach().to(gan.patcher.offload_device)
        patcher.add_object_patch(key, torch.nn.Parameter(value, requires_grad=False))
        digest.update(key.encode())
        digest.update(value.cpu().float().numpy().tobytes())
    return StyleGAN(patcher=patcher, name=f"{gan.name} (tuned)", model_id=f"{gan.model_id}+pti.{digest.hexdigest()[:12]}",
                    family=gan.family)


def base_id(model_id: str) -> str:
    return model_id.split("+", 1)[0]


def check_latent_fits(latent: GanLatent, gan: StyleGAN, what: str = "latent") -> None:
    """Refuse a latent of another shape; warn when it was made with a different generator file."""
    G = gan.info
    if (latent.num_ws, latent.w_dim) != (G.num_ws, G.w_dim):
        raise ValueError(f"the {what} has {latent.num_ws} rows of {latent.w_dim} values, but {gan.name} takes "
                         f"{G.num_ws} rows of {G.w_dim}: it was made with another generator. Project the image "
                         "again with this one.")
    maps = G.noise_maps()
    for key, n in latent.noise.items():
        if key not in maps or tuple(n.shape[-2:]) != tuple(maps[key].shape):
            raise ValueError(f"the {what}'s noise map {key!r} does not fit {gan.name}; it was made with another "
                             "generator.")
    if latent.model_id and base_id(latent.model_id) != base_id(gan.model_id):
        log.warning("Retrace: the %s was made with generator %s, now used with %s (%s)", what,
                    base_id(latent.model_id), gan.name, base_id(gan.model_id))


def latent_noise(latent: GanLatent | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    if latent is None or not latent.noise:
        return None
    return {k: v.to(device) for k, v in latent.noise.items()}


# --- images -------------------------------------------------------------------------------------------


def image_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` in [0, 1] to ``[B, C, H, W]`` in [-1, 1]."""
    return image.movedim(-1, 1).float() * 2 - 1


def tensor_to_image(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` in about [-1, 1] to IMAGE ``[B, H, W, 3]`` in [0, 1] (single-channel renders become gray)."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] > 3:
        x = x[:, :3]
    return x.movedim(1, -1).to(comfy.model_management.intermediate_device())


def fit_image(image: torch.Tensor, size: int, channels: int, on_mismatch: str, what: str = "image") -> torch.Tensor:
    """IMAGE to ``[B, channels, size, size]`` in [-1, 1]; resize (centre crop to square, area/bicubic) or refuse."""
    batch, height, width, have = image.shape
    if (height, width) != (size, size):
        if on_mismatch == "refuse":
            raise ValueError(f"the {what} is {width}x{height}, but this generator takes {size}x{size}. Resize it to "
                             f"{size}x{size} first, or set on_mismatch to 'resize' (centre crop to a square, then "
                             "resize).")
        log.info("Retrace: %s %dx%d centre-cropped and resized to %dx%d", what, width, height, size, size)
    x = image_to_tensor(image)
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] != channels:
        if on_mismatch == "refuse" and not (x.shape[1] == 3 and channels == 1) and not (x.shape[1] == 1 and channels == 3):
            raise ValueError(f"the {what} has {have} channels; this generator makes {channels}.")
        if channels == 1:
            x = luminance(x)
        elif x.shape[1] == 1:
            x = x.repeat(1, channels, 1, 1)
        else:
            raise ValueError(f"the {what} has {have} channels; this generator makes {channels}, and Retrace cannot "
                             "convert between them.")
    if (height, width) != (size, size):
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = x[:, :, top:top + side, left:left + side]
        mode = "area" if side > size else "bicubic"
        x = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return x


def fit_mask(mask: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    """MASK (1 = fill in) to the loss weights ``[B, 1, size, size]`` (1 = keep)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"the mask batch ({mask.shape[0]}) must be 1 or match the image batch ({batch})")
    m = mask[:, None].float()
    if tuple(m.shape[-2:]) != (size, size):
        side = min(m.shape[-2:])
        top, left = (m.shape[-2] - side) // 2, (m.shape[-1] - side) // 2
        m = F.interpolate(m[:, :, top:top + side, left:left + side], size=(size, size), mode="nearest-exact")
    known = 1 - m.clamp(0, 1)
    if float(known.sum()) == 0:
        raise ValueError("the mask covers the whole image: nothing is left to project from")
    return known


# --- progress, preview, LPIPS -------------------------------------------------------------------------


def progress(total: int, label: str) -> Callable[[dict[str, Any]], None]:
    """A core callback: interrupt point, progress bar, a preview of the current render (first image)."""
    bar = comfy.utils.ProgressBar(total)
    every = 1 if total <= 300 else max(1, total // 200)

    def cb(d: dict[str, Any]) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        step, steps = d["step"] + 1, d.get("steps", total)  # a batch's L-BFGS refinement runs image by image
        preview = None
        if step % every == 0 or step == steps:
            img = tensor_to_image(d["image"][:1])[0]
            arr = (img.cpu().numpy() * 255).round().astype(np.uint8)
            preview = ("JPEG", Image.fromarray(arr), PREVIEW_SIZE)
        bar.update_absolute(step, steps, preview)
        if "psnr" in d and step % 50 == 0:
            log.debug("Retrace %s step %d/%d: loss %.5f, PSNR %s", label, step, steps, d["loss"],
                      [round(float(p), 2) for p in d["psnr"]])

    return cb


def perceptual_options() -> list[str]:
    """The trunk files; LPIPS' lin-weight files beside them (vgg.pth, alex.pth) are used with them, not listed."""
    return [NONE, *(name for name in folder_paths.get_filename_list(PERCEPTUAL_FOLDER) if not is_lin_file(name))]


def perceptual_exists(name: str) -> bool | str:
    if name == NONE or folder_paths.get_full_path(PERCEPTUAL_FOLDER, name) is not None:
        return True
    return f"LPIPS backbone file not found in models/{PERCEPTUAL_FOLDER}/: {name}"


def lpips_network(name: str, device: torch.device) -> torch.nn.Module | None:
    if name == NONE:
        return None
    path = folder_paths.get_full_path_or_raise(PERCEPTUAL_FOLDER, name)
    lin_files = [folder_paths.get_full_path(PERCEPTUAL_FOLDER, other)
                 for other in folder_paths.get_filename_list(PERCEPTUAL_FOLDER) if is_lin_file(other)]
    with torch.inference_mode(False):
        return load_lpips(path, lin_candidates=[p for p in lin_files if p]).to(device)
