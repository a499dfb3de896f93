"""StyleGAN3 generator (configs T and R): schedule, names, shapes, precision, and outputs of the original code.

The fixtures ``tests/data/stylegan3_reference_{t,r}.safetensors`` hold a tiny generator built with the
original implementation (its own filters, Fourier frequencies and phases; every parameter filled from a seeded
generator), a batch of z, the ws its mapping gave, and the images its synthesis rendered on the CPU (plain,
truncated, and with a user transform). Data only.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from retrace.models import build_generator
from retrace.models.layers import upfirdn2d
from retrace.models.stylegan3 import (Generator, _fir_downsample, design_lowpass_filter, filtered_lrelu,
                                      synthesis_schedule)

pytestmark = pytest.mark.core

DATA = Path(__file__).resolve().parent / "data"

NAMES_1024_T = ["L0_36_512", "L1_36_512", "L2_52_512", "L3_52_512", "L4_84_512", "L5_148_512", "L6_148_512",
                "L7_276_323", "L8_276_203", "L9_532_128", "L10_1044_81", "L11_1044_51", "L12_1044_32",
                "L13_1024_32", "L14_1024_3"]
NAMES_1024_R = ["L0_36_1024", "L1_36_1024", "L2_52_1024", "L3_52_1024", "L4_84_1024", "L5_148_1024", "L6_148_1024",
                "L7_276_645", "L8_276_406", "L9_532_256", "L10_1044_161", "L11_1044_102", "L12_1044_64",
                "L13_1024_64", "L14_1024_3"]
KW_1024_T = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3, mapping_kwargs={"num_layers": 2},
                 channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256, magnitude_ema_beta=0.999)
KW_1024_R = dict(KW_1024_T, channel_base=65536, channel_max=1024, conv_kernel=1, use_radial_filters=True)

IMAGE_TOL = 1e-4


def tiny_kwargs(config: str, resolution: int) -> dict:
    kw = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=resolution, img_channels=3,
              mapping_kwargs={"num_layers": 2}, channel_base=128, channel_max=8)
    if config == "r":
        kw.update(conv_kernel=1, use_radial_filters=True)
    return kw


def load_fixture(config: str) -> tuple[Generator, dict[str, torch.Tensor], dict[str, str]]:
    path = DATA / f"stylegan3_reference_{config}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.manual_seed(0)
    G = Generator(**json.loads(meta["init_kwargs"])).eval()
    G.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("G.")}, strict=True)
    return G, tensors, meta


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR with the reference's own value range as the peak (stricter than a fixed [-1, 1] range)."""
    peak = (ref.max() - ref.min()).item()
    return 10 * math.log10(peak ** 2 / (a - ref).square().mean().item())


# --- the original implementation's outputs ------------------------------------------------------------------


@pytest.mark.parametrize("config", ["t", "r"])
def test_matches_original_implementation(config):
    G, t, meta = load_fixture(config)
    assert G.synthesis.layer_names == json.loads(meta["layer_names"])
    with torch.no_grad():
        ws = G.mapping(t["z"], None)
        image = G.synthesis(ws, noise_mode="const")
        image_fwd = G(t["z"])
        ws_psi = G.mapping(t["z"], None, truncation_psi=float(meta["truncation_psi"]),
                           truncation_cutoff=int(meta["truncation_cutoff"]))
    assert (ws - t["ws"]).abs().max().item() <= 1e-6
    assert (ws_psi - t["ws_psi"]).abs().max().item() <= 1e-6
    assert image.dtype == torch.float32 and image.shape == t["image"].shape
    diff = (image - t["image"]).abs().max().item()
    assert diff <= IMAGE_TOL, f"max abs diff {diff:.3g} vs the original implementation"
    assert (image_fwd - t["image"]).abs().max().item() <= IMAGE_TOL
    # The user transform (rotation + translation of the Fourier features), set the original's way and ours.
    with torch.no_grad():
        G.synthesis.input.transform.copy_(t["transform"])
        turned = G.synthesis(ws)
        G.synthesis.input.transform.copy_(torch.eye(3))
        G.synthesis.input.set_transform(angle=12.0, translate=(0.1, -0.05))
        turned_ours = G.synthesis(ws)
    assert (turned - t["image_transformed"]).abs().max().item() <= IMAGE_TOL
    assert (turned_ours - t["image_transformed"]).abs().max().item() <= IMAGE_TOL
    assert (turned - image).abs().max().item() > 1e-3  # the transform does move the image


@pytest.mark.parametrize("config", ["t", "r"])
def test_filter_design_matches_original(config):
    G, t, _ = load_fixture(config)
    fresh = Generator(**G.init_kwargs)
    checked = 0
    for name, buf in fresh.named_buffers():
        if name.endswith("_filter"):
            assert (buf - t[f"G.{name}"]).abs().max().item() <= 1e-6, name
            checked += 1
    assert checked == 2 * (len(G.synthesis.layer_names) - 1)


def test_meta_build_then_assign_loads_everything():
    """Every buffer is in the state_dict, so a generator built on ``meta`` is complete after ``assign=True``."""
    G, t, meta = load_fixture("r")
    with torch.device("meta"):
        lazy = Generator(**json.loads(meta["init_kwargs"]))
    lazy.load_state_dict(G.state_dict(), strict=True, assign=True)
    assert not any(v.is_meta for v in lazy.state_dict().values())
    with torch.no_grad():
        assert (lazy.synthesis(t["ws"][:1]) - t["image"][:1]).abs().max().item() <= IMAGE_TOL


def test_fixture_sizes():
    for config in "tr":
        assert (DATA / f"stylegan3_reference_{config}.safetensors").stat().st_size < 300_000


# --- shapes, names, state_dict ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["t", "r"])
@pytest.mark.parametrize("resolution", [16, 32])
def test_tiny_shapes(config, resolution):
    torch.manual_seed(0)
    G = Generator(**tiny_kwargs(config, resolution)).eval()
    assert G.family == "stylegan3" and G.num_ws == 16 and G.mapping.num_layers == 2
    assert G.mapping.w_avg_beta == 0.998
    z = torch.randn(2, 16)
    with torch.no_grad():
        ws = G.mapping(z, None)
        image = G(z)
    assert ws.shape == (2, 16, 16)
    assert image.shape == (2, 3, resolution, resolution) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and image.std().item() > 0
    x = G.synthesis.input(ws[:, 0])
    assert x.shape == (2, G.synthesis.input.channels, G.synthesis.input.size, G.synthesis.input.size)
    for idx, layer in enumerate(G.synthesis.layers()):
        x = layer(x, ws[:, idx + 1])
        assert x.shape == (2, layer.out_channels, layer.out_size, layer.out_size)
        assert layer.weight.shape[-1] == (1 if layer.is_torgb or config == "r" else 3)


@pytest.mark.parametrize("kw,names", [(KW_1024_T, NAMES_1024_T), (KW_1024_R, NAMES_1024_R)])
def test_layer_names_at_1024(kw, names):
    schedule_kw = {k: v for k, v in kw.items() if k in ("channel_base", "channel_max", "conv_kernel",
                                                         "use_radial_filters")}
    _, specs = synthesis_schedule(1024, 3, **schedule_kw)
    assert [s.name for s in specs] == names
    with torch.device("meta"):
        G = Generator(**kw)
    assert G.synthesis.layer_names == names
    sd = G.state_dict()
    assert len(sd) == 114
    assert sd["synthesis.input.weight"].shape == (int(names[0].split("_")[2]),) * 2
    assert sd["synthesis.input.affine.weight"].shape == (4, 512)
    assert sd["synthesis.L14_1024_3.weight"].shape[2:] == (1, 1)
    # The top num_fp16_res=4 resolutions (sampling rate >= 128) are the float16 layers.
    assert [layer.use_fp16 for layer in G.synthesis.layers()] == [False] * 5 + [True] * 10
    radial = kw.get("use_radial_filters", False)
    for layer in G.synthesis.layers()[:-1]:
        down = sd[f"synthesis.{layer.spec.name}.down_filter"]
        assert down.ndim == (2 if radial and not layer.is_critically_sampled else 1)
        assert sd[f"synthesis.{layer.spec.name}.up_filter"].ndim == 1


@pytest.mark.parametrize("config", ["t", "r"])
def test_state_dict_keys(config):
    G = Generator(**tiny_kwargs(config, 16))
    keys = set(G.state_dict())
    expected = {"mapping.fc0.weight", "mapping.fc0.bias", "mapping.fc1.weight", "mapping.fc1.bias", "mapping.w_avg",
                "synthesis.input.weight", "synthesis.input.affine.weight", "synthesis.input.affine.bias",
                "synthesis.input.transform", "synthesis.input.freqs", "synthesis.input.phases"}
    for layer in G.synthesis.layers():
        prefix = f"synthesis.{layer.spec.name}."
        expected |= {prefix + k for k in ("weight", "bias", "magnitude_ema", "affine.weight", "affine.bias")}
        if layer.up_taps > 1:
            expected.add(prefix + "up_filter")
        if layer.down_taps > 1:
            expected.add(prefix + "down_filter")
    assert keys == expected
    last = G.synthesis.layers()[-1]
    assert last.is_torgb and last.up_taps == 1 and last.down_taps == 1
    assert f"synthesis.{last.spec.name}.up_filter" not in keys
    assert f"synthesis.{last.spec.name}.down_filter" not in keys
    assert len(keys) == 11 + 5 * 15 + 2 * 14
    assert torch.equal(G.state_dict()["synthesis.input.transform"], torch.eye(3))
    assert torch.equal(G.synthesis.input.affine.bias.detach(), torch.tensor([1.0, 0, 0, 0]))
    assert G.synthesis.input.affine.weight.abs().max().item() == 0


# --- interface ------------------------------------------------------------------------------------------------


def test_init_kwargs_forms():
    flat = tiny_kwargs("r", 16)
    G = Generator(**flat, magnitude_ema_beta=0.999)
    assert json.loads(json.dumps(G.init_kwargs)) == G.init_kwargs
    assert G.init_kwargs["conv_kernel"] == 1 and "synthesis_kwargs" not in G.init_kwargs
    H = build_generator("stylegan3", G.init_kwargs)
    assert H.synthesis.layer_names == G.synthesis.layer_names
    assert {k: v.shape for k, v in H.state_dict().items()} == {k: v.shape for k, v in G.state_dict().items()}
    synthesis = {k: flat.pop(k) for k in ("channel_base", "channel_max", "conv_kernel", "use_radial_filters")}
    nested = Generator(**flat, synthesis_kwargs=synthesis)
    assert nested.init_kwargs == {**flat, **synthesis}
    assert nested.synthesis.layer_names == G.synthesis.layer_names
    with pytest.raises(TypeError):
        Generator(**tiny_kwargs("t", 16), architecture_that_does_not_exist=1)


def test_noise_and_styles_interface():
    G, t, _ = load_fixture("r")
    assert G.noise_maps() == {}
    styles = G.style_layers()
    assert [name for name, _, _ in styles] == G.synthesis.layer_names
    assert [idx for _, idx, _ in styles] == list(range(1, G.num_ws))
    assert all(affine is getattr(G.synthesis, name).affine for name, _, affine in styles)
    ws = t["ws"][:1]
    with torch.no_grad():
        images = [G.synthesis(ws, noise_mode=mode, noise=noise)
                  for mode, noise in (("const", None), ("random", {}), ("none", None))]
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])
    assert (images[0] - t["image"][:1]).abs().max().item() <= IMAGE_TOL
    with pytest.raises(ValueError):
        G.synthesis(ws, noise={"L0_36_32": torch.zeros(1, 1, 36, 36)})
    with pytest.raises(ValueError):
        G.synthesis(ws, noise_mode="sometimes")
    with pytest.raises(ValueError):
        G.synthesis(ws[:, :-1])


def test_gradients_reach_ws():
    G, t, _ = load_fixture("r")
    G.requires_grad_(False)
    ws = t["ws"].clone().requires_grad_(True)
    G.synthesis(ws).square().mean().backward()
    grad = ws.grad
    assert torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=2) > 0).all()  # every row, the input transform's ws[0] included


def test_truncation():
    G, t, meta = load_fixture("t")
    with torch.no_grad():
        ws = G.mapping(t["z"], None, truncation_psi=0.0)
        assert torch.allclose(ws, G.mapping.w_avg.expand_as(ws))
        ws_half = G.mapping(t["z"], None, truncation_psi=0.5, truncation_cutoff=8)
        assert torch.allclose(ws_half[:, 8:], t["ws"][:, 8:])
        assert torch.allclose(ws_half[:, :8], G.mapping.w_avg.lerp(t["ws"][:, :8], 0.5))
        image = G(t["z"], truncation_psi=0.5, truncation_cutoff=8)
        assert torch.allclose(image, G.synthesis(t["ws_psi"]), atol=1e-6)


# --- precision --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,config", [(torch.bfloat16, "t"), (torch.bfloat16, "r"), (torch.float16, "r")])
def test_whole_model_cast(dtype, config):
    G, t, _ = load_fixture(config)
    low = copy.deepcopy(G).to(dtype)
    assert low.synthesis.input.weight.dtype == dtype
    with torch.no_grad():
        image = low(t["z"][:1])
    assert image.dtype == torch.float32
    assert psnr(image, t["image"][:1]) > 25
    if dtype == torch.bfloat16 and config == "r":
        with torch.no_grad():
            forced = low.synthesis(t["ws"][:1], force_fp32=True)
        assert forced.dtype == torch.float32
        assert psnr(forced, t["image"][:1]) > psnr(image, t["image"][:1])  # same rounded weights, float32 math


def test_float32_model_stays_float32_off_cuda():
    G, t, _ = load_fixture("t")
    assert any(layer.use_fp16 for layer in G.synthesis.layers())
    with torch.no_grad():
        assert torch.equal(G.synthesis(t["ws"]), G.synthesis(t["ws"], force_fp32=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="per-layer float16 runs on CUDA only")
def test_per_layer_fp16_on_cuda():
    G, t, _ = load_fixture("t")
    G = G.cuda()
    with torch.no_grad():
        mixed = G.synthesis(t["ws"].cuda()).cpu()
        full = G.synthesis(t["ws"].cuda(), force_fp32=True).cpu()
    assert mixed.dtype == torch.float32
    assert (full - t["image"]).abs().max().item() <= 1e-3
    assert psnr(mixed, t["image"]) > 30


# --- filters and the filtered nonlinearity ------------------------------------------------------------------


def test_filter_design_matches_scipy():
    signal = pytest.importorskip("scipy.signal")
    special = pytest.importorskip("scipy.special")
    import numpy as np

    for kw in (KW_1024_T, KW_1024_R):
        _, specs = synthesis_schedule(1024, 3, channel_base=kw["channel_base"], channel_max=kw["channel_max"],
                                      use_radial_filters=kw.get("use_radial_filters", False))
        for s in specs[:-1]:
            up = signal.firwin(numtaps=s.up_taps, cutoff=s.in_cutoff, width=s.in_half_width * 2,
                               fs=s.tmp_sampling_rate)
            ours = design_lowpass_filter(s.up_taps, s.in_cutoff, s.in_half_width * 2, s.tmp_sampling_rate)
            assert np.abs(ours.numpy() - up).max() < 1e-7
            ours = design_lowpass_filter(s.down_taps, s.out_cutoff, s.out_half_width * 2, s.tmp_sampling_rate,
                                         radial=s.down_radial)
            if not s.down_radial:
                ref = signal.firwin(numtaps=s.down_taps, cutoff=s.out_cutoff, width=s.out_half_width * 2,
                                    fs=s.tmp_sampling_rate)
            else:  # windowed jinc, J1(2 pi fc r) / (pi r), Kaiser window from the 1-D design rule
                n, fs = s.down_taps, s.tmp_sampling_rate
                x = (np.arange(n) - (n - 1) / 2) / fs
                r = np.hypot(*np.meshgrid(x, x))
                ref = special.j1(2 * s.out_cutoff * np.pi * r) / (np.pi * r)
                beta = signal.kaiser_beta(signal.kaiser_atten(n, s.out_half_width * 2 / (fs / 2)))
                ref = ref * np.outer(np.kaiser(n, beta), np.kaiser(n, beta))
                ref = ref / ref.sum()
            assert np.abs(ours.numpy() - ref).max() < 1e-7
    assert design_lowpass_filter(1, 4.0, 1.0, 32) is None


def test_strided_downsample_matches_upfirdn2d():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 23, 23, generator=gen)
    for f in (torch.rand(12, generator=gen), torch.rand(12, 12, generator=gen)):
        for down in (1, 2, 4):
            assert torch.allclose(_fir_downsample(x, f, down), upfirdn2d(x, f, down=down), atol=1e-6)
    assert torch.equal(_fir_downsample(x, None, 2), x[:, :, ::2, ::2])
    # Linear, gain 1, no filters: bias and a crop only.
    b = torch.randn(3, generator=gen)
    out = filtered_lrelu(x, None, None, b, padding=(-1, -2, -1, -2), gain=1.0, slope=1.0)
    assert torch.allclose(out, (x + b.reshape(1, 3, 1, 1))[:, :, 1:-2, 1:-2])
