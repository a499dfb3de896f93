"""LPIPS on user-supplied VGG16 / AlexNet files (random weights here; nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from retrace.inversion.gan_projection import ProjectionSettings, project
from retrace.models.perceptual import LPIPS, backbone_of, load_lpips
from stylegan_files import render, tiny_generator

pytestmark = pytest.mark.core


def torchvision_file(tmp_path, backbone: str, seed: int = 0) -> tuple:
    """A file with torchvision's key names (``features.N.*`` plus a classifier we must ignore)."""
    torch.manual_seed(seed)
    net = LPIPS(backbone)
    state = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(8, 8)
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("backbone", ["vgg16", "alexnet"])
def test_lpips_is_a_distance_on_a_loaded_trunk(tmp_path, backbone: str) -> None:
    path, state = torchvision_file(tmp_path, backbone)
    model = load_lpips(path)
    assert model.backbone == backbone == backbone_of(state)
    for k, v in model.features.state_dict().items():
        assert torch.equal(v, state[f"features.{k}"])
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    b = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    assert torch.equal(model(a, a), torch.zeros(2))
    ab, ba = model(a, b), model(b, a)
    torch.testing.assert_close(ab, ba)
    assert bool((ab > 0).all())
    x = a.clone().requires_grad_(True)
    model(x, b).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_lin_weights_scale_the_channels(tmp_path) -> None:
    path, _ = torchvision_file(tmp_path, "alexnet")
    lins = {f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 2.0) for k, c in enumerate([64, 192, 384, 256, 256])}
    lin_path = tmp_path / "alex.pth"
    torch.save(lins, lin_path)
    a, b = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64) * 0.5
    plain, weighted = load_lpips(path)(a, b), load_lpips(path, lin_path)(a, b)
    torch.testing.assert_close(weighted, 2 * plain)
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, lin_path)
    with pytest.raises(ValueError, match="lin weights: missing or mis-shaped 'lin0.model.1.weight'"):
        load_lpips(path, lin_path)


def test_files_that_are_not_a_trunk_are_refused(tmp_path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="no 'features.0.weight'"):
        load_lpips(other)
    path, state = torchvision_file(tmp_path, "vgg16")
    del state["features.28.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not match torchvision's vgg16 layout"):
        load_lpips(path)


def test_projection_uses_lpips_when_given(tmp_path) -> None:
    path, _ = torchvision_file(tmp_path, "alexnet")
    G = tiny_generator("stylegan2")
    target = render(G, batch=1)
    calls = []
    model = load_lpips(path)
    original = model.forward

    def counted(a, b):
        calls.append(a.shape)
        return original(a, b)

    model.forward = counted
    project(G, target, ProjectionSettings(steps=4, w_avg_samples=256, loss_resolution=16), lpips=model)
    assert len(calls) >= 4 and calls[0][-1] == 16


def test_a_lin_file_beside_the_trunk_is_picked_for_its_backbone_only(tmp_path) -> None:
    """LPIPS' own ``alex.pth`` / ``vgg.pth`` among the candidates calibrates the matching trunk and nothing else."""
    from retrace.models.perceptual import is_lin_file

    alex, _ = torchvision_file(tmp_path, "alexnet")
    lin_path = tmp_path / "alex.pth"
    torch.save({f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 3.0)
                for k, c in enumerate([64, 192, 384, 256, 256])}, lin_path)
    vgg_lin = tmp_path / "vgg.pth"
    torch.save({"lin0.model.1.weight": torch.ones(1, 1, 1, 1)}, vgg_lin)  # would be refused if it were used
    a, b = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64) * 0.5
    plain = load_lpips(alex)(a, b)
    torch.testing.assert_close(load_lpips(alex, lin_candidates=[vgg_lin, lin_path])(a, b), 3 * plain)
    torch.testing.assert_close(load_lpips(alex, lin_candidates=[vgg_lin])(a, b), plain)
    assert [is_lin_file(n) for n in ("alex.pth", "vgg.safetensors", "alexnet-owt-7be5be79.pth", "vgg16.pth")] == \
        [True, True, False, False]
