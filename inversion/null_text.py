"""Null-text inversion (Mokady et al. 2023, "Null-text Inversion for Editing Real Images using Guided
Diffusion Models", Algorithm 1 and Eq. 4) as small pure functions.

Plain inversion at guidance 1 gives a trajectory ``z*_T ... z*_0`` that guided sampling does not follow: at
guidance 7.5 every step drifts. Null-text inversion keeps the conditional prediction and optimises the
unconditional embedding of each step, so that the guided step from the running latent lands on the inverted
one: ``min_e || z*_{t-1} - step(z_t, e) ||^2``. The optimised embedding seeds the next step.

Steps are Euler (= DDIM) steps in sigma form. Losses are measured on the variance-preserving latent the paper
uses (``x / sqrt(1 + sigma^2)`` for eps/v models; flow latents are already bounded), so the paper's early-stop
thresholds mean the same thing here.

No ComfyUI import here. The model is anything with the :class:`GuidedDenoiser` methods.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol

import torch

from .samplers import check_sigmas, to_d

Callback = Optional[Callable[[dict], None]]
SOLVERS = ("adam", "gauss_newton")
STARTS = ("source", "negative")


class GuidedDenoiser(Protocol):
    """A classifier-free-guided denoiser split into its branches, all returning denoised x0 estimates."""

    def cond(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def uncond(self, x: torch.Tensor, sigma: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor: ...

    def guide(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class NullTextSettings:
    """The optimisation recipe.

    ``solver="adam", start="negative"`` is the paper's recipe (50 steps at guidance 7.5, SD v1-4): from the
    negative's embedding, step ``i`` (0 = the noisiest) uses Adam with learning rate ``lr * (1 - i * lr_decay)``
    for at most ``inner_steps`` iterations and stops early once the loss is below
    ``early_stop + i * early_stop_growth``.

    The defaults are faster and, measured, more faithful: ``start="source"`` starts from the source prompt's
    embedding, which is negative-prompt inversion's answer (Miyake et al. 2023, who propose it as null-text's
    starting point), and ``solver="gauss_newton"`` solves each step's problem with ``gauss_newton_steps`` CGLS
    iterations (:func:`gauss_newton_step`). The host adapter reads ``start``; the core takes the starting
    embedding as given.
    """

    inner_steps: int = 10
    lr: float = 1e-2
    early_stop: float = 1e-5
    early_stop_growth: float = 2e-5
    lr_decay: float = 1e-2
    solver: str = "gauss_newton"
    gauss_newton_steps: int = 1
    start: str = "source"

    def __post_init__(self) -> None:
        if self.inner_steps < 0 or self.gauss_newton_steps < 0:
            raise ValueError(f"inner_steps and gauss_newton_steps must be >= 0; got {self.inner_steps}, "
                             f"{self.gauss_newton_steps}.")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be > 0; got {self.lr}.")
        if self.start not in STARTS:
            raise ValueError(f"null-text start must be one of {STARTS}; got {self.start!r}.")
        if self.solver not in SOLVERS:
            raise ValueError(f"null-text solver must be one of {SOLVERS}; got {self.solver!r}.")
        if self.early_stop < 0 or self.early_stop_growth < 0:
            raise ValueError(f"early-stop thresholds must be >= 0; got {self.early_stop}, {self.early_stop_growth}.")

    def lr_at(self, step: int) -> float:
        return self.lr * max(1.0 - step * self.lr_decay, 0.0)

    def threshold_at(self, step: int) -> float:
        return self.early_stop + step * self.early_stop_growth


def loss_weight(sigma: torch.Tensor | float, family: str) -> float:
    """Factor that turns a squared error on the sigma-scaled latent into one on the paper's latent.

    eps/v models in sigma form carry ``x = z * sqrt(1 + sigma^2)``; flow latents are used as they are.
    """
    return 1.0 if family == "flow" else 1.0 / (1.0 + float(sigma) ** 2)


def euler_to(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The DDIM / Euler step that a denoised estimate implies (Song et al. 2021, Eq. 13, eta = 0)."""
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma)


@dataclasses.dataclass
class NullTextStep:
    embedding: torch.Tensor  # [B, tokens, width], the optimised unconditional embedding
    denoised: torch.Tensor  # the guided prediction with it
    loss: torch.Tensor  # [B], the final per-image loss
    iterations: torch.Tensor  # [B], Adam iterations each image used


def _per_image_loss(x_next: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    return (x_next - target).pow(2).flatten(1).mean(1) * weight


def null_text_step(model: GuidedDenoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   target: torch.Tensor, embedding: torch.Tensor, lr: float, threshold: float, inner_steps: int,
                   weight: float = 1.0, on_iteration: Callable[[int], None] | None = None) -> NullTextStep:
    """Optimise one step's unconditional embedding (Mokady et al. 2023, Algorithm 1, inner loop).

    Each image of the batch has its own embedding row and its own early stop: once an image's loss is below
    ``threshold`` its row is kept as it is while the others go on. The conditional prediction does not
    depend on the embedding and is computed once. The loss is checked before each Adam update, so an
    embedding that already fits costs one forward pass and no backward pass.
    """
    with torch.no_grad():
        cond = model.cond(x, sigma)
    batch = x.shape[0]
    if embedding.shape[0] != batch:
        raise ValueError(f"the unconditional embedding has batch {embedding.shape[0]}, the latent {batch}.")
    target = target.to(x)
    done = torch.zeros(batch, dtype=torch.bool, device=x.device)
    iterations = torch.zeros(batch, dtype=torch.long)
    emb = embedding.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([emb], lr=lr)
    for j in range(inner_steps):
        with torch.enable_grad():
            denoised = model.guide(x, sigma, cond, model.uncond(x, sigma, emb))
            loss = _per_image_loss(euler_to(x, sigma, sigma_next, denoised), target, weight)
        done |= loss.detach() < threshold
        if bool(done.all()):
            return NullTextStep(emb.detach(), denoised.detach(), loss.detach(), iterations)
        iterations += (~done).long().cpu()
        kept = emb.detach()[done].clone()
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            (loss * (~done)).sum().backward()
        optimizer.step()
        with torch.no_grad():
            emb[done] = kept
        if on_iteration is not None:
            on_iteration(j)
    with torch.no_grad():
        final = emb.detach()
        denoised = model.guide(x, sigma, cond, model.uncond(x, sigma, final))
        loss = _per_image_loss(euler_to(x, sigma, sigma_next, denoised), target, weight)
    return NullTextStep(final, denoised, loss, iterations)


@torch.no_grad()
def sample_null_text(model: GuidedDenoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback: Callback = None, disable: bool | None = None, *, trajectory: torch.Tensor,
                     embedding: torch.Tensor, family: str = "eps", settings: NullTextSettings = NullTextSettings(),
                     record: list | None = None) -> torch.Tensor:
    """Null-text inversion over a whole schedule (Mokady et al. 2023, Algorithm 1).

    ``sigmas`` descend (the reconstruction direction); ``trajectory[i]`` is the inverted latent at the i-th
    *ascending* sigma, as in an inversion record, so step ``k`` aims at ``trajectory[-2 - k]``. Starts from
    ``x`` (normally ``trajectory[-1]``), appends each step's :class:`NullTextStep` to ``record`` and returns
    the reconstruction.
    """
    check_sigmas(sigmas)
    steps = len(sigmas) - 1
    if trajectory.shape[0] != steps + 1:
        raise ValueError(f"trajectory has {trajectory.shape[0]} latents; {steps} steps need {steps + 1}.")
    for k in range(steps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        step = solve_step(model, x, sigma, sigma_next, trajectory[-2 - k], embedding, settings, k,
                          loss_weight(sigma_next, family))
        if record is not None:
            record.append(step)
        if callback is not None:
            callback({"x": x, "i": k, "sigma": sigma, "sigma_hat": sigma, "denoised": step.denoised})
        embedding = step.embedding
        x = euler_to(x, sigma, sigma_next, step.denoised)
    return x


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image inner products, shaped to broadcast against ``a``."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))


def gauss_newton_step(model: GuidedDenoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                      target: torch.Tensor, embedding: torch.Tensor, threshold: float, inner_steps: int,
                      weight: float = 1.0, on_iteration: Callable[[int], None] | None = None,
                      relative_step: float = 1e-3) -> NullTextStep:
    """The same per-step problem as :func:`null_text_step`, solved by Gauss-Newton with CGLS.

    The guided step is linearised at the current embedding once per step: ``J^T u`` comes from the retained
    backward graph of one forward pass (a backward pass each), ``J p`` from a forward finite difference.
    ``inner_steps`` CGLS iterations (each one backward and one forward pass) then solve the linear least-squares
    problem per image; a final forward pass checks the result, and an image whose loss did not improve keeps
    its embedding.
    """
    target = target.to(x)
    size = x[0].numel()

    def residual(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        denoised = model.guide(x, sigma, cond, model.uncond(x, sigma, e))
        return (euler_to(x, sigma, sigma_next, denoised) - target) * (weight / size) ** 0.5, denoised

    with torch.no_grad():
        cond = model.cond(x, sigma)
    e0 = embedding.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        r0, denoised0 = residual(e0)
    loss0 = r0.detach().pow(2).flatten(1).sum(1)
    iterations = torch.zeros(x.shape[0], dtype=torch.long)
    active = loss0 >= threshold  # images that already fit keep their embedding
    if not bool(active.any()) or inner_steps == 0:
        return NullTextStep(e0.detach(), denoised0.detach(), loss0, iterations)

    def jt(u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(r0, e0, grad_outputs=u, retain_graph=True)[0]

    r = -r0.detach()
    s = jt(r)
    p, gamma = s, _dot(s, s)
    delta = torch.zeros_like(e0)
    for i in range(inner_steps):
        scale = e0.detach().flatten(1).norm(dim=1).clamp_min(1.0)
        eps = relative_step * scale / p.flatten(1).norm(dim=1).clamp_min(1e-30)
        eps = eps.reshape(-1, 1, 1)
        with torch.no_grad():
            q = (residual(e0.detach() + eps * p)[0] - r0.detach()) / eps.reshape(-1, 1, 1, 1)
        alpha = gamma.reshape(-1, 1, 1) / _dot(q, q).reshape(-1, 1, 1).clamp_min(1e-30)
        delta = delta + alpha * p
        r = r - alpha.reshape(-1, 1, 1, 1) * q
        iterations += active.long().cpu()
        if on_iteration is not None:
            on_iteration(i)
        if i + 1 == inner_steps:
            break
        s = jt(r)
        gamma_next = _dot(s, s)
        p = s + (gamma_next / gamma.clamp_min(1e-30)) * p
        gamma = gamma_next
    with torch.no_grad():
        e1 = e0.detach() + delta
        r1, denoised1 = residual(e1)
        loss1 = r1.pow(2).flatten(1).sum(1)
        better = (loss1 < loss0) & active
        keep = better.reshape(-1, 1, 1)
        embedding = torch.where(keep, e1, e0.detach())
        denoised = torch.where(better.reshape(-1, 1, 1, 1), denoised1, denoised0.detach())
        loss = torch.where(better, loss1, loss0)
    return NullTextStep(embedding, denoised, loss, iterations)


def solve_step(model: GuidedDenoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
               target: torch.Tensor, embedding: torch.Tensor, settings: NullTextSettings, step: int,
               weight: float = 1.0, on_iteration: Callable[[int], None] | None = None) -> NullTextStep:
    """Step ``step`` of null-text inversion with the settings' solver."""
    if settings.solver == "adam":
        return null_text_step(model, x, sigma, sigma_next, target, embedding, settings.lr_at(step),
                              settings.threshold_at(step), settings.inner_steps, weight, on_iteration)
    # Only the constant part of the early stop: the paper's growth (up to 1e-3 at step 50) is tuned to Adam's
    # cost and, measured, lets a Gauss-Newton run skip most late steps and end 5x less faithful.
    return gauss_newton_step(model, x, sigma, sigma_next, target, embedding, settings.early_stop,
                             settings.gauss_newton_steps, weight, on_iteration)
