"""Deterministic ODE solvers for inversion and reconstruction, in k-diffusion form.

Every function here has the signature ``fn(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)`` where ``model(x, sigma * s_in, **extra_args)`` returns the denoised
estimate of x0. Sigma is the only time variable: ascending sigmas invert (image -> noise),
descending sigmas sample (noise -> image). The same code serves eps, v and flow models, because
``d = (x - denoised) / sigma`` is eps for eps/v models (in the host's variance-exploding scale)
and the velocity for rectified-flow models.

No ComfyUI import here: these functions run against any callable with that contract.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

Denoiser = Callable[..., torch.Tensor]
Callback = Optional[Callable[[dict], None]]
Control = Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]

ETA_TRENDS = ("constant", "linear_increase", "linear_decrease")


def _sigma_like(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma * x.new_ones([x.shape[0]])


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE: eps for eps/v models, velocity for flow models."""
    return (x - denoised) / sigma


def check_sigmas(sigmas: torch.Tensor) -> None:
    """Raise a clear error for a schedule that cannot be integrated."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D schedule of at least 2 values (1 step); got shape {tuple(sigmas.shape)}. "
            "Use steps >= 1."
        )
    diffs = sigmas[1:] - sigmas[:-1]
    if not (bool((diffs > 0).all()) or bool((diffs < 0).all())):
        raise ValueError("sigmas must be strictly monotonic (ascending to invert, descending to sample).")


def _denoise(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, extra_args: dict,
             control: Control = None) -> tuple[torch.Tensor, torch.Tensor]:
    denoised = model(x, _sigma_like(sigma, x), **extra_args)
    d = to_d(x, sigma, denoised)
    return denoised, (d if control is None else control(x, sigma, d))


def euler_step(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
               extra_args: dict | None = None, control: Control = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 13 with eta=0).

    In sigma terms DDIM is the Euler step ``x' = x + (sigma' - sigma) * d``, i.e.
    ``x' = denoised + sigma' * eps``: the eps predicted at the current point carries x to the next
    sigma, up or down. ``control(x, sigma, d)`` may steer d (RF-Inversion). Returns ``(x', denoised)``.
    """
    denoised, d = _denoise(model, x, sigma, extra_args or {}, control)
    return x + d * (sigma_next - sigma), denoised


def midpoint_step(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                  extra_args: dict | None = None, control: Control = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One second-order step in the style of RF-Solver (Wang et al. 2024, "Taming Rectified Flow for
    Inversion and Editing", Eq. 8).

    RF-Solver expands the ODE to second order and estimates the derivative of d by a finite difference
    at the half step; the Taylor terms collapse to the explicit midpoint rule
    ``x' = x + h * d(x + h/2 * d(x, sigma), sigma + h/2)`` with ``h = sigma' - sigma``.
    Two model evaluations per step; local error O(h^3), global O(h^2). Returns ``(x', denoised)``.
    """
    extra_args = extra_args or {}
    h = sigma_next - sigma
    denoised, d = _denoise(model, x, sigma, extra_args, control)
    _, d_mid = _denoise(model, x + d * (h / 2), sigma + h / 2, extra_args, control)
    return x + d_mid * h, denoised


STEPS = {"euler": euler_step, "midpoint": midpoint_step}
EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2}


def integrate(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
              callback: Callback = None, solver: str = "euler",
              controls: Sequence[Control] | None = None) -> torch.Tensor:
    """Run ``solver`` over the whole schedule; ``controls[i]`` (or None) steers step i."""
    check_sigmas(sigmas)
    if solver not in STEPS:
        raise ValueError(f"solver must be one of {sorted(STEPS)}; got {solver!r}.")
    extra_args = {} if extra_args is None else extra_args
    for i in range(len(sigmas) - 1):
        control = None if controls is None else controls[i]
        x_next, denoised = STEPS[solver](model, x, sigmas[i], sigmas[i + 1], extra_args, control)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ode(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback: Callback = None, disable: bool | None = None) -> torch.Tensor:
    """Deterministic DDIM / rectified-flow Euler (Song et al. 2021, Eq. 13; Liu et al. 2022, Eq. 1).

    With ascending sigmas this is DDIM inversion (Dhariwal & Nichol 2021, Eq. 13 reversed; Mokady et al.
    2023, Eq. 3): start at the smallest sigma, never at 0.
    """
    return integrate(model, x, sigmas, extra_args, callback, "euler")


@torch.no_grad()
def sample_midpoint_ode(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback = None, disable: bool | None = None) -> torch.Tensor:
    """Second-order RF-Solver-style ODE integration (Wang et al. 2024, Eq. 8); see :func:`midpoint_step`."""
    return integrate(model, x, sigmas, extra_args, callback, "midpoint")


def eta_schedule(eta: float, start_step: int, stop_step: int, trend: str, steps: int) -> list[float]:
    """Per-step controller strength for RF-Inversion's edit ODE: ``eta`` on ``[start_step, stop_step)``.

    ``trend`` shapes it over that range: constant, linear_increase (0 -> eta) or linear_decrease (eta -> 0).
    """
    if trend not in ETA_TRENDS:
        raise ValueError(f"eta trend must be one of {ETA_TRENDS}; got {trend!r}.")
    if not 0 <= start_step <= stop_step:
        raise ValueError(f"need 0 <= start_step <= stop_step; got start_step={start_step}, stop_step={stop_step}.")
    out = [0.0] * steps
    stop = min(stop_step, steps)
    span = max(stop - start_step - 1, 1)
    for i in range(start_step, stop):
        frac = (i - start_step) / span
        out[i] = {"constant": eta, "linear_increase": eta * frac, "linear_decrease": eta * (1 - frac)}[trend]
    return out


@torch.no_grad()
def sample_rf_inversion(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback = None, disable: bool | None = None, gamma: float = 0.5,
                        target_noise: torch.Tensor | None = None, seed: int = 0,
                        solver: str = "euler") -> torch.Tensor:
    """RF-Inversion's controlled forward ODE (Rout et al. 2025, "Semantic Image Inversion and Editing using
    Rectified Stochastic Differential Equations", Eq. 8 / Algorithm 1).

    The model's velocity is blended with the conditional velocity ``(y1 - x) / (1 - sigma)`` that carries
    x in a straight line to a fixed noise sample ``y1``: ``d <- d + gamma * ((y1 - x) / (1 - sigma) - d)``.
    gamma = 0 is plain inversion; gamma = 1 lands exactly on ``y1`` when the last sigma is 1.
    Flow models only; sigmas ascend within [0, 1].
    """
    check_sigmas(sigmas)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1]; got {gamma}.")
    if float(sigmas[-1]) > 1.0 or float(sigmas[0]) >= float(sigmas[-1]):
        raise ValueError("RF-Inversion inverts a flow model: sigmas must ascend within [0, 1].")
    if target_noise is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        target_noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    target_noise = target_noise.to(x)

    def toward_noise(x, sigma, d):
        return d + gamma * ((target_noise - x) / (1 - sigma) - d)

    controls = [toward_noise] * (len(sigmas) - 1)
    return integrate(model, x, sigmas, extra_args, callback, solver, controls)


@torch.no_grad()
def sample_rf_inversion_edit(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                             callback: Callback = None, disable: bool | None = None, source: torch.Tensor | None = None,
                             eta: float = 0.9, start_step: int = 0, stop_step: int = 7,
                             eta_trend: str = "constant", solver: str = "euler") -> torch.Tensor:
    """RF-Inversion's controlled reverse ODE (Rout et al. 2025, Eq. 15 / Algorithm 2).

    While sampling, the model's velocity is pulled toward the conditional velocity ``(x - y0) / sigma``
    that leads straight back to the source latent ``y0``, with strength ``eta`` on steps
    ``[start_step, stop_step)`` shaped by ``eta_trend``. eta = 0 is plain sampling.
    """
    check_sigmas(sigmas)
    if source is None:
        raise ValueError("RF-Inversion editing needs the source latent (the image that was inverted).")
    if source.shape != x.shape:
        raise ValueError(f"source latent shape {tuple(source.shape)} does not match the sampled latent {tuple(x.shape)}.")
    source = source.to(x)

    def toward_source(strength):
        return lambda x, sigma, d: d + strength * ((x - source) / sigma - d)

    etas = eta_schedule(eta, start_step, stop_step, eta_trend, len(sigmas) - 1)
    controls = [toward_source(e) if e > 0 else None for e in etas]
    return integrate(model, x, sigmas, extra_args, callback, solver, controls)
