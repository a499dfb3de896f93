"""Null-text and direct inversion against an exact prompted Gaussian (GUIDE section 6, layer 1)."""

from __future__ import annotations

import pytest
import torch

from oracle_cases import PromptedGaussian, ascending, rel
from retrace.inversion import samplers as S
from retrace.inversion.direct import corrected_denoised, implied_denoised, sample_direct_inversion, trajectory_denoised
from retrace.inversion.null_text import (NullTextSettings, euler_to, gauss_newton_step, loss_weight, null_text_step,
                                         sample_null_text)

pytestmark = pytest.mark.core

STEPS = 20
FULL = dict(early_stop=0.0, early_stop_growth=0.0)


def inverted(model: PromptedGaussian, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, ascending sigmas, trajectory) of a guidance-1 DDIM inversion with the source prompt."""
    x0 = model.image(batch)
    sigmas = ascending("ve", STEPS)
    path: list[torch.Tensor] = []
    noise = S.sample_euler_ode(model.conditional, x0, sigmas, callback=lambda d: path.append(d["x"]))
    return x0, sigmas, torch.stack([*path, noise])


def null_text(model, trajectory, sigmas, settings, batch=1, record=None):
    embedding = model.null_embedding.expand(batch, -1, -1)
    return sample_null_text(model, trajectory[-1], sigmas.flip(0), trajectory=trajectory, embedding=embedding,
                            family="eps", settings=settings, record=record)


def test_paper_schedule():
    s = NullTextSettings()
    assert (s.inner_steps, s.lr, s.early_stop) == (10, 1e-2, 1e-5)  # the paper's, for solver="adam"
    assert (s.solver, s.start, s.gauss_newton_steps) == ("gauss_newton", "source", 1)
    assert s.lr_at(0) == pytest.approx(1e-2) and s.lr_at(49) == pytest.approx(1e-2 * 0.51)
    assert s.threshold_at(0) == pytest.approx(1e-5) and s.threshold_at(49) == pytest.approx(1e-5 + 49 * 2e-5)
    assert loss_weight(0.0, "eps") == 1.0 and loss_weight(3.0, "v") == pytest.approx(0.1)
    assert loss_weight(0.5, "flow") == 1.0


@pytest.mark.parametrize("bad, match", [(dict(inner_steps=-1), "inner_steps"), (dict(lr=0.0), "learning rate"),
                                        (dict(early_stop=-1e-5), "early-stop"), (dict(solver="sgd"), "solver"),
                                        (dict(gauss_newton_steps=-1), "gauss_newton_steps"),
                                        (dict(start="zeros"), "start")])
def test_settings_reject_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        NullTextSettings(**bad)


@pytest.mark.parametrize("solver, steps", [("adam", 10), ("gauss_newton", 2)])
def test_null_text_beats_ddim_at_guidance_7_5(solver, steps):
    model = PromptedGaussian(guidance=7.5)
    x0, sigmas, trajectory = inverted(model)
    ddim = S.sample_euler_ode(model.guided(model.null_embedding), trajectory[-1], sigmas.flip(0))
    ddim_err = rel(ddim, x0)
    record: list = []
    nti = null_text(model, trajectory, sigmas, NullTextSettings(solver=solver, gauss_newton_steps=steps, **FULL),
                    record=record)
    nti_err = rel(nti, x0)
    assert ddim_err > 0.1, "guidance 7.5 must drift for the test to mean anything"
    assert nti_err <= 0.1 * ddim_err, (nti_err, ddim_err)
    # Replaying the recorded embeddings as plain guidance reproduces the optimised run exactly.
    x = trajectory[-1]
    desc = sigmas.flip(0)
    for k, step in enumerate(record):
        x = euler_to(x, desc[k], desc[k + 1], model.guided(step.embedding)(x, desc[k]))
    assert torch.allclose(x, nti, rtol=0, atol=1e-12)


def test_guidance_one_collapses_to_the_plain_round_trip():
    model = PromptedGaussian(guidance=1.0)
    x0, sigmas, trajectory = inverted(model)
    plain = S.sample_euler_ode(model.conditional, trajectory[-1], sigmas.flip(0))
    record: list = []
    nti = null_text(model, trajectory, sigmas, NullTextSettings(**FULL), record=record)
    assert rel(nti, plain) < 1e-12
    assert all(torch.equal(s.embedding, model.null_embedding) for s in record)  # no gradient at guidance 1


def test_early_stop_skips_a_step_that_already_fits():
    model = PromptedGaussian()
    x0, sigmas, trajectory = inverted(model)
    desc = sigmas.flip(0)
    model.calls = 0
    step = null_text_step(model, trajectory[-1], desc[0], desc[1], trajectory[-2], model.null_embedding, 1e-2,
                          threshold=1e9, inner_steps=10)
    assert int(step.iterations.sum()) == 0 and torch.equal(step.embedding, model.null_embedding)
    assert model.calls == 2  # the conditional branch and one unconditional pass, no optimisation
    tight = null_text_step(model, trajectory[-1], desc[0], desc[1], trajectory[-2], model.null_embedding, 1e-2,
                           threshold=0.0, inner_steps=10)
    assert int(tight.iterations.sum()) == 10 and float(tight.loss) < float(step.loss)


@pytest.mark.parametrize("solver", ["adam", "gauss_newton"])
def test_batch_images_are_optimised_on_their_own(solver):
    model = PromptedGaussian()
    settings = NullTextSettings(inner_steps=3, solver=solver, early_stop=1e-4)
    _, sigmas, trajectory = inverted(model, batch=2)
    both: list = []
    null_text(model, trajectory, sigmas, settings, batch=2, record=both)
    for i in range(2):
        alone: list = []
        null_text(model, trajectory[:, i:i + 1], sigmas, settings, record=alone)
        for b, a in zip(both, alone):
            if solver == "gauss_newton":
                assert float((b.embedding[i:i + 1] - a.embedding).abs().max()) <= 1e-6
            else:
                # Adam's update is about +-lr wherever the gradient is rounding noise, and rounding differs between
                # a batch and a single image; the losses it reaches agree.
                assert float(b.loss[i]) == pytest.approx(float(a.loss[0]), rel=1e-2)
            assert int(b.iterations[i]) == int(a.iterations[0])
    assert not torch.allclose(both[-1].embedding[0], both[-1].embedding[1])


def test_deterministic():
    model = PromptedGaussian()
    _, sigmas, trajectory = inverted(model)
    runs = []
    for _ in range(2):
        record: list = []
        null_text(model, trajectory, sigmas, NullTextSettings(), record=record)
        runs.append(torch.stack([s.embedding for s in record]))
    assert torch.equal(runs[0], runs[1])


def test_gauss_newton_solves_a_linear_step_exactly():
    model = PromptedGaussian()
    _, sigmas, trajectory = inverted(model)
    desc = sigmas.flip(0)
    step = gauss_newton_step(model, trajectory[-1], desc[0], desc[1], trajectory[-2], model.null_embedding,
                             threshold=0.0, inner_steps=15)
    first = null_text_step(model, trajectory[-1], desc[0], desc[1], trajectory[-2], model.null_embedding, 1e-2,
                           threshold=1e9, inner_steps=1)
    assert float(step.loss) < 1e-6 * float(first.loss)


def test_implied_denoised_inverts_the_euler_step():
    g = torch.Generator().manual_seed(0)
    x, x_next = torch.randn(2, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    for sigma, sigma_next in [(3.0, 2.0), (0.9, 0.7), (0.1, 0.3)]:
        d = implied_denoised(x, torch.tensor(sigma), x_next, torch.tensor(sigma_next))
        assert torch.allclose(euler_to(x, torch.tensor(sigma), torch.tensor(sigma_next), d), x_next, atol=1e-12)
    assert torch.equal(corrected_denoised(x, x, x_next), x_next)


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_direct_inversion_reconstructs_exactly(kind):
    model = PromptedGaussian(guidance=7.5)
    x0 = model.image()
    sigmas = ascending(kind, STEPS)
    if kind == "flow":  # a flow-matching Gaussian: x = (1 - s) x0 + s n, the same branches in flow form
        from oracle_denoisers import GaussianDenoiser
        oracle = GaussianDenoiser(model.mean(model.cond_embedding), model.var, "flow")
        conditional = oracle
    else:
        conditional = model.conditional
    path: list[torch.Tensor] = []
    noise = S.sample_euler_ode(conditional, x0, sigmas, callback=lambda d: path.append(d["x"]))
    trajectory = torch.stack([*path, noise])
    model.calls = 0
    out = sample_direct_inversion(None, noise, sigmas.flip(0), trajectory=trajectory)
    assert rel(out, x0) < 1e-12 and model.calls == 0
    # Edit branch = source branch: the corrections cancel the drift of guidance 7.5 step by step.
    guided = model.guided(model.null_embedding) if kind == "ve" else conditional
    edit = sample_direct_inversion(guided, noise, sigmas.flip(0), trajectory=trajectory, source_model=guided)
    assert rel(edit, x0) < 1e-9
    assert trajectory_denoised(trajectory, sigmas).shape == (STEPS, *x0.shape)
