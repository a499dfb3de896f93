"""Core numerics against the Gaussian oracle: no host, no network (shared GUIDE section 2)."""

from __future__ import annotations


import pytest
import torch

from retrace.inversion import samplers as S
from retrace.inversion.schedules import SIGMA_FLOOR, inversion_sigmas, reconstruction_sigmas
from oracle_cases import ascending, oneway_errors, problem, ratios, rel, roundtrip_errors

pytestmark = pytest.mark.core


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_euler_roundtrip_error_halves_per_doubling(kind: str) -> None:
    r = ratios(roundtrip_errors(kind, "euler"))
    # First order: the error falls about 2x per doubling of steps.
    assert all(1.7 <= x <= 2.3 for x in r), r


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_euler_and_midpoint_one_way_orders(kind: str) -> None:
    r1 = ratios(oneway_errors(kind, "euler"))
    assert all(1.7 <= x <= 2.3 for x in r1), r1
    r2 = ratios(oneway_errors(kind, "midpoint"))
    # Second order: about 4x per doubling once asymptotic (coarser steps are still pre-asymptotic, ~5-6x).
    assert all(x >= 3.4 for x in r2) and 3.4 <= r2[-1] <= 4.6, r2


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_midpoint_roundtrip_is_at_least_second_order(kind: str) -> None:
    errs = roundtrip_errors(kind, "midpoint")
    # At least 4x per doubling; measured ~8x, because the O(h^3) local errors of the forward and
    # backward passes partly cancel in a round trip.
    assert all(x >= 3.4 for x in ratios(errs)), errs
    assert errs[-1] < roundtrip_errors(kind, "euler")[-1] / 100


def test_euler_step_is_ddim() -> None:
    """DDIM's x' = x0_hat + sigma' * eps_hat, exactly, in both directions."""
    oracle, x = problem("ve")
    for s, s_next in ((0.5, 2.0), (2.0, 0.5)):
        sig, sig_next = torch.tensor(s, dtype=torch.float64), torch.tensor(s_next, dtype=torch.float64)
        x_next, den = S.euler_step(oracle, x, sig, sig_next)
        eps = (x - den) / sig
        torch.testing.assert_close(x_next, den + sig_next * eps, rtol=0, atol=1e-12)


def test_callback_sees_every_step_and_the_model_is_called_once_per_euler_step() -> None:
    oracle, x0 = problem("flow")
    seen: list[int] = []
    S.sample_euler_ode(oracle, x0, ascending("flow", 7), callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(7)) and oracle.calls == 7
    oracle.calls = 0
    S.sample_midpoint_ode(oracle, x0, ascending("flow", 7))
    assert oracle.calls == 14 == 7 * S.EVALUATIONS_PER_STEP["midpoint"]


def test_rf_inversion_gamma_limits() -> None:
    oracle, x0 = problem("flow")
    sig = ascending("flow", 12)
    plain = S.sample_euler_ode(oracle, x0, sig)
    assert torch.equal(S.sample_rf_inversion(oracle, x0, sig, gamma=0.0), plain)
    target = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    landed = S.sample_rf_inversion(oracle, x0, sig, gamma=1.0, target_noise=target)
    torch.testing.assert_close(landed, target, rtol=0, atol=1e-12)
    # The seeded default target is reproducible and depends on the seed.
    a = S.sample_rf_inversion(oracle, x0, sig, gamma=1.0, seed=5)
    b = S.sample_rf_inversion(oracle, x0, sig, gamma=1.0, seed=5)
    c = S.sample_rf_inversion(oracle, x0, sig, gamma=1.0, seed=6)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    middle = S.sample_rf_inversion(oracle, x0, sig, gamma=0.5, target_noise=target)
    assert rel(middle, target) < rel(plain, target)


def test_rf_inversion_edit_limits() -> None:
    oracle, x0 = problem("flow")
    sig = ascending("flow", 12).flip(0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plain = S.sample_euler_ode(oracle, noise, sig)
    assert torch.equal(S.sample_rf_inversion_edit(oracle, noise, sig, source=x0, eta=0.0, stop_step=12), plain)
    # eta = 1 on every step follows the straight line to the source, ending on it exactly at sigma 0.
    sig0 = torch.cat([sig[:-1], sig.new_zeros(1)])
    pulled = S.sample_rf_inversion_edit(oracle, noise, sig0, source=x0, eta=1.0, start_step=0, stop_step=12)
    torch.testing.assert_close(pulled, x0, rtol=0, atol=1e-12)
    partial = S.sample_rf_inversion_edit(oracle, noise, sig, source=x0, eta=0.9, stop_step=4)
    assert rel(partial, x0) < rel(plain, x0)


def test_eta_schedule_trends() -> None:
    assert S.eta_schedule(0.9, 1, 4, "constant", 6) == [0.0, 0.9, 0.9, 0.9, 0.0, 0.0]
    assert S.eta_schedule(1.0, 0, 3, "linear_increase", 4) == [0.0, 0.5, 1.0, 0.0]
    assert S.eta_schedule(1.0, 0, 3, "linear_decrease", 4) == [1.0, 0.5, 0.0, 0.0]
    assert S.eta_schedule(0.5, 2, 99, "constant", 4) == [0.0, 0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="trend"):
        S.eta_schedule(1.0, 0, 3, "sideways", 4)
    with pytest.raises(ValueError, match="start_step"):
        S.eta_schedule(1.0, 3, 1, "constant", 4)


@pytest.mark.parametrize("bad", [torch.tensor([1.0]), torch.tensor([]), torch.tensor([0.1, 0.5, 0.3]),
                                 torch.ones(2, 2)])
def test_bad_schedules_are_refused(bad: torch.Tensor) -> None:
    oracle, x0 = problem("ve")
    with pytest.raises(ValueError, match="sigmas"):
        S.sample_euler_ode(oracle, x0, bad)


def test_rf_inversion_refuses_bad_settings() -> None:
    oracle, x0 = problem("flow")
    with pytest.raises(ValueError, match="gamma"):
        S.sample_rf_inversion(oracle, x0, ascending("flow", 4), gamma=1.5)
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        S.sample_rf_inversion(oracle, x0, ascending("ve", 4))
    with pytest.raises(ValueError, match="source"):
        S.sample_rf_inversion_edit(oracle, x0, ascending("flow", 4).flip(0))
    with pytest.raises(ValueError, match="does not match"):
        S.sample_rf_inversion_edit(oracle, x0, ascending("flow", 4).flip(0), source=x0[:1])
    with pytest.raises(ValueError, match="solver"):
        S.integrate(oracle, x0, ascending("flow", 4), solver="rk45")


def test_inversion_schedule_from_sampling_schedule() -> None:
    sampling = torch.tensor([14.6, 3.0, 0.5, 0.0], dtype=torch.float64)
    inv = inversion_sigmas(sampling)
    assert inv.tolist() == pytest.approx([SIGMA_FLOOR, 0.5, 3.0, 14.6])
    assert sampling.tolist() == [14.6, 3.0, 0.5, 0.0], "the input schedule must not be modified"
    assert inversion_sigmas(torch.tensor([1.0, 0.5, 0.0]), flow_top=0.999).tolist() == pytest.approx(
        [SIGMA_FLOOR, 0.5, 0.999])
    assert torch.equal(reconstruction_sigmas(inv), inv.flip(0))
    with pytest.raises(ValueError, match="at least 2"):
        inversion_sigmas(torch.tensor([0.0]))
