"""The result of an inversion: the trajectory from the image to its noise, and what it was made for."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "retrace.inversion/1"
FAMILIES = ("eps", "v", "flow")


@dataclasses.dataclass(frozen=True)
class Inversion:
    """One inversion, in the model's own latent space (after the host's ``process_latent_in``).

    ``trajectory[i]`` is the latent at ``sigmas[i]``: index 0 is the clean image at the smallest sigma,
    index -1 the inverted noise. Treated as immutable: nodes never write into it.
    """

    trajectory: torch.Tensor  # [steps + 1, B, C, H, W]
    sigmas: torch.Tensor  # [steps + 1], ascending
    family: str  # eps | v | flow
    model_name: str  # the host's model config class, e.g. "SD15", "SDXL", "Flux"
    method: str  # the solver or controller that produced it
    guidance: float = 1.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {self.family!r}.")
        if self.trajectory.ndim < 3 or self.trajectory.shape[0] != self.sigmas.shape[0]:
            raise ValueError(
                f"trajectory {tuple(self.trajectory.shape)} needs one latent per sigma ({tuple(self.sigmas.shape)})."
            )

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def noise(self) -> torch.Tensor:
        return self.trajectory[-1]

    @property
    def source(self) -> torch.Tensor:
        return self.trajectory[0]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.trajectory.shape[1:])

    def mismatches(self, family: str | None = None, model_name: str | None = None,
                   latent_shape: tuple[int, ...] | None = None) -> list[str]:
        """What differs between this inversion and a model/latent it is about to be used with."""
        found = []
        if family is not None and family != self.family:
            found.append(f"model family: inversion was made for '{self.family}', the model is '{family}'")
        if model_name is not None and model_name != self.model_name:
            found.append(f"model: inversion was made for '{self.model_name}', the model is '{model_name}'")
        if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            found.append(f"latent shape: inversion has {list(self.latent_shape)}, the latent is {list(latent_shape)}")
        return found

    def check(self, family: str | None = None, model_name: str | None = None,
              latent_shape: tuple[int, ...] | None = None, what: str = "this inversion") -> None:
        found = self.mismatches(family, model_name, latent_shape)
        if found:
            raise ValueError(
                f"{what} does not fit: " + "; ".join(found) + ". Invert the image again with this model and latent."
            )

    def save(self, path: str) -> None:
        """Write to ``.safetensors`` (tensors plus JSON metadata). Refuses to overwrite an existing file."""
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists already; Retrace never overwrites a file.")
        meta = {
            "format": FORMAT,
            "family": self.family,
            "model_name": self.model_name,
            "method": self.method,
            "guidance": repr(float(self.guidance)),
            "latent_shape": json.dumps(list(self.latent_shape)),
            "extra": json.dumps(self.extra),
        }
        tensors = {"trajectory": self.trajectory.detach().cpu().contiguous(),
                   "sigmas": self.sigmas.detach().cpu().float().contiguous()}
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> Inversion:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a Retrace inversion (format {meta.get('format')!r}, expected {FORMAT!r}).")
            trajectory, sigmas = f.get_tensor("trajectory"), f.get_tensor("sigmas")
        inv = cls(trajectory=trajectory, sigmas=sigmas, family=meta["family"],
                  model_name=meta["model_name"], method=meta["method"], guidance=float(meta["guidance"]),
                  extra=json.loads(meta.get("extra", "{}")))
        if list(inv.latent_shape) != json.loads(meta["latent_shape"]):
            raise ValueError(f"{path} is damaged: its latent shape metadata does not match its trajectory.")
        return inv
