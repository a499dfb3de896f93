"""The Inversion record and the decoder-side latent refinement, without the host."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from retrace.inversion.record import Inversion
from retrace.inversion.vae_refine import psnr, refine_latent

pytestmark = pytest.mark.core


def make_inversion(steps: int = 3, shape: tuple[int, ...] = (2, 4, 8, 8), family: str = "eps") -> Inversion:
    g = torch.Generator().manual_seed(0)
    return Inversion(trajectory=torch.randn(steps + 1, *shape, generator=g),
                     sigmas=torch.linspace(1e-4, 14.6, steps + 1), family=family, model_name="SD15",
                     method="euler", guidance=1.0, extra={"scheduler": "normal"})


def test_save_load_roundtrip_is_bitwise(tmp_path: Path) -> None:
    inv = make_inversion()
    path = tmp_path / "inv.safetensors"
    inv.save(str(path))
    back = Inversion.load(str(path))
    assert torch.equal(back.trajectory, inv.trajectory) and torch.equal(back.sigmas, inv.sigmas)
    assert (back.family, back.model_name, back.method, back.guidance, back.extra) == (
        "eps", "SD15", "euler", 1.0, {"scheduler": "normal"})
    assert back.latent_shape == (2, 4, 8, 8) and back.steps == 3
    assert torch.equal(back.noise, inv.trajectory[-1]) and torch.equal(back.source, inv.trajectory[0])


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="never overwrites"):
        make_inversion().save(str(path))
    assert path.read_bytes() == b"the user's file"


def test_load_refuses_other_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a Retrace inversion"):
        Inversion.load(str(path))


def test_mismatches_name_what_differs() -> None:
    inv = make_inversion()
    assert inv.mismatches("eps", "SD15", (2, 4, 8, 8)) == []
    found = inv.mismatches("flow", "Flux", (2, 16, 8, 8))
    assert len(found) == 3 and "'eps'" in found[0] and "'Flux'" in found[1] and "[2, 16, 8, 8]" in found[2]
    with pytest.raises(ValueError, match="latent shape: inversion has \\[2, 4, 8, 8\\], the latent is \\[1, 4, 16, 16\\]"):
        inv.check(latent_shape=(1, 4, 16, 16))


def test_record_refuses_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="family"):
        make_inversion(family="edm")
    with pytest.raises(ValueError, match="one latent per sigma"):
        Inversion(trajectory=torch.zeros(3, 1, 4, 8, 8), sigmas=torch.linspace(0.1, 1, 5), family="flow",
                  model_name="Flux", method="euler")


def test_psnr() -> None:
    a = torch.zeros(1, 4, 4, 3)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)


def test_refinement_lowers_decoder_error() -> None:
    """A fixed random conv 'decoder' whose encoder is off: refinement must close most of the gap."""
    g = torch.Generator().manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 3, 2, stride=2), torch.nn.Sigmoid())
    for p in decoder.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5
        p.requires_grad_(False)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return decoder(z).movedim(1, -1)

    z_true = torch.randn(2, 4, 8, 8, generator=g)
    image = decode(z_true).detach()
    z_enc = z_true + 0.5 * torch.randn(z_true.shape, generator=g)
    z, losses = refine_latent(decode, z_enc, image, steps=60, lr=0.05)
    assert len(losses) == 61 and losses[-1] < losses[0] / 10
    assert psnr(decode(z), image) > psnr(decode(z_enc), image) + 10
    z0, losses0 = refine_latent(decode, z_enc, image, steps=0)
    assert torch.equal(z0, z_enc) and len(losses0) == 1
    with pytest.raises(ValueError, match=">= 0"):
        refine_latent(decode, z_enc, image, steps=-1)


def test_fingerprints_tell_latents_apart_but_survive_the_hosts_latent_format() -> None:
    from retrace.inversion.record import fingerprint, same_fingerprint

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    round_trip = (a.float() / 0.18215).float() * 0.18215  # process_latent_out, then process_latent_in
    assert same_fingerprint(fingerprint(a), fingerprint(round_trip))
    assert not same_fingerprint(fingerprint(a), fingerprint(b))
    assert not same_fingerprint(fingerprint(a), fingerprint(a * 1.01))
    assert len(fingerprint(a)) == 10 and not same_fingerprint(fingerprint(a), fingerprint(a)[:5])
