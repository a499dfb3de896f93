"""StyleGAN2 generator: structure, names, w-index mapping, noise, precision, and equivalence with the original.

The ``tests/data/stylegan2_reference_*.safetensors`` fixtures hold the tensors of tiny generators built with the
NVlabs code (stylegan3 repo ``training/networks_stylegan2.py`` and stylegan2-ada-pytorch ``training/networks.py``),
every parameter and buffer filled from a seeded generator, plus their inputs and rendered outputs (data only).
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
from retrace.models.stylegan2 import Generator

pytestmark = pytest.mark.core

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = ["skip16", "resnet32", "cond_fp16_16", "ada_orig16", "ada_skip32_defaults"]
TINY = dict(z_dim=16, c_dim=0, w_dim=16, channel_base=128, channel_max=16, mapping_kwargs={"num_layers": 2})


def tiny(img_resolution: int = 16, architecture: str = "skip", seed: int = 0, **kwargs) -> Generator:
    """A tiny generator with nonzero noise strengths (they start at zero)."""
    torch.manual_seed(seed)
    G = Generator(img_resolution=img_resolution, img_channels=kwargs.pop("img_channels", 3),
                  architecture=architecture, **{**TINY, **kwargs}).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.3)
    return G


def load_fixture(name: str) -> tuple[Generator, dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(DATA / f"stylegan2_reference_{name}.safetensors"), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    G = Generator(**json.loads(meta["init_kwargs"])).eval()
    G.load_state_dict({k[2:]: v for k, v in t.items() if k.startswith("G.")}, strict=True)
    return G, t, meta


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR for images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / (a - b).square().mean().item())


# --- equivalence with the original implementation ----------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_original_outputs(name: str) -> None:
    G, t, meta = load_fixture(name)
    assert G.num_ws == int(meta["num_ws"])
    with torch.no_grad():
        ws = G.mapping(t["z"], t.get("c"))
        ws_trunc = G.mapping(t["z"], t.get("c"), truncation_psi=0.6, truncation_cutoff=3)
        img = G.synthesis(t["ws"], noise_mode="const")
        img_unfused = G.synthesis(t["ws"], noise_mode="const", fused_modconv=False)
        img_none = G.synthesis(t["ws"], noise_mode="none")
        img_one = G.synthesis(t["ws"][:1], noise_mode="const")
        img_full = G(t["z"], t.get("c"))
        img_rand = G.synthesis(t["ws_rand"], noise_mode="const")
    assert (ws - t["ws"]).abs().max().item() <= 1e-5
    assert (ws_trunc - t["ws_trunc"]).abs().max().item() <= 1e-5
    assert img.dtype == torch.float32 and img.shape == t["img"].shape
    # Measured: at most 1e-6 on every fixture (float32 rounding).
    assert (img - t["img"]).abs().max().item() <= 1e-5
    assert (img_unfused - t["img"]).abs().max().item() <= 1e-5
    assert (img_none - t["img_none"]).abs().max().item() <= 1e-5
    assert (img_one - t["img_batch1_unfused"]).abs().max().item() <= 1e-5
    assert (img_full - t["img"]).abs().max().item() <= 1e-5
    # A different w per layer and per sample: the w-index mapping and per-sample weights match too.
    assert (img_rand - t["img_rand"]).abs().max().item() <= 1e-5
    # The fixture is not trivial: noise, the samples and the per-layer ws all matter.
    assert (t["img"] - t["img_none"]).abs().max().item() > 1e-2
    assert (t["img_rand"][0] - t["img_rand"][1]).abs().max().item() > 1e-1
    with torch.no_grad():
        ws_shuffled = t["ws_rand"].flip(1)
        assert (G.synthesis(ws_shuffled) - t["img_rand"]).abs().max().item() > 1e-1


def test_fixtures_exercise_clamping() -> None:
    """With conv_clamp=2 the reference output differs from an unclamped render, so the clamp is really tested."""
    G, t, _ = load_fixture("resnet32")
    kwargs = dict(G.init_kwargs, conv_clamp=None)
    H = build_generator("stylegan2", kwargs).eval()
    H.load_state_dict(G.state_dict())
    with torch.no_grad():
        assert (H.synthesis(t["ws"]) - t["img"]).abs().max().item() > 1e-2


# --- structure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["orig", "skip", "resnet"])
@pytest.mark.parametrize("res", [8, 16, 32])
def test_shapes_and_num_ws(res: int, architecture: str) -> None:
    G = tiny(res, architecture)
    assert G.num_ws == 2 * int(math.log2(res)) - 2 == G.mapping.num_ws
    assert G.family == "stylegan2"
    with torch.no_grad():
        img = G(torch.randn(2, 16))
    assert img.shape == (2, 3, res, res) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    torgbs = [n for n, _ in G.synthesis.named_children() if hasattr(getattr(G.synthesis, n), "torgb")]
    assert torgbs == ([f"b{r}" for r in G.synthesis.block_resolutions] if architecture == "skip" else [f"b{res}"])


def test_channels_and_conditioning() -> None:
    for channels in (1, 2, 4):
        G = tiny(8, img_channels=channels, c_dim=5)
        c = torch.nn.functional.one_hot(torch.tensor([0, 3]), 5).float()
        with torch.no_grad():
            img = G(torch.randn(2, 16), c)
        assert img.shape == (2, channels, 8, 8)
        assert G.mapping.embed.weight.shape == (16, 5)
        with pytest.raises(ValueError):
            G(torch.randn(2, 16))


def test_channel_counts() -> None:
    """min(channel_base // res, channel_max) per block."""
    G = Generator(8, 0, 8, 64, 3, channel_base=512, channel_max=24)
    expected = {4: 24, 8: 24, 16: 24, 32: 16, 64: 8}
    for res, ch in expected.items():
        assert getattr(G.synthesis, f"b{res}").conv1.weight.shape[0] == ch


def _expected_skip16_keys() -> set[str]:
    """NVlabs G_ema.state_dict() keys of a 16 px, 'skip', unconditional generator, written out."""
    keys = ["mapping.w_avg"] + [f"mapping.fc{i}.{p}" for i in range(8) for p in ("weight", "bias")]
    keys += [
        "synthesis.b4.const", "synthesis.b4.resample_filter",
        "synthesis.b4.conv1.weight", "synthesis.b4.conv1.bias", "synthesis.b4.conv1.noise_strength",
        "synthesis.b4.conv1.noise_const", "synthesis.b4.conv1.resample_filter",
        "synthesis.b4.conv1.affine.weight", "synthesis.b4.conv1.affine.bias",
        "synthesis.b4.torgb.weight", "synthesis.b4.torgb.bias",
        "synthesis.b4.torgb.affine.weight", "synthesis.b4.torgb.affine.bias",
        "synthesis.b8.resample_filter",
        "synthesis.b8.conv0.weight", "synthesis.b8.conv0.bias", "synthesis.b8.conv0.noise_strength",
        "synthesis.b8.conv0.noise_const", "synthesis.b8.conv0.resample_filter",
        "synthesis.b8.conv0.affine.weight", "synthesis.b8.conv0.affine.bias",
        "synthesis.b8.conv1.weight", "synthesis.b8.conv1.bias", "synthesis.b8.conv1.noise_strength",
        "synthesis.b8.conv1.noise_const", "synthesis.b8.conv1.resample_filter",
        "synthesis.b8.conv1.affine.weight", "synthesis.b8.conv1.affine.bias",
        "synthesis.b8.torgb.weight", "synthesis.b8.torgb.bias",
        "synthesis.b8.torgb.affine.weight", "synthesis.b8.torgb.affine.bias",
        "synthesis.b16.resample_filter",
        "synthesis.b16.conv0.weight", "synthesis.b16.conv0.bias", "synthesis.b16.conv0.noise_strength",
        "synthesis.b16.conv0.noise_const", "synthesis.b16.conv0.resample_filter",
        "synthesis.b16.conv0.affine.weight", "synthesis.b16.conv0.affine.bias",
        "synthesis.b16.conv1.weight", "synthesis.b16.conv1.bias", "synthesis.b16.conv1.noise_strength",
        "synthesis.b16.conv1.noise_const", "synthesis.b16.conv1.resample_filter",
        "synthesis.b16.conv1.affine.weight", "synthesis.b16.conv1.affine.bias",
        "synthesis.b16.torgb.weight", "synthesis.b16.torgb.bias",
        "synthesis.b16.torgb.affine.weight", "synthesis.b16.torgb.affine.bias",
    ]
    return set(keys)


def test_state_dict_keys_match_nvlabs() -> None:
    G = Generator(16, 0, 16, 16, 3, mapping_kwargs={"num_layers": 8}, channel_base=128, channel_max=16)
    sd = G.state_dict()
    assert set(sd) == _expected_skip16_keys()
    assert len(sd) == 68
    assert sd["synthesis.b4.resample_filter"].shape == (4, 4)
    assert torch.allclose(sd["synthesis.b8.conv0.resample_filter"],
                          torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)
    assert sd["synthesis.b16.conv0.noise_const"].shape == (16, 16)
    assert sd["synthesis.b16.conv0.affine.weight"].shape == (16, 16)
    assert sd["synthesis.b16.conv0.affine.bias"].eq(1).all()  # bias_init=1
    # 'resnet' adds the shortcut (weight and its filter) and drops the torgb of all but the last block.
    keys = set(Generator(16, 0, 16, 16, 3, mapping_kwargs={"num_layers": 8}, channel_base=128, channel_max=16,
                         architecture="resnet").state_dict())
    skip_keys = {f"synthesis.b{r}.skip.{p}" for r in (8, 16) for p in ("weight", "resample_filter")}
    no_torgb = {k for k in _expected_skip16_keys() if k.startswith(("synthesis.b4.torgb", "synthesis.b8.torgb"))}
    assert keys == (_expected_skip16_keys() - no_torgb) | skip_keys


def test_config_f_1024_layout() -> None:
    """The reference's config F at 1024: 182 entries, 18 ws, 32 channels at the top."""
    with torch.device("meta"):
        G = Generator(512, 0, 512, 1024, 3, channel_base=32768, channel_max=512)
    sd = G.state_dict()
    assert len(sd) == 182 and G.num_ws == 18
    assert sd["synthesis.b1024.conv0.weight"].shape == (32, 64, 3, 3)
    assert sd["synthesis.b1024.torgb.weight"].shape == (3, 32, 1, 1)
    assert sd["synthesis.b64.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["synthesis.b128.conv1.weight"].shape == (256, 256, 3, 3)


def test_nested_and_flat_kwargs() -> None:
    common = dict(z_dim=16, c_dim=2, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs={"num_layers": 2})
    synth = dict(channel_base=128, channel_max=16, architecture="resnet", num_fp16_res=2, conv_clamp=256)
    flat = Generator(**common, **synth, magnitude_ema_beta=0.999, fused_modconv_default="inference_only")
    nested = Generator(**common, synthesis_kwargs=dict(synth, fp16_channels_last=False))
    assert {k: v.shape for k, v in flat.state_dict().items()} == {k: v.shape for k, v in nested.state_dict().items()}
    assert flat.init_kwargs == nested.init_kwargs
    assert "synthesis_kwargs" not in nested.init_kwargs and nested.init_kwargs["architecture"] == "resnet"
    rebuilt = build_generator("stylegan2", json.loads(json.dumps(nested.init_kwargs)))
    assert set(rebuilt.state_dict()) == set(nested.state_dict())
    # Defaults follow the codebase of each form: stylegan3 repo (flat) vs stylegan2-ada (nested).
    flat_default = Generator(**common, channel_base=128, channel_max=16)
    ada_default = Generator(**common, synthesis_kwargs=dict(channel_base=128, channel_max=16))
    assert (flat_default.init_kwargs["conv_clamp"], flat_default.init_kwargs["num_fp16_res"]) == (256, 4)
    assert (ada_default.init_kwargs["conv_clamp"], ada_default.init_kwargs["num_fp16_res"]) == (None, 0)
    assert ada_default.synthesis.b16.conv1.conv_clamp is None and ada_default.synthesis.b16.use_fp16 is False
    assert flat_default.synthesis.b16.use_fp16 and flat_default.synthesis.b8.use_fp16
    assert not flat_default.synthesis.b4.use_fp16  # fp16 starts at 8 px at the lowest


# --- w-index mapping and style layers ------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["skip", "resnet"])
def test_style_layers_follow_w_index_mapping(architecture: str) -> None:
    G = tiny(16, architecture)
    layers = G.style_layers()
    expected = [("b4.conv1", 0), ("b4.torgb", 1), ("b8.conv0", 1), ("b8.conv1", 2), ("b8.torgb", 3),
                ("b16.conv0", 3), ("b16.conv1", 4), ("b16.torgb", 5)]
    if architecture != "skip":
        expected = [e for e in expected if e[0] in ("b16.torgb",) or not e[0].endswith("torgb")]
    assert [(n, i) for n, i, _ in layers] == expected
    assert layers[-1][1] == G.num_ws - 1
    for name, _, affine in layers:
        block, layer = name.split(".")
        assert affine is getattr(getattr(G.synthesis, block), layer).affine
    # The synthesis really feeds ws[:, idx] to each affine.
    seen: dict[str, torch.Tensor] = {}
    hooks = [affine.register_forward_pre_hook(lambda m, args, n=name: seen.__setitem__(n, args[0]))
             for name, _, affine in layers]
    ws = torch.randn(2, G.num_ws, 16)
    with torch.no_grad():
        G.synthesis(ws)
    for h in hooks:
        h.remove()
    for name, idx, _ in layers:
        assert torch.equal(seen[name], ws[:, idx]), name


# --- noise ----------------------------------------------------------------------------------------------


def test_noise_maps_and_modes() -> None:
    G = tiny(16)
    maps = G.noise_maps()
    assert list(maps) == ["b4.conv1", "b8.conv0", "b8.conv1", "b16.conv0", "b16.conv1"]
    assert maps["b8.conv0"].shape == (8, 8) and maps["b8.conv0"] is G.synthesis.b8.conv0.noise_const
    ws = G.mapping(torch.randn(2, 16), None)
    with torch.no_grad():
        const = G.synthesis(ws, noise_mode="const")
        none = G.synthesis(ws, noise_mode="none")
        r1 = G.synthesis(ws, noise_mode="random")
        r2 = G.synthesis(ws, noise_mode="random")
        again = G.synthesis(ws, noise_mode="const")
    assert (const - none).abs().max() > 1e-3
    assert (r1 - r2).abs().max() > 1e-3
    assert torch.equal(const, again)
    # Overriding with the buffers themselves reproduces 'const'; zeros reproduce 'none'.
    with torch.no_grad():
        same = G.synthesis(ws, noise={k: v[None, None] for k, v in maps.items()})
        zero = G.synthesis(ws, noise={k: torch.zeros(1, 1, *v.shape) for k, v in maps.items()})
    assert (same - const).abs().max() < 1e-6
    assert (zero - none).abs().max() < 1e-6
    with pytest.raises(KeyError):
        G.synthesis(ws, noise={"b8.conv2": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(ValueError):
        G.synthesis(ws, noise={"b8.conv0": torch.zeros(1, 1, 4, 4)})


def test_noise_override_changes_output_and_carries_gradients() -> None:
    G = tiny(16).requires_grad_(False)
    ws = G.mapping(torch.randn(2, 16), None).detach().requires_grad_(True)
    noise = {k: torch.randn(1, 1, *v.shape, requires_grad=True) for k, v in G.noise_maps().items()}
    noise["b8.conv1"] = torch.randn(2, 1, 8, 8, requires_grad=True)  # per-sample noise
    img = G.synthesis(ws, noise=noise)
    with torch.no_grad():
        const = G.synthesis(ws.detach())
    assert (img - const).abs().max() > 1e-3
    img.square().mean().backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all()
    assert (ws.grad.abs().sum(dim=(0, 2)) > 0).all()  # every w row is used
    for name, n in noise.items():
        assert n.grad is not None and n.grad.abs().sum() > 0, name


def test_unfused_path_and_training_gradients_match() -> None:
    """Grouped (fused) and activation-scaling modulated convs agree, forward and backward."""
    G = tiny(16, "resnet")
    ws = torch.randn(3, G.num_ws, 16)
    grads = []
    for fused in (True, False):
        G.zero_grad()
        w = ws.clone().requires_grad_(True)
        out = G.synthesis(w, fused_modconv=fused)
        out.square().mean().backward()
        grads.append((out.detach(), w.grad, G.synthesis.b16.conv0.weight.grad.clone()))
    assert (grads[0][0] - grads[1][0]).abs().max() < 1e-5
    assert (grads[0][1] - grads[1][1]).abs().max() < 1e-5
    assert (grads[0][2] - grads[1][2]).abs().max() < 1e-5


# --- truncation and precision ---------------------------------------------------------------------------


def test_truncation_psi_zero_collapses_to_w_avg() -> None:
    G = tiny(16)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        img = G(torch.randn(2, 16), truncation_psi=0.0)
        ref = G.synthesis(G.mapping.w_avg.expand(1, G.num_ws, -1))
        cut = G(torch.randn(2, 16), truncation_psi=0.0, truncation_cutoff=2)
    assert (img[0] - img[1]).abs().max() < 1e-6
    assert (img[0] - ref[0]).abs().max() < 1e-5
    assert (cut[0] - cut[1]).abs().max() > 1e-3  # later layers still follow z


def test_bf16_whole_model_close_to_fp32() -> None:
    G, t, _ = load_fixture("skip16")
    H = copy.deepcopy(G).to(torch.bfloat16)
    dtypes = []
    hook = H.synthesis.b16.conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.no_grad():
        img = H.synthesis(t["ws"])
        full = H(t["z"])
    hook.remove()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # computes in bf16
    assert img.dtype == torch.float32 and full.dtype == torch.float32
    assert psnr(img, t["img"]) > 25  # measured about 62 dB
    assert psnr(full, t["img"]) > 25
    with torch.no_grad():
        forced = H.synthesis(t["ws"], force_fp32=True)
    assert psnr(forced, t["img"]) > 25


def test_fp16_rule_is_cuda_only() -> None:
    """num_fp16_res blocks compute in float16 only on CUDA (and never when force_fp32)."""
    G = tiny(16, num_fp16_res=2, conv_clamp=256)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [b.use_fp16 for b in G.synthesis.blocks()] == [False, True, True]
    assert G.synthesis.b16.compute_dtype(cpu) == torch.float32
    assert G.synthesis.b16.compute_dtype(cuda) == torch.float16
    assert G.synthesis.b16.compute_dtype(cuda, force_fp32=True) == torch.float32
    assert G.synthesis.b4.compute_dtype(cuda) == torch.float32
    if torch.cuda.is_available():
        Gc = copy.deepcopy(G).cuda()
        ws = torch.randn(2, G.num_ws, 16)
        with torch.no_grad():
            out = Gc.synthesis(ws.cuda()).cpu()
            ref = G.synthesis(ws)
        assert out.dtype == torch.float32 and psnr(out, ref) > 25
