"""Results that outlive a run: an inversion (trajectory and what it was made for) and null-text embeddings."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "retrace.inversion/1"
NULL_TEXT_FORMAT = "retrace.null_text/1"
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
        check_sigmas(self.sigmas, "inversion")
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
        return _mismatches(self, "inversion", family, model_name, latent_shape)

    def check(self, family: str | None = None, model_name: str | None = None,
              latent_shape: tuple[int, ...] | None = None, what: str = "this inversion") -> None:
        _raise_mismatches(self.mismatches(family, model_name, latent_shape), what,
                          "Invert the image again with this model and latent.")

    def save(self, path: str) -> None:
        """Write to ``.safetensors`` (tensors plus JSON metadata). Refuses to overwrite an existing file."""
        meta = {"family": self.family, "model_name": self.model_name, "method": self.method,
                "guidance": repr(float(self.guidance)), "latent_shape": json.dumps(list(self.latent_shape)),
                "extra": json.dumps(self.extra)}
        write_record(path, FORMAT, {"trajectory": self.trajectory, "sigmas": self.sigmas.float()}, meta)

    @classmethod
    def load(cls, path: str) -> Inversion:
        tensors, meta = read_record(path, FORMAT, "inversion",
                                    required=("trajectory", "sigmas", "family", "model_name", "method"))
        try:
            inv = cls(trajectory=tensors["trajectory"], sigmas=tensors["sigmas"], family=meta["family"],
                      model_name=meta["model_name"], method=meta["method"],
                      guidance=meta_field(path, meta, "guidance", _finite_float, "1.0"),
                      extra=meta_field(path, meta, "extra", _json_dict, "{}"))
        except ValueError as e:
            raise ValueError(f"{os.path.basename(path)}: {e} Save the inversion again with Retrace.") from None
        if "latent_shape" in meta and list(inv.latent_shape) != list(meta_field(path, meta, "latent_shape", _shape)):
            raise ValueError(f"{os.path.basename(path)} is damaged: its latent shape metadata does not match its "
                             "tensors; save the inversion again with Retrace.")
        return inv


@dataclasses.dataclass(frozen=True)
class NullText:
    """Null-text inversion's per-step unconditional embeddings and what they were optimised for.

    ``embeddings[k]`` (``[B, tokens, width]``) is the unconditional embedding of sampling step ``k``, the
    step that starts at ``sigmas[-1 - k]`` (``sigmas`` ascending, the inversion's). ``pooled`` is the
    negative's pooled output (SDXL), kept as it was. Treated as immutable.
    """

    embeddings: torch.Tensor  # [steps, B, tokens, width]
    sigmas: torch.Tensor  # [steps + 1], ascending
    family: str
    model_name: str
    latent_shape: tuple[int, ...]
    guidance: float
    pooled: torch.Tensor | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {self.family!r}.")
        check_sigmas(self.sigmas, "null-text")
        if self.embeddings.ndim != 4 or self.embeddings.shape[0] + 1 != self.sigmas.shape[0]:
            raise ValueError(f"embeddings {tuple(self.embeddings.shape)} need one [B, tokens, width] per step "
                             f"of the {self.sigmas.shape[0] - 1}-step schedule.")
        if self.embeddings.shape[1] != self.latent_shape[0]:
            raise ValueError(f"embeddings are for a batch of {self.embeddings.shape[1]}, the latent shape "
                             f"{list(self.latent_shape)} is not.")

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def step_sigmas(self) -> torch.Tensor:
        """The sigma each sampling step starts from, in sampling order."""
        return self.sigmas.flip(0)[:-1]

    def mismatches(self, family: str | None = None, model_name: str | None = None,
                   latent_shape: tuple[int, ...] | None = None) -> list[str]:
        return _mismatches(self, "null-text", family, model_name, latent_shape)

    def check(self, family: str | None = None, model_name: str | None = None,
              latent_shape: tuple[int, ...] | None = None, what: str = "this null-text") -> None:
        _raise_mismatches(self.mismatches(family, model_name, latent_shape), what,
                          "Optimise null-text again for this model and latent.")

    def save(self, path: str) -> None:
        """Write to ``.safetensors``. Refuses to overwrite an existing file."""
        meta = {"family": self.family, "model_name": self.model_name, "guidance": repr(float(self.guidance)),
                "latent_shape": json.dumps(list(self.latent_shape)), "extra": json.dumps(self.extra)}
        tensors = {"embeddings": self.embeddings, "sigmas": self.sigmas.float()}
        if self.pooled is not None:
            tensors["pooled"] = self.pooled
        write_record(path, NULL_TEXT_FORMAT, tensors, meta)

    @classmethod
    def load(cls, path: str) -> NullText:
        tensors, meta = read_record(path, NULL_TEXT_FORMAT, "null-text",
                                    required=("embeddings", "sigmas", "family", "model_name", "latent_shape"))
        try:
            return cls(embeddings=tensors["embeddings"], sigmas=tensors["sigmas"], family=meta["family"],
                       model_name=meta["model_name"], latent_shape=meta_field(path, meta, "latent_shape", _shape),
                       guidance=meta_field(path, meta, "guidance", _finite_float, "1.0"),
                       pooled=tensors.get("pooled"), extra=meta_field(path, meta, "extra", _json_dict, "{}"))
        except ValueError as e:
            raise ValueError(f"{os.path.basename(path)}: {e} Save the null-text again with Retrace.") from None


def _mismatches(record: Any, kind: str, family: str | None, model_name: str | None,
                latent_shape: tuple[int, ...] | None) -> list[str]:
    found = []
    if family is not None and family != record.family:
        found.append(f"model family: {kind} was made for '{record.family}', the model is '{family}'")
    if model_name is not None and model_name != record.model_name:
        found.append(f"model: {kind} was made for '{record.model_name}', the model is '{model_name}'")
    if latent_shape is not None and tuple(latent_shape) != tuple(record.latent_shape):
        found.append(f"latent shape: {kind} has {list(record.latent_shape)}, the latent is {list(latent_shape)}")
    return found


def fingerprint(x: torch.Tensor, samples: int = 8) -> list[float]:
    """A few numbers that tell one latent from another (mean, std, evenly spaced values), small enough for a
    file's metadata: what a result made from an inversion remembers of the noise it started from."""
    flat = x.detach().double().flatten().cpu()
    picks = flat[torch.linspace(0, flat.numel() - 1, samples).long()]
    return [float(flat.mean()), float(flat.std()), *(float(v) for v in picks)]


def same_fingerprint(a: list[float], b: list[float], rtol: float = 1e-3) -> bool:
    """Whether two fingerprints name the same latent, up to the float error of the host's latent formats."""
    if len(a) != len(b):
        return False
    scale = max(1e-6, max(abs(v) for v in a))
    return all(abs(x - y) <= rtol * scale for x, y in zip(a, b))


def _raise_mismatches(found: list[str], what: str, fix: str) -> None:
    if found:
        raise ValueError(f"{what} does not fit: " + "; ".join(found) + f". {fix}")


def write_record(path: str | os.PathLike, file_format: str, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                 key: str = "format", overwrite: bool = False) -> None:
    """A Retrace ``.safetensors`` record: CPU tensors, string metadata, ``meta[key]`` naming the format."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists already; Retrace never overwrites a file.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={key: file_format, **meta})


def read_record(path: str | os.PathLike, file_format: str, kind: str, key: str = "format",
                required: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a record written by :func:`write_record`. Refuses, naming the file and the
    field: a file that is not safetensors (or is truncated), another format, a missing ``required`` tensor or
    metadata field, and a tensor holding NaN or infinity."""
    name = os.path.basename(os.fspath(path))
    fix = f"save the {kind} again with Retrace (a record edited or cut short by hand cannot be trusted)"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get(key) != file_format:
                found = f"format {meta[key]!r}" if key in meta else "its metadata names no Retrace format"
                raise ValueError(f"{name} is not a Retrace {kind} file ({found}; a {kind} file has {key} "
                                 f"{file_format!r}). Pick a {kind} file Retrace saved.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{name} cannot be read as a Retrace {kind} file ({type(e).__name__}: {e}); {fix}.") from None
    missing = [k for k in required if k not in tensors and k not in meta]
    if missing:
        raise ValueError(f"{name} lacks {', '.join(repr(k) for k in missing)} (has tensors {sorted(tensors)}, "
                         f"metadata {sorted(meta)}); {fix}.")
    bad = [k for k, v in sorted(tensors.items()) if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{name} holds NaN or infinite values in {', '.join(repr(k) for k in bad)}; {fix}.")
    return tensors, meta


def meta_field(path: str | os.PathLike, meta: dict[str, str], field: str, parse: Any, default: str | None = None
               ) -> Any:
    """``parse(meta[field])`` (``default`` where the field is absent; a required field is :func:`read_record`'s to
    check), or a ValueError naming the file and the field when it is unreadable."""
    name = os.path.basename(os.fspath(path))
    raw = meta[field] if default is None else meta.get(field, default)
    try:
        return parse(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: metadata field {field!r} is unreadable ({raw[:80]!r}: {e}); save the record "
                         "again with Retrace.") from None


def check_sigmas(sigmas: torch.Tensor, what: str) -> None:
    """A record's schedule: 1-D, at least two sigmas, finite, not negative, strictly ascending."""
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"{what}: sigmas must be a 1-D schedule of at least two values; got shape "
                         f"{tuple(sigmas.shape)}.")
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError(f"{what}: sigmas must be finite and not negative; got {sigmas.tolist()[:8]}.")
    if not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError(f"{what}: sigmas must ascend (index 0 the clean image, -1 the noise); got "
                         f"{sigmas.tolist()[:8]}.")


def _json_dict(raw: str) -> dict:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _finite_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _shape(raw: str) -> tuple[int, ...]:
    value = json.loads(raw)
    if (not isinstance(value, list) or len(value) not in (4, 5)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError("expected a latent shape: 4 or 5 positive integers, [batch, channels, (frames,) height, "
                         "width]")
    return tuple(value)


# The metadata keys that name a record's format: inversions and null-text use "format", GAN latents and
# directions "retrace.format".
FORMAT_KEYS = ("format", "retrace.format")
def record_format(path: str | os.PathLike) -> str | None:
    """The format a ``.safetensors`` file's metadata names (see FORMAT_KEYS), or None for a file without one or
    one that is not safetensors. Reads the header only, and remembers it while the file is unchanged."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _header_format(os.fspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _header_format(path: str, _mtime_ns: int, _size: int) -> str | None:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file (safetensors raises its own error type), or unreadable
        return None
    return next((meta[key] for key in FORMAT_KEYS if isinstance(meta.get(key), str)), None)
