"""Null-text, negative-prompt and direct inversion through the real host on tiny SD1.5, SD2-v and SDXL models.

At guidance 7.5 plain DDIM reconstruction drifts far from the image; null-text must cut that error to at
most a tenth, negative-prompt inversion must beat it, direct inversion must be exact (GUIDE section 4).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import comfy.model_management  # noqa: E402
import tiny_models  # noqa: E402
from comfy_extras import nodes_custom_sampler as custom  # noqa: E402
from retrace.inversion.null_text import NullTextSettings  # noqa: E402
from retrace.inversion.record import Inversion, NullText  # noqa: E402
from retrace.nodes import inversion as node_inversion  # noqa: E402
from retrace.nodes import inversion_guiders as guiders  # noqa: E402
from retrace.nodes import null_text as node_null_text  # noqa: E402
from retrace.nodes import samplers as node_samplers  # noqa: E402

pytestmark = pytest.mark.host
log = logging.getLogger("retrace.tests")

KINDS = ("sd15", "sd2v", "sdxl")
STEPS = 50  # the paper's
GUIDANCE = 7.5
SOURCE_SEED, NEGATIVE_SEED, TARGET_SEED = 0, 1, 3
# The defaults (start from the source prompt, 1 Gauss-Newton iteration), the paper's Adam recipe from the
# negative run to the end of its inner steps, and Gauss-Newton from the negative with 4 iterations. From the
# negative, weaker settings fall short of the 10% on these 32-channel toys: the paper's early stop ends near 0.045
# whatever DDIM's error (17% of SD2-v's 0.27), 2 Gauss-Newton iterations at 16% of DDIM's (SD1.5).
SOLVER_SETTINGS = {"default": NullTextSettings(),
                   "adam": NullTextSettings(solver="adam", start="negative", early_stop=0.0, early_stop_growth=0.0),
                   "gauss_newton": NullTextSettings(start="negative", gauss_newton_steps=4)}


class Case:
    """A tiny model with its latent, prompts and guidance-1 inversion; every network call is counted."""

    def __init__(self, kind: str, steps: int = STEPS, latent: dict | None = None):
        self.kind, self.calls = kind, 0
        self.model = tiny_models.build_model(kind, seed=0).clone()
        self.model.set_model_unet_function_wrapper(self._count)
        self.latent = latent or tiny_models.latent(kind, seed=2)
        self.source = tiny_models.conditioning(kind, seed=SOURCE_SEED)
        self.negative = tiny_models.conditioning(kind, seed=NEGATIVE_SEED)
        self.target = tiny_models.conditioning(kind, seed=TARGET_SEED)
        with torch.inference_mode():
            self.noise, self.inversion = node_inversion.invert(self.model, self.latent, self.source, None, steps, 1.0,
                                                               "normal")

    def _count(self, apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        self.calls += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    def error(self, out: dict) -> float:
        """Relative L2 error against the encoded image, in the model's latent space."""
        x0 = self.model.model.process_latent_in(self.latent["samples"])
        return float((self.model.model.process_latent_in(out["samples"]) - x0).norm() / x0.norm())

    def null_text(self, guidance: float = GUIDANCE, settings: NullTextSettings = NullTextSettings(),
                  inversion: Inversion | None = None) -> tuple[NullText, dict]:
        with torch.inference_mode():
            return node_null_text.optimize_null_text(self.model, inversion or self.inversion, self.source,
                                                     self.negative, guidance, settings)

    def guided(self, guider: Any) -> dict:
        with torch.inference_mode():
            return node_inversion.sample_with_guider(self.model, self.inversion, guider)

    def ddim(self, guidance: float = GUIDANCE) -> dict:
        with torch.inference_mode():
            return node_inversion.sample_inversion(self.model, self.inversion, self.source, self.negative, guidance)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {kind: Case(kind) for kind in KINDS}


@pytest.mark.parametrize("solver", sorted(SOLVER_SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_reconstruction_at_guidance_7_5(cases: dict, kind: str, solver: str) -> None:
    case = cases[kind]
    ddim = case.error(case.ddim())
    null_text, reconstruction = case.null_text(settings=SOLVER_SETTINGS[solver])
    nti = case.error(reconstruction)
    replay = case.error(case.guided(node_null_text.NullTextGuider(case.model, null_text, case.source)))
    npi = case.error(case.guided(guiders.RetraceNegativePromptGuider.execute(case.model, case.source, case.source,
                                                                              GUIDANCE).args[0]))
    case.calls = 0
    direct = case.error(case.guided(guiders.RetraceDirectInversionGuider.execute(
        case.model, case.inversion, case.source, case.source, case.negative, GUIDANCE).args[0]))
    log.info("%s guidance %.1f, %d steps: DDIM %.4g, null-text (%s) %.4g (replayed %.4g), NPI %.4g, direct %.2g",
             kind, GUIDANCE, STEPS, ddim, solver, nti, replay, npi, direct)
    assert ddim > 0.2, "guidance 7.5 must drift for the comparison to mean anything"
    assert nti <= 0.1 * ddim
    assert abs(replay - nti) <= 1e-3 * ddim  # the guider replays what the optimisation reached
    assert npi < ddim
    assert direct < 1e-4 and case.calls == 0  # the source branch is the trajectory itself


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_one_collapses_to_the_plain_round_trip(cases: dict, kind: str) -> None:
    case = cases[kind]
    plain = case.ddim(1.0)
    null_text, reconstruction = case.null_text(guidance=1.0)
    assert torch.equal(reconstruction["samples"], plain["samples"])
    start = case.source[0][0]  # the default start
    assert all(torch.equal(e, start) for e in null_text.embeddings)  # nothing to optimise at guidance 1
    npi = case.guided(guiders.RetraceNegativePromptGuider.execute(case.model, case.source, case.source, 1.0).args[0])
    assert torch.equal(npi["samples"], plain["samples"])


def test_sdxl_keeps_pooled_output_and_size_embeddings(cases: dict) -> None:
    case = cases["sdxl"]
    null_text, _ = case.null_text(settings=NullTextSettings(inner_steps=1))
    assert torch.equal(null_text.pooled, case.negative[0][1]["pooled_output"])
    assert null_text.extra["negative_options"]["width"] == 1024
    guider = node_null_text.NullTextGuider(case.model, null_text, case.source)
    assert guider.original_conds["negative"][0]["target_height"] == 1024


def test_model_untouched_and_interrupt_leaves_the_host_usable() -> None:
    case = Case("sd15", steps=6)
    before = {k: v.clone() for k, v in case.model.model.state_dict().items()}
    flags = [p.requires_grad for p in case.model.model.parameters()]
    case.null_text(settings=NullTextSettings(early_stop=0.0))
    after = case.model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [p.requires_grad for p in case.model.model.parameters()]
    assert all(p.grad is None for p in case.model.model.parameters())

    # Interrupt during the inner loop of the second step.
    calls = {"n": 0}
    original = case._count

    def interrupting(apply_model, args):
        calls["n"] += 1
        if calls["n"] == 6:
            comfy.model_management.interrupt_current_processing(True)
        return original(apply_model, args)

    case.model.set_model_unet_function_wrapper(interrupting)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        case.null_text(settings=NullTextSettings(solver="adam", inner_steps=5, early_stop=0.0))
    assert calls["n"] < 10, "the interrupt must stop the inner loop"
    case.model.set_model_unet_function_wrapper(original)
    assert all(torch.equal(before[k], v) for k, v in case.model.model.state_dict().items())
    with torch.inference_mode():  # the next prompt runs, and gives what it gave before
        _, again = node_inversion.invert(case.model, case.latent, case.source, None, 6, 1.0, "normal")
    assert torch.equal(again.trajectory, case.inversion.trajectory)


def test_deterministic_on_cpu(cases: dict) -> None:
    case = cases["sd15"]
    settings = NullTextSettings(solver="adam", inner_steps=2, early_stop=0.0)
    first, _ = case.null_text(settings=settings)
    second, _ = case.null_text(settings=settings)
    assert torch.equal(first.embeddings, second.embeddings)
    assert not torch.equal(first.embeddings[-1], first.embeddings[0])


def test_batch_of_images_and_of_prompts() -> None:
    single = Case("sd15", steps=8)
    second = tiny_models.latent("sd15", seed=5)["samples"]
    batch = Case("sd15", steps=8, latent={"samples": torch.cat([single.latent["samples"], second])})
    settings = NullTextSettings(early_stop=0.0)
    null_text, reconstruction = batch.null_text(settings=settings)
    assert null_text.embeddings.shape[:2] == (8, 2)
    assert not torch.equal(null_text.embeddings[-1, 0], null_text.embeddings[-1, 1])
    # Image 0 of the batch is the single image: optimised on its own, it gets the same result up to the rounding of
    # batched against single convolutions, which the finite differences of Gauss-Newton magnify (measured 0.0024;
    # the null-text correction itself is about 2.6 here, DDIM's error).
    _, alone_reconstruction = single.null_text(settings=settings)
    alone = alone_reconstruction["samples"]
    assert float((reconstruction["samples"][:1] - alone).norm() / alone.norm()) < 1e-2
    # A batch of prompts, one per image.
    prompts = tiny_models.conditioning("sd15", batch=2, seed=SOURCE_SEED)
    with torch.inference_mode():
        per_prompt, _ = node_null_text.optimize_null_text(batch.model, batch.inversion, prompts, batch.negative,
                                                          GUIDANCE, settings)
    assert per_prompt.embeddings.shape[:2] == (8, 2)


def test_guider_in_sampler_custom_advanced(cases: dict) -> None:
    """The null-text guider through the host's own SamplerCustomAdvanced, DisableNoise and BasicScheduler."""
    case = cases["sd15"]
    null_text, reconstruction = case.null_text(settings=NullTextSettings(inner_steps=2))
    guider = node_null_text.RetraceNullTextGuider.execute(case.model, null_text, case.source).args[0]
    sigmas = custom.BasicScheduler.execute(case.model, "normal", STEPS, 1.0).args[0]
    sampler = node_samplers.RetraceInversionSampler.execute("euler").args[0]
    with torch.inference_mode():
        out = custom.SamplerCustomAdvanced.execute(custom.DisableNoise.execute().args[0], guider, sampler, sigmas,
                                                   case.noise).args[0]
    diff = case.error(out) - case.error(reconstruction)
    assert abs(diff) < 1e-3


def test_mismatches_are_named_before_any_work(cases: dict) -> None:
    case = cases["sd15"]
    null_text, _ = case.null_text(settings=NullTextSettings(inner_steps=1))
    other = cases["sd2v"]
    with pytest.raises(ValueError, match="model: null-text was made for 'SD15', the model is 'SD20'"):
        node_null_text.RetraceNullTextGuider.execute(other.model, null_text, other.source)
    guider = node_null_text.RetraceNullTextGuider.execute(case.model, null_text, case.source).args[0]
    sampler = node_samplers.RetraceInversionSampler.execute("euler").args[0]
    noise = custom.DisableNoise.execute().args[0]
    calls = case.calls
    wrong_steps = custom.BasicScheduler.execute(case.model, "normal", STEPS + 5, 1.0).args[0]
    with torch.inference_mode(), pytest.raises(ValueError, match=f"made for the inversion it was optimised on: {STEPS} steps"):
        custom.SamplerCustomAdvanced.execute(noise, guider, sampler, wrong_steps, case.noise)
    big = {"samples": torch.zeros(1, 4, 16, 16)}
    sigmas = custom.BasicScheduler.execute(case.model, "normal", STEPS, 1.0).args[0]
    with torch.inference_mode(), pytest.raises(ValueError, match=r"latent of shape \[1, 4, 8, 8\]; this latent is \[1, 4, 16, 16\]"):
        custom.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, big)
    with torch.inference_mode(), pytest.raises(ValueError, match="single negative"):
        node_null_text.optimize_null_text(case.model, case.inversion, case.source, case.negative + case.negative,
                                          GUIDANCE, NullTextSettings())
    with torch.inference_mode(), pytest.raises(ValueError, match="inversion does not fit"):
        node_null_text.optimize_null_text(other.model, case.inversion, other.source, other.negative, GUIDANCE,
                                          NullTextSettings())
    assert case.calls == calls, "the model ran before the input was refused"


def test_null_text_file_round_trip(cases: dict, tmp_path) -> None:
    null_text, _ = cases["sdxl"].null_text(settings=NullTextSettings(inner_steps=1))
    path = str(tmp_path / "nt.safetensors")
    null_text.save(path)
    back = NullText.load(path)
    assert torch.equal(back.embeddings, null_text.embeddings) and torch.equal(back.pooled, null_text.pooled)
    assert (back.model_name, back.latent_shape, back.guidance) == ("SDXL", (1, 4, 8, 8), GUIDANCE)
    assert back.extra == null_text.extra
    with pytest.raises(FileExistsError):
        null_text.save(path)
    with pytest.raises(ValueError, match="not a Retrace inversion file"):
        Inversion.load(path)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_direct_inversion_on_flow_models(kind: str) -> None:
    case = Case(kind, steps=8)
    guidance = 1.0 if kind == "flux" else GUIDANCE  # Flux-dev carries its guidance in the conditioning
    reconstruct = guiders.RetraceDirectInversionGuider.execute(case.model, case.inversion, case.source, case.source,
                                                               case.negative, guidance).args[0]
    assert case.error(case.guided(reconstruct)) < 1e-4
    edit = guiders.RetraceDirectInversionGuider.execute(case.model, case.inversion, case.target, case.source,
                                                        case.negative, guidance).args[0]
    calls = case.calls
    edited = case.guided(edit)
    assert case.calls - calls == 8 * 2  # per step one call per branch (the host batches a branch's cond and uncond)
    assert torch.isfinite(edited["samples"]).all() and 1e-3 < case.error(edited) < 10


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_guiders_start_flow_models_from_the_inverted_latent_in_sampler_custom_advanced(kind: str) -> None:
    """On flow models the host starts at sigma*noise + (1 - sigma)*latent, which is 0 at sigma 1 with DisableNoise;
    Retrace's guiders start from the inverted latent there, so SamplerCustomAdvanced matches Retrace's own path."""
    case = Case(kind, steps=8)
    guidance = 1.0 if kind == "flux" else GUIDANCE
    direct = guiders.RetraceDirectInversionGuider.execute(case.model, case.inversion, case.source, case.source,
                                                          case.negative, guidance).args[0]
    npi = guiders.RetraceNegativePromptGuider.execute(case.model, case.target, case.source, guidance).args[0]
    sigmas = custom.BasicScheduler.execute(case.model, "normal", 8, 1.0).args[0]
    sampler = node_samplers.RetraceInversionSampler.execute("euler").args[0]
    for guider in (npi, direct):
        with torch.inference_mode():
            host = custom.SamplerCustomAdvanced.execute(custom.DisableNoise.execute().args[0], guider, sampler,
                                                        sigmas, case.noise).args[0]
        ours = case.guided(guider)
        rel = float((host["samples"] - ours["samples"]).norm() / ours["samples"].norm())
        log.info("%s %s: SamplerCustomAdvanced vs Retrace's path, rel diff %.3g", kind, type(guider).__name__, rel)
        # 1e-3: the host's flow schedule starts at sigma 1, the inversion's just below it (before the fix: 0.7-1.2)
        assert rel < 1e-3, (type(guider).__name__, rel)
    assert case.error(case.guided(direct)) < 1e-4


def test_guiders_refuse_the_noise_of_another_inversion(cases: dict) -> None:
    """Null-text and direct inversion are per-step corrections of one trajectory: started from another inversion's
    noise (same model, schedule and shape) they would silently give a wrong image, so they refuse it."""
    import dataclasses

    case = cases["sd15"]
    other = Case("sd15", latent=tiny_models.latent("sd15", seed=7))
    null_text, _ = case.null_text(settings=NullTextSettings(inner_steps=2))
    nt_guider = node_null_text.RetraceNullTextGuider.execute(case.model, null_text, case.source).args[0]
    direct = guiders.RetraceDirectInversionGuider.execute(case.model, case.inversion, case.source, case.source,
                                                          case.negative, GUIDANCE).args[0]
    sigmas = custom.BasicScheduler.execute(case.model, "normal", STEPS, 1.0).args[0]
    sampler = node_samplers.RetraceInversionSampler.execute("euler").args[0]
    for guider in (nt_guider, direct):
        with pytest.raises(ValueError, match="was made from another inversion"):
            node_inversion.sample_with_guider(case.model, other.inversion, guider)
        with pytest.raises(ValueError, match="was made from another inversion"), torch.inference_mode():
            custom.SamplerCustomAdvanced.execute(custom.DisableNoise.execute().args[0], guider, sampler, sigmas,
                                                 other.noise)
    # Its own noise passes, through the host's LATENT format and back.
    with torch.inference_mode():
        custom.SamplerCustomAdvanced.execute(custom.DisableNoise.execute().args[0], nt_guider, sampler, sigmas,
                                             case.noise)
    # A null-text saved before it remembered its noise is not checked.
    unmarked = dataclasses.replace(null_text, extra={k: v for k, v in null_text.extra.items()
                                                     if k != "noise_fingerprint"})
    old_guider = node_null_text.RetraceNullTextGuider.execute(case.model, unmarked, case.source).args[0]
    assert torch.isfinite(node_inversion.sample_with_guider(case.model, other.inversion, old_guider)["samples"]).all()
