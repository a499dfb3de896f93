"""Retrace Load Toy World on the host: a toy world file (here with seeded random weights; the shipped one is trained)
loads into the host's own classes, runs through the host's CLIP, sampler and VAE, and bad files are refused before
any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import comfy.sample  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from retrace.nodes import _toy_world as toy  # noqa: E402
from retrace.nodes.toy_world import RetraceLoadToyWorld  # noqa: E402
from scripts import train_toy_world as train  # noqa: E402

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    patcher, clip, vae = train.untrained(seed=0)
    return train.save(tmp_path_factory.mktemp("toy") / "sd15_toy.safetensors", patcher, clip, vae, {"seed": 0})


def rewritten(source: Path, target: Path, tensors=None, metadata=None) -> Path:
    with safe_open(str(source), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if tensors:
        tensors(state)
    if metadata:
        metadata(meta)
    save_file(state, str(target), metadata=meta)
    return target


def test_a_toy_world_file_runs_through_the_host(toy_file: Path) -> None:
    model, clip, vae = toy.load("sd15", toy_file)
    assert type(model.model).__name__ == "BaseModel" and model.model.model_config.__class__.__name__ == "SD15"
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle and a blue square on a white background"))
    assert positive[0][0].shape == (1, 77, toy.TEXT_CONFIG["hidden_size"])
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    samples = comfy.sample.sample(model, noise, 2, 1.0, "euler", "normal", positive, positive, latent,
                                  disable_pbar=True, seed=0)
    image = vae.decode(samples)
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(image).all())
    assert vae.encode(image).shape == (1, 4, 8, 8)


def test_the_token_table_keeps_the_world_rows_and_zeroes_the_rest(toy_file: Path) -> None:
    _, clip, _ = toy.load("sd15", toy_file)
    table = toy.text_module(clip).text_model.embeddings.token_embedding.weight
    with safe_open(str(toy_file), framework="pt") as f:
        rows = f.get_tensor("text.token_rows").long()
        stored = f.get_tensor("text.text_model.embeddings.token_embedding.weight")
    assert torch.equal(table[rows], stored.float())
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[rows] = False
    assert int(table[others].abs().sum()) == 0 and len(rows) < 40


def test_the_node_refuses_a_family_it_lacks() -> None:
    with pytest.raises(ValueError, match=r"no 'flux' family; it has \['sd15'\]"):
        RetraceLoadToyWorld.execute("flux")


@pytest.mark.parametrize("damage, message", [
    ("truncated", "cannot be read as a toy world file"),
    ("format", "is not a toy world sd15 file"),
    ("nan", "NaN or infinite weights"),
    ("huge", "sizes outside a toy world's"),
    ("missing", "tensors missing"),
])
def test_bad_files_are_refused_before_anything_is_built(toy_file: Path, tmp_path: Path, damage: str,
                                                        message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "bad.safetensors"
    if damage == "truncated":
        target.write_bytes(toy_file.read_bytes()[:1000])
    elif damage == "format":
        rewritten(toy_file, target, metadata=lambda m: m.update(format="something-else"))
    elif damage == "nan":
        rewritten(toy_file, target, tensors=lambda s: s["unet.out.2.weight"].view(-1)[0:1].fill_(float("nan")))
    elif damage == "huge":
        config = {**toy.TEXT_CONFIG, "hidden_size": 1 << 20}
        rewritten(toy_file, target, metadata=lambda m: m.update(text_config=json.dumps(config)))
    else:
        rewritten(toy_file, target, tensors=lambda s: s.pop("unet.out.2.weight"))
    built = []
    if damage != "missing":  # a missing tensor is only found against the built module
        monkeypatch.setattr(toy, "build_unet", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=message):
        toy.load("sd15", target)
    assert built == []
