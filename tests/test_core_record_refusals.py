"""Every record refuses, at load and naming the file and the field, what a hand-edited or damaged file may hold:
NaN or infinite tensors, a malformed schedule, missing or unreadable metadata, a truncated file, no format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from retrace.editing.directions import Direction, load_direction, save_direction
from retrace.inversion.gan_latent import GanLatent, load_gan_latent, save_gan_latent
from retrace.inversion.record import Inversion, NullText

pytestmark = pytest.mark.core

SIGMAS = torch.linspace(0.03, 14.6, 4)


def inversion() -> Inversion:
    g = torch.Generator().manual_seed(0)
    return Inversion(trajectory=torch.randn(4, 1, 4, 8, 8, generator=g), sigmas=SIGMAS, family="eps",
                     model_name="SD15", method="euler", guidance=1.0)


def null_text() -> NullText:
    g = torch.Generator().manual_seed(1)
    return NullText(embeddings=torch.randn(3, 1, 77, 32, generator=g), sigmas=SIGMAS, family="eps",
                    model_name="SD15", latent_shape=(1, 4, 8, 8), guidance=7.5)


def saved(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    if kind == "inversion":
        inversion().save(str(path))
    elif kind == "null_text":
        null_text().save(str(path))
    elif kind == "gan_latent":
        save_gan_latent(path, GanLatent(ws=torch.randn(1, 4, 8), space="w+", model_id="x", family="stylegan2"))
    else:
        save_direction(path, Direction(vectors=torch.randn(2, 8), space="w", method="sefa", model_id="x"))
    return path


LOADERS: dict[str, Callable[[Path], object]] = {
    "inversion": lambda p: Inversion.load(str(p)), "null_text": lambda p: NullText.load(str(p)),
    "gan_latent": load_gan_latent, "direction": load_direction,
}
MAIN_TENSOR = {"inversion": "trajectory", "null_text": "embeddings", "gan_latent": "ws", "direction": "vectors"}


def rewritten(path: Path, tensors: dict | None = None, meta: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """``path`` rewritten with some tensors or metadata fields replaced or dropped (as a user's editor would)."""
    with safe_open(str(path), framework="pt") as f:
        old_meta = dict(f.metadata() or {})
        old = {k: f.get_tensor(k) for k in f.keys()}
    old.update(tensors or {})
    old_meta.update(meta or {})
    for key in drop:
        old.pop(key, None)
        old_meta.pop(key, None)
    out = path.with_name("edited_" + path.name)
    save_file(old, str(out), metadata=old_meta)
    return out


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused_naming_file_and_field(tmp_path: Path, kind: str, value: float) -> None:
    path = saved(tmp_path, kind)
    LOADERS[kind](path)  # the untouched file loads
    key = MAIN_TENSOR[kind]
    with safe_open(str(path), framework="pt") as f:
        tensor = f.get_tensor(key).clone()
    tensor.view(-1)[3] = value
    edited = rewritten(path, tensors={key: tensor})
    with pytest.raises(ValueError, match=rf"edited_{kind}\.safetensors holds NaN or infinite values in '{key}'"):
        LOADERS[kind](edited)


@pytest.mark.parametrize("kind", ["inversion", "null_text"])
@pytest.mark.parametrize(("sigmas", "fragment"), [
    (SIGMAS.flip(0), "must ascend"),
    (torch.tensor([-1.0, 0.5, 2.0, 3.0]), "not negative"),
    (torch.tensor([0.1, 0.1, 2.0, 3.0]), "must ascend"),
    (SIGMAS.view(2, 2), "1-D schedule"),
])
def test_malformed_schedule_is_refused(tmp_path: Path, kind: str, sigmas: torch.Tensor, fragment: str) -> None:
    edited = rewritten(saved(tmp_path, kind), tensors={"sigmas": sigmas.contiguous()})
    with pytest.raises(ValueError, match=rf"edited_{kind}\.safetensors: .*sigmas .*{fragment}"):
        LOADERS[kind](edited)


@pytest.mark.parametrize("kind", ["inversion", "null_text"])
@pytest.mark.parametrize("field", ["family", "model_name", "sigmas"])
def test_missing_field_is_named(tmp_path: Path, kind: str, field: str) -> None:
    edited = rewritten(saved(tmp_path, kind), drop=(field,))
    with pytest.raises(ValueError, match=rf"edited_{kind}\.safetensors lacks '{field}'"):
        LOADERS[kind](edited)


@pytest.mark.parametrize("kind", ["inversion", "null_text"])
@pytest.mark.parametrize(("field", "value"), [("extra", "{not json"), ("extra", "[1, 2]"), ("guidance", "nan"),
                                              ("guidance", "lots"), ("latent_shape", "[1, -4]")])
def test_unreadable_metadata_is_named(tmp_path: Path, kind: str, field: str, value: str) -> None:
    edited = rewritten(saved(tmp_path, kind), meta={field: value})
    with pytest.raises(ValueError, match=rf"edited_{kind}\.safetensors.*'{field}'"):
        LOADERS[kind](edited)


@pytest.mark.parametrize("kind", list(LOADERS))
def test_truncated_file_is_refused_naming_it(tmp_path: Path, kind: str) -> None:
    path = saved(tmp_path, kind)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut\.safetensors cannot be read as a Retrace"):
        LOADERS[kind](cut)


@pytest.mark.parametrize("kind", list(LOADERS))
def test_file_without_a_format_says_so(tmp_path: Path, kind: str) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain), metadata={"note": json.dumps("hi")})
    with pytest.raises(ValueError, match=r"plain\.safetensors is not a Retrace .*metadata names no Retrace format"):
        LOADERS[kind](plain)
