"""A StyleGAN latent as Retrace passes it between nodes and saves it: W or W+ rows, noise maps, model identity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .record import read_record, write_record

SPACES = ("w", "w+")
LATENT_FORMAT = "retrace-gan-latent"
FORMAT_KEY = "retrace.format"


@dataclass(frozen=True)
class GanLatent:
    """``ws`` is ``[B, num_ws, w_dim]`` (in W every row is the same w); ``noise`` maps a synthesis layer to
    ``[B, 1, H, W]`` (empty for StyleGAN3 or when noise was not optimised); ``model_id`` names the generator
    the latent belongs to (the sha256 of its file, with a suffix for tuned copies)."""

    ws: torch.Tensor
    space: str
    model_id: str
    family: str
    noise: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"latent space must be one of {SPACES}, got {self.space!r}")
        if self.ws.ndim != 3:
            raise ValueError(f"ws must be [batch, num_ws, w_dim], got shape {tuple(self.ws.shape)}")
        for name, n in self.noise.items():
            if n.ndim != 4 or n.shape[0] != self.ws.shape[0]:
                raise ValueError(f"noise map {name!r} must be [batch={self.ws.shape[0]}, 1, H, W], "
                                 f"got {tuple(n.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.ws.shape[0])

    @property
    def num_ws(self) -> int:
        return int(self.ws.shape[1])

    @property
    def w_dim(self) -> int:
        return int(self.ws.shape[2])

    def save(self, path: str | Path) -> Path:
        """Write this latent as ``.safetensors`` (see :func:`save_gan_latent`); never overwrites."""
        return save_gan_latent(path, self)

    def rows(self, index: slice | list[int]) -> GanLatent:
        """The latents of the chosen batch entries (a new object; this one is never changed)."""
        return GanLatent(ws=self.ws[index], space=self.space, model_id=self.model_id, family=self.family,
                         noise={k: v[index] for k, v in self.noise.items()})


def concat_latents(latents: list[GanLatent]) -> GanLatent:
    """One batch from several latents of the same generator and space."""
    first = latents[0]
    for other in latents[1:]:
        if (other.space, other.num_ws, other.w_dim) != (first.space, first.num_ws, first.w_dim):
            raise ValueError("latents to batch together must share space and shape: "
                             f"{first.space} {tuple(first.ws.shape[1:])} vs {other.space} {tuple(other.ws.shape[1:])}")
    noise = {}
    if all(set(lat.noise) == set(first.noise) for lat in latents):
        noise = {k: torch.cat([lat.noise[k] for lat in latents]) for k in first.noise}
    return GanLatent(ws=torch.cat([lat.ws for lat in latents]), space=first.space, model_id=first.model_id,
                     family=first.family, noise=noise)


def save_gan_latent(path: str | Path, latent: GanLatent, overwrite: bool = False) -> Path:
    """Write ``latent`` as ``.safetensors`` (tensors ``ws`` and ``noise.<layer>``, metadata for the rest)."""
    tensors = {"ws": latent.ws.float(), **{f"noise.{k}": v.float() for k, v in latent.noise.items()}}
    meta = {"space": latent.space, "model_id": latent.model_id, "family": latent.family}
    write_record(path, LATENT_FORMAT, tensors, meta, key=FORMAT_KEY, overwrite=overwrite)
    return Path(path)


def load_gan_latent(path: str | Path) -> GanLatent:
    """Read a latent written by :func:`save_gan_latent`."""
    tensors, meta = read_record(path, LATENT_FORMAT, "GAN latent", key=FORMAT_KEY, required=("ws", "space"))
    noise = {k[len("noise."):]: v for k, v in tensors.items() if k.startswith("noise.")}
    try:
        return GanLatent(ws=tensors["ws"], space=meta["space"], model_id=meta.get("model_id", ""),
                         family=meta.get("family", ""), noise=noise)
    except ValueError as e:
        raise ValueError(f"{Path(path).name}: {e}; save the GAN latent again with Retrace.") from None
