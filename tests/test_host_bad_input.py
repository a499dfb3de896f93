"""Bad input is refused with a ValueError that names what is wrong, before the model runs; inversions
survive saving and loading bit for bit, and files are never overwritten."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import tiny_models  # noqa: E402
from comfy_extras import nodes_custom_sampler as custom  # noqa: E402
from retrace.inversion.record import Inversion  # noqa: E402
from retrace.nodes import inversion as node_inversion  # noqa: E402
from retrace.nodes import _records, inversion_io  # noqa: E402
from retrace.nodes._host import check_latent  # noqa: E402
from retrace.nodes import samplers as node_samplers  # noqa: E402

pytestmark = pytest.mark.host


class Counted:
    """A clone of a host model whose every network evaluation is counted (a model_function_wrapper)."""

    def __init__(self, kind: str, seed: int = 0):
        self.kind = kind
        self.calls = 0
        self.model = tiny_models.build_model(kind, seed).clone()
        self.model.set_model_unet_function_wrapper(self._wrap)

    def _wrap(self, apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        self.calls += 1
        return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.fixture(scope="module")
def sd15() -> Counted:
    return Counted("sd15")


@pytest.fixture(scope="module")
def sd15_inversion(sd15: Counted) -> Inversion:
    """A real 3-step inversion of an SD1.5 latent (and, by the way, proof that the counter counts)."""
    before = sd15.calls
    with torch.inference_mode():
        _, inv = node_inversion.invert(sd15.model, tiny_models.latent("sd15"), tiny_models.conditioning("sd15"), None,
                                       3, 1.0, "normal")
    assert sd15.calls - before == 3
    return inv


def refused(counted: Counted, match: str, fn: Callable[[], Any]) -> str:
    """Run ``fn``; it must raise ValueError matching ``match`` with no model evaluation. Returns the message."""
    before = counted.calls
    with torch.inference_mode(), pytest.raises(ValueError, match=match) as info:
        fn()
    assert counted.calls == before, "the model ran before the input was refused"
    return str(info.value)


def invert(counted: Counted, latent: dict | None = None, steps: int = 3, guidance: float = 1.0,
           negative: list | None = None, sampler: Any = None) -> Any:
    kind = counted.kind
    latent = latent if latent is not None else tiny_models.latent(kind)
    return node_inversion.RetraceInvert.execute(counted.model, latent, tiny_models.conditioning(kind), steps,
                                                guidance, "normal", negative=negative, sampler=sampler)


def test_rf_inversion_on_eps_model(sd15: Counted) -> None:
    sampler = node_samplers.RetraceRFInversionSampler.execute(0.5, 0, "euler").args[0]
    msg = refused(sd15, r"rectified flow.*eps-prediction", lambda: invert(sd15, sampler=sampler))
    assert "rf_inversion" in msg
    # The same through the host's SamplerCustomAdvanced.
    sigmas = node_inversion.RetraceInversionSigmas.execute(sd15.model, "normal", 3).args[0]
    guider = custom.BasicGuider.execute(sd15.model, tiny_models.conditioning("sd15")).args[0]
    refused(sd15, r"rectified flow.*eps-prediction", lambda: custom.SamplerCustomAdvanced.execute(
        custom.DisableNoise.execute().args[0], guider, sampler, sigmas, tiny_models.latent("sd15")))


def test_rf_edit_sampler_on_eps_model(sd15: Counted, sd15_inversion: Inversion) -> None:
    sampler = node_samplers.RetraceRFInversionEditSampler.execute(0.9, 0, 2, "constant", "euler").args[0]
    refused(sd15, r"rectified flow.*eps-prediction", lambda: node_inversion.sample_inversion(
        sd15.model, sd15_inversion, tiny_models.conditioning("sd15"), None, 1.0, sampler))


@pytest.mark.parametrize(("kind", "channels"), [("sd15", 16), ("flux", 4)])
def test_wrong_channel_count(kind: str, channels: int) -> None:
    counted = Counted(kind)
    latent = {"samples": torch.zeros(1, channels, 8, 8)}
    expected = tiny_models.LATENT_CHANNELS[kind]
    refused(counted, rf"{channels} channels but this {tiny_models.CONFIG_NAME[kind]} model expects {expected}",
            lambda: invert(counted, latent))


def test_not_an_image_latent(sd15: Counted) -> None:
    refused(sd15, r"\[batch, channels, height, width\]", lambda: invert(sd15, {"samples": torch.zeros(4, 8, 8)}))


@pytest.mark.parametrize(("kind", "match"), [
    ("sdxl", r"model: inversion was made for 'SD15', the model is 'SDXL'"),
    ("sd2v", r"model family: inversion was made for 'eps', the model is 'v'"),
    ("flux", r"model family: inversion was made for 'eps', the model is 'flow'"),
])
def test_inversion_used_with_another_model(sd15_inversion: Inversion, kind: str, match: str) -> None:
    other = Counted(kind)
    refused(other, match, lambda: node_inversion.RetraceSampleInversion.execute(
        other.model, sd15_inversion, tiny_models.conditioning(kind), 1.0))


def test_steps_below_one(sd15: Counted) -> None:
    refused(sd15, r"steps must be at least 1; got 0", lambda: invert(sd15, steps=0))
    refused(sd15, r"steps must be at least 1; got -2",
            lambda: node_inversion.RetraceInversionSigmas.execute(sd15.model, "normal", -2))


def test_negative_guidance(sd15: Counted, sd15_inversion: Inversion) -> None:
    negative = tiny_models.conditioning("sd15", seed=1)
    refused(sd15, r"guidance must be >= 0.*got -1.5", lambda: invert(sd15, guidance=-1.5, negative=negative))
    refused(sd15, r"guidance must be >= 0.*got -1.5", lambda: node_inversion.RetraceSampleInversion.execute(
        sd15.model, sd15_inversion, tiny_models.conditioning("sd15"), -1.5, negative=negative))


def test_guidance_without_negative(sd15: Counted, sd15_inversion: Inversion) -> None:
    refused(sd15, r"guidance 7.5 needs a negative conditioning", lambda: invert(sd15, guidance=7.5))
    refused(sd15, r"guidance 3.0 needs a negative conditioning", lambda: node_inversion.RetraceSampleInversion.execute(
        sd15.model, sd15_inversion, tiny_models.conditioning("sd15"), 3.0))


def test_a_latent_beyond_the_position_embedding_is_refused() -> None:
    """SD3's MMDiT embeds positions on a fixed grid (pos_embed_max_size x patch): a larger latent used to fail in
    the first model call, after the VAE and any earlier node had run."""
    sd3 = Counted("sd3")
    diffusion_model = sd3.model.get_model_object("diffusion_model")
    limit = diffusion_model.pos_embed_max_size * diffusion_model.patch_size
    assert check_latent(sd3.model, tiny_models.latent("sd3", height=limit, width=8)).shape[-2] == limit
    refused(sd3, rf"is {limit + 2}x8 .* covers at most {limit}x{limit}",
            lambda: invert(sd3, tiny_models.latent("sd3", height=limit + 2, width=8)))



@pytest.mark.parametrize(("kind", "other"), [("flux", "sdxl"), ("sd15", "sd2v"), ("sd3", "sd15")])
def test_conditioning_from_another_text_encoder_is_refused(kind: str, other: str) -> None:
    """A prompt encoded with another model's CLIP used to fail in the network's first matmul (after the VAE, and
    for null-text after seconds of work)."""
    from retrace.nodes import inversion_guiders

    counted = Counted(kind)
    wrong = tiny_models.conditioning(other)
    width = tiny_models.CONTEXT_DIM[other]
    expected = rf"conditioning holds text embeddings {width} wide .* this {tiny_models.CONFIG_NAME[kind]} model takes them {tiny_models.CONTEXT_DIM[kind]}"
    refused(counted, "positive " + expected, lambda: node_inversion.RetraceInvert
            .execute(counted.model, tiny_models.latent(kind), wrong, 2, 1.0, "normal"))
    with torch.inference_mode():
        _, inv = node_inversion.invert(counted.model, tiny_models.latent(kind), tiny_models.conditioning(kind), None,
                                       1, 1.0, "normal")
    right = tiny_models.conditioning(kind)
    refused(counted, "negative " + expected, lambda: node_inversion.RetraceSampleInversion.execute(
        counted.model, inv, right, 2.0, negative=wrong))
    refused(counted, "source " + expected, lambda: inversion_guiders.RetraceDirectInversionGuider.execute(
        counted.model, inv, right, wrong, right, 2.0))

def test_null_text_on_a_guidance_distilled_model_is_refused_before_it_runs() -> None:
    """Flux-dev takes guidance as an input: there is no unconditional branch to optimise (the optimisation used
    to start and fail in the backward pass)."""
    from retrace.nodes import null_text

    flux = Counted("flux")
    with torch.inference_mode():
        _, inv = node_inversion.invert(flux.model, tiny_models.latent("flux"), tiny_models.conditioning("flux"), None,
                                       1, 1.0, "normal")
    msg = refused(flux, r"Flux model is guidance-distilled", lambda: null_text.RetraceNullTextInversion.execute(
        flux.model, inv, tiny_models.conditioning("flux"), tiny_models.conditioning("flux", seed=1), 3.5,
        "gauss_newton", "source", 1, 10, 0.01, 1e-5))
    assert "Direct Inversion Guider" in msg



# Save / load


def rich_inversion() -> Inversion:
    """A guided RF-Inversion of a flow model: every metadata field has something to carry."""
    counted = Counted("flux")
    sampler = node_samplers.RetraceRFInversionSampler.execute(0.35, 12345678901, "midpoint").args[0]
    with torch.inference_mode():
        _, inv = node_inversion.invert(counted.model, tiny_models.latent("flux", batch=2),
                                       tiny_models.conditioning("flux", batch=2),
                                       tiny_models.conditioning("flux", batch=2, seed=9), 2, 2.5, "simple", sampler)
    return inv


def test_save_load_bitwise(tmp_path: Path) -> None:
    inv = rich_inversion()
    path = str(tmp_path / "inv.safetensors")
    inv.save(path)
    back = Inversion.load(path)
    for name in ("trajectory", "sigmas"):
        a, b = getattr(inv, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name} changed bits"
    for name in ("family", "model_name", "method", "guidance", "extra"):
        assert getattr(back, name) == getattr(inv, name), name
    assert back.extra == {"scheduler": "simple", "gamma": 0.35, "seed": 12345678901, "solver": "midpoint"}
    assert back.guidance == 2.5 and back.family == "flow" and back.model_name == "Flux"


def test_save_never_overwrites(tmp_path: Path, sd15_inversion: Inversion) -> None:
    path = tmp_path / "inv.safetensors"
    sd15_inversion.save(str(path))
    content = path.read_bytes()
    with pytest.raises(FileExistsError):
        rich_inversion().save(str(path))
    assert path.read_bytes() == content


def test_save_node_writes_a_new_file_each_time(output_dir: Path, sd15_inversion: Inversion) -> None:
    for _ in range(3):
        node = inversion_io.RetraceSaveInversion.execute(sd15_inversion, "retrace_test")
        assert node.ui is not None
    files = sorted(os.listdir(output_dir / _records.OUTPUT_SUBFOLDER))
    assert len(files) == 3 and len(set(files)) == 3 and all(f.startswith("retrace_test") for f in files)
    for f in files:
        assert torch.equal(Inversion.load(str(output_dir / _records.OUTPUT_SUBFOLDER / f)).trajectory,
                           sd15_inversion.trajectory)


def test_load_node_checks_model_and_latent(output_dir: Path, sd15: Counted, sd15_inversion: Inversion) -> None:
    inversion_io.RetraceSaveInversion.execute(sd15_inversion, "checked")
    (name,) = os.listdir(output_dir / _records.OUTPUT_SUBFOLDER)
    assert inversion_io.RetraceLoadInversion.validate_inputs(name) is True
    assert "not found" in inversion_io.RetraceLoadInversion.validate_inputs("missing.safetensors")
    loaded = inversion_io.RetraceLoadInversion.execute(name, sd15.model, tiny_models.latent("sd15")).args[0]
    assert torch.equal(loaded.trajectory, sd15_inversion.trajectory)
    refused(sd15, r"latent shape: inversion has \[1, 4, 8, 8\], the latent is \[1, 4, 16, 8\]",
            lambda: inversion_io.RetraceLoadInversion.execute(name, sd15.model,
                                                              tiny_models.latent("sd15", height=16)))
    sdxl = Counted("sdxl")
    refused(sdxl, r"inversion file .*model: inversion was made for 'SD15', the model is 'SDXL'",
            lambda: inversion_io.RetraceLoadInversion.execute(name, sdxl.model))
