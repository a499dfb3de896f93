"""Edit directions: vectors to move a StyleGAN latent (W / W+) or a diffusion conditioning along.

- :func:`sefa`: Shen & Zhou 2021, "Closed-Form Factorization of Latent Semantics in GANs" (SeFa), eq. 5.
- :func:`ganspace`: Harkonen et al. 2020, "GANSpace: Discovering Interpretable GAN Controls", section 2.
- :func:`fit_boundary` and :func:`condition`: Shen et al. 2020, "Interpreting the Latent Space of GANs for
  Semantic Face Editing" (InterFaceGAN), sections 2.2 and 2.3.
- :func:`style_mix`: Karras et al. 2019, "A Style-Based Generator Architecture for GANs", section 3.1.
- :func:`prompt_direction`: Parmar et al. 2023, "Zero-shot Image-to-Image Translation" (pix2pix-zero), section 3.2.

A :class:`Direction` holds the vectors plus what they were made for (generator identity, W+ rows) and saves to
``.safetensors`` with :func:`save_direction`. :func:`read_boundary_file` reads a user's unit normal from
``.npy``, ``.safetensors`` or ``.pt`` without ever unpickling anything.

Plain torch; never imports ComfyUI.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..inversion.gan_latent import FORMAT_KEY
from ..inversion.record import read_record, write_record

log = logging.getLogger("retrace")

DIRECTION_SPACES = ("w", "text")
METHODS = ("sefa", "ganspace", "logistic", "svm", "mean-difference", "file", "conditional", "prompt")
BOUNDARY_METHODS = ("svm", "logistic", "mean-difference")
LAYER_PRESETS = ("all", "coarse", "middle", "fine")
BOUNDARY_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth")
DIRECTION_FORMAT = "retrace-direction"
_BOUNDARY_KEYS = ("direction", "boundary")
# L2 weight on the mean loss in standardised units (LIBLINEAR C = 10/N): few, separable examples in 512-D
# otherwise give a max-margin normal that follows the examples' noise more than the attribute.
BOUNDARY_L2 = 0.1


def _shape(t: Any) -> str:
    """The shape of ``t`` as error messages write it."""
    return str(tuple(t.shape)) if hasattr(t, "shape") else type(t).__name__


def _tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} {_shape(t)} contains NaN or infinite values")


def _strength(strength: float) -> float:
    s = float(strength)
    if not math.isfinite(s):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    return s


def _fix_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Make each row's largest-magnitude component positive (eigen/singular vectors are defined up to sign)."""
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vectors.gather(1, idx))
    sign[sign == 0] = 1
    return vectors * sign


# --- the direction record -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Direction:
    """``vectors`` (float32, CPU): space 'w' ``[K, w_dim]`` (every W+ row the same) or ``[K, num_ws, w_dim]``
    (per row); space 'text' ``[K, tokens, channels]`` (conditioning offsets). ``model_id`` is the generator's base
    identity ('' = unknown), ``num_ws`` its W+ row count (0 = unknown), ``layers`` the ``[start, end)`` rows the
    method meant, ``scales`` ``[K]`` (SeFa eigenvalues, GANSpace stds), ``mean`` ``[w_dim]`` (GANSpace),
    ``pooled`` ``[K, pooled_dim]`` (text directions of models with a pooled output)."""

    vectors: torch.Tensor
    space: str
    method: str
    model_id: str = ""
    num_ws: int = 0
    layers: tuple[int, int] | None = None
    scales: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.space not in DIRECTION_SPACES:
            raise ValueError(f"direction space must be one of {DIRECTION_SPACES}, got {self.space!r}")
        if self.method not in METHODS:
            raise ValueError(f"direction method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a string, got {type(self.model_id).__name__}")
        if isinstance(self.num_ws, bool) or not isinstance(self.num_ws, int) or self.num_ws < 0:
            raise ValueError(f"num_ws must be an int >= 0 (0 = unknown), got {self.num_ws!r}")
        v = _tensor(self.vectors, "direction vectors")
        if not v.is_floating_point():
            raise ValueError(f"direction vectors must be floating point, got {v.dtype} {_shape(v)}")
        v = v.detach().to("cpu", torch.float32).contiguous()
        object.__setattr__(self, "vectors", v)
        if self.space == "w":
            if v.ndim not in (2, 3) or v.numel() == 0:
                raise ValueError("a 'w' direction needs vectors [K, w_dim] or [K, num_ws, w_dim], got "
                                 f"{_shape(v)}")
            if v.ndim == 3 and self.num_ws and v.shape[1] != self.num_ws:
                raise ValueError(f"per-layer direction vectors {_shape(v)} do not have num_ws={self.num_ws} rows")
        else:
            if v.ndim != 3 or v.numel() == 0:
                raise ValueError(f"a 'text' direction needs vectors [K, tokens, channels], got {_shape(v)}")
            if self.num_ws or self.layers is not None or self.mean is not None:
                raise ValueError("a 'text' direction has no num_ws, layers or mean (those are for StyleGAN 'w')")
        _finite(v, "direction vectors")
        k = v.shape[0]
        if self.layers is not None:
            layers = tuple(self.layers)
            if len(layers) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ValueError(f"layers must be a pair of ints (start, end), got {self.layers!r}")
            start, end = layers
            limit = self.num_ws or (v.shape[1] if v.ndim == 3 else None)
            if start < 0 or end <= start or (limit is not None and end > limit):
                raise ValueError(f"layers {layers} are not a [start, end) range inside 0..{limit}")
            object.__setattr__(self, "layers", layers)
        for name, expect in (("scales", (k,)), ("mean", (v.shape[-1],)), ("pooled", None)):
            t = getattr(self, name)
            if t is None:
                continue
            t = _tensor(t, name).detach().to("cpu", torch.float32).contiguous()
            if name == "pooled":
                if self.space != "text":
                    raise ValueError("only a 'text' direction has a pooled offset")
                if t.ndim != 2 or t.shape[0] != k:
                    raise ValueError(f"pooled must be [K={k}, pooled_dim], got {_shape(t)}")
            elif tuple(t.shape) != expect:
                raise ValueError(f"{name} must have shape {expect}, got {_shape(t)}")
            _finite(t, name)
            object.__setattr__(self, name, t)

    @property
    def count(self) -> int:
        """K, the number of directions held."""
        return int(self.vectors.shape[0])

    @property
    def w_dim(self) -> int:
        """The latent width of a 'w' direction."""
        if self.space != "w":
            raise ValueError("a 'text' direction has no w_dim")
        return int(self.vectors.shape[-1])

    @property
    def per_layer(self) -> bool:
        """True when each W+ row has its own vector (``vectors`` [K, num_ws, w_dim])."""
        return self.space == "w" and self.vectors.ndim == 3

    def save(self, path: str | Path) -> Path:
        """Write this direction as ``.safetensors`` (see :func:`save_direction`); never overwrites."""
        return save_direction(path, self)

    def pick(self, index: int) -> Direction:
        """Component ``index`` alone (K=1), everything else kept."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.count:
            raise ValueError(f"direction index {index!r} is out of range: this direction holds {self.count} "
                             f"(indices 0-{self.count - 1})")

        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index:index + 1].clone()

        return Direction(vectors=one(self.vectors), space=self.space, method=self.method, model_id=self.model_id,
                         num_ws=self.num_ws, layers=self.layers, scales=one(self.scales),
                         mean=None if self.mean is None else self.mean.clone(), pooled=one(self.pooled))


# --- finding directions ---------------------------------------------------------------------------------


def sefa(affine_weights: list[torch.Tensor], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SeFa (Shen & Zhou 2021, eq. 5): the top eigenvectors of ``A^T A`` where ``A`` stacks the style affines'
    weights ``[sum C, w_dim]`` with each row normalised to unit length. Returns (vectors ``[count, w_dim]``,
    eigenvalues ``[count]``), float32, sorted by eigenvalue descending, each vector's largest component positive."""
    if not isinstance(affine_weights, (list, tuple)) or len(affine_weights) == 0:
        raise ValueError("sefa needs a non-empty list of style affine weights [C, w_dim]")
    w_dim = None
    for i, a in enumerate(affine_weights):
        a = _tensor(a, f"affine weight {i}")
        if a.ndim != 2 or a.numel() == 0:
            raise ValueError(f"affine weight {i} must be [C, w_dim], got {_shape(a)}")
        if w_dim is None:
            w_dim = a.shape[1]
        elif a.shape[1] != w_dim:
            raise ValueError(f"affine weight {i} has shape {_shape(a)}; the first had w_dim={w_dim}")
        _finite(a, f"affine weight {i}")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= w_dim:
        raise ValueError(f"count must be an int in 1..{w_dim} (w_dim), got {count!r}")
    A = torch.cat([a.detach().to("cpu", torch.float64) for a in affine_weights])
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-300)  # a zero row stays zero
    eigenvalues, eigenvectors = torch.linalg.eigh(A.T @ A)  # ascending
    order = torch.argsort(eigenvalues, descending=True)[:count]
    vectors = _fix_sign(eigenvectors[:, order].T.contiguous())
    values = eigenvalues[order].clamp_min(0)
    log.debug("sefa: %d rows x %d, top eigenvalues %s", A.shape[0], w_dim, values[:5].tolist())
    return vectors.to(torch.float32), values.to(torch.float32)


def ganspace(ws: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GANSpace (Harkonen et al. 2020, section 2): PCA of sampled ``w`` ``[N, w_dim]`` (float64 SVD of the centred
    samples). Returns (components ``[count, w_dim]`` unit rows, stds ``[count]`` (the std of the samples'
    projections, N-1 normalised), mean ``[w_dim]``, explained variance ratios ``[count]``), by variance descending."""
    ws = _tensor(ws, "ws")
    if ws.ndim != 2 or ws.shape[0] < 2 or ws.shape[1] < 1:
        raise ValueError(f"ganspace needs samples w [N >= 2, w_dim], got {_shape(ws)}")
    _finite(ws, "ws")
    n, w_dim = ws.shape
    limit = min(n - 1, w_dim)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= limit:
        raise ValueError(f"count must be an int in 1..{limit} (min(samples - 1, w_dim)) for samples "
                         f"{_shape(ws)}, got {count!r}")
    X = ws.detach().to("cpu", torch.float64)
    mean = X.mean(dim=0)
    _, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)  # S descending
    variance = S ** 2
    total = variance.sum()
    if float(total) <= 0:
        raise ValueError("ganspace samples are all identical; there is no variance to analyse")
    components = _fix_sign(Vh[:count])
    stds = S[:count] / math.sqrt(n - 1)
    ratios = variance[:count] / total
    log.debug("ganspace: %d samples, explained variance of %d components %.4f", n, count, float(ratios.sum()))
    return (components.to(torch.float32), stds.to(torch.float32), mean.to(torch.float32), ratios.to(torch.float32))


def fit_boundary(positive: torch.Tensor, negative: torch.Tensor, method: str = "svm", seed: int = 0) -> torch.Tensor:
    """InterFaceGAN (Shen et al. 2020, section 2.2): the unit normal ``[w_dim]`` of a linear separator between
    ``positive`` and ``negative`` w ``[N, w_dim]``, pointing toward ``positive``. ``method``: 'svm' (L2-regularised
    squared hinge), 'logistic' (L2-regularised logistic regression), both solved with L-BFGS in float64 (``seed``
    draws the tiny starting point), or 'mean-difference' (normalised mean(pos) - mean(neg))."""
    method = str(method).strip().lower().replace("_", "-").replace(" ", "-")
    if method not in BOUNDARY_METHODS:
        raise ValueError(f"boundary method must be one of {BOUNDARY_METHODS}, got {method!r}")
    positive, negative = _tensor(positive, "positive"), _tensor(negative, "negative")
    for name, t in (("positive", positive), ("negative", negative)):
        if t.ndim != 2 or t.shape[1] < 1:
            raise ValueError(f"{name} latents must be [N, w_dim] (reduce W+ first), got {_shape(t)}")
        if t.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 latents, got {_shape(t)}")
        _finite(t, f"{name} latents")
    if positive.shape[1] != negative.shape[1]:
        raise ValueError(f"positive {_shape(positive)} and negative {_shape(negative)} latents differ in w_dim")
    # Callers may run under inference mode (ComfyUI runs every node so); the solvers need autograd and
    # ordinary tensors, hence the copies made with inference mode off.
    with torch.inference_mode(False):
        pos = positive.detach().to("cpu", torch.float64).clone()
        neg = negative.detach().to("cpu", torch.float64).clone()
        if method == "mean-difference":
            normal = pos.mean(0) - neg.mean(0)
        else:
            normal = _fit_linear(pos, neg, method, seed)
    norm = float(normal.norm())
    # mean-difference: raw units, compared with the data's spread; svm/logistic: weights in standardised units.
    floor = 1e-12 * float(torch.cat([pos, neg]).abs().max()) if method == "mean-difference" else 1e-6
    if not math.isfinite(norm) or norm <= floor:
        raise ValueError("the positive and negative latents cannot be told apart (the boundary normal is zero); "
                         "choose examples that differ")
    return (normal / norm).to(torch.float32)


def _fit_linear(pos: torch.Tensor, neg: torch.Tensor, method: str, seed: int) -> torch.Tensor:
    """A linear classifier's weight vector (intercept unregularised), fit in centred, scalar-scaled coordinates
    (a scalar scale keeps the normal's direction), L2 weight :data:`BOUNDARY_L2` on the mean loss."""
    X = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos), dtype=X.dtype), -torch.ones(len(neg), dtype=X.dtype)])
    X = X - X.mean(0)
    X = X / (X.std() if float(X.std()) > 0 else 1.0)
    n, d = X.shape
    lam = BOUNDARY_L2
    gen = torch.Generator().manual_seed(int(seed))
    params = (1e-3 * torch.randn(d + 1, generator=gen, dtype=X.dtype)).requires_grad_(True)

    def objective() -> torch.Tensor:
        w, b = params[:d], params[d]
        margin = y * (X @ w + b)
        if method == "svm":
            loss = torch.clamp(1 - margin, min=0).pow(2).mean()
        else:
            loss = torch.nn.functional.softplus(-margin).mean()
        return loss + 0.5 * lam * w.dot(w)

    opt = torch.optim.LBFGS([params], lr=1, max_iter=500, history_size=20, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        for _ in range(4):
            opt.step(closure)
    with torch.no_grad():
        final = float(objective())
    log.debug("fit_boundary %s: %d points, final objective %.6g", method, n, final)
    return params.detach()[:d].clone()


def condition(primary: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """InterFaceGAN conditional manipulation (Shen et al. 2020, eq. 6 generalised to J conditions): ``primary``
    ``[w_dim]`` minus its least-squares projection onto the span of ``others`` ``[J, w_dim]`` (a single ``[w_dim]``
    is one condition), in float64, renormalised to unit length. Refuses a primary inside that span."""
    primary, others = _tensor(primary, "primary direction"), _tensor(others, "condition directions")
    if primary.ndim != 1 or primary.numel() == 0:
        raise ValueError(f"primary direction must be [w_dim], got {_shape(primary)}")
    if others.ndim == 1:
        others = others[None]
    if others.ndim != 2 or others.shape[0] == 0 or others.shape[1] != primary.shape[0]:
        raise ValueError(f"condition directions must be [J, w_dim={primary.shape[0]}], got {_shape(others)} "
                         f"(primary {_shape(primary)})")
    _finite(primary, "primary direction")
    _finite(others, "condition directions")
    p = primary.detach().to("cpu", torch.float64)
    C = others.detach().to("cpu", torch.float64)
    if float(p.norm()) == 0:
        raise ValueError("the primary direction is zero")
    x = torch.linalg.lstsq(C.T, p[:, None], driver="gelsd").solution  # [J, 1]
    residual = p - (C.T @ x)[:, 0]
    r = float(residual.norm())
    if r <= 1e-6 * float(p.norm()):
        raise ValueError("the primary direction lies in the span of the directions to remove; nothing is left "
                         "after removing them")
    # One more pass removes what float64 rounding left along the span.
    x = torch.linalg.lstsq(C.T, residual[:, None], driver="gelsd").solution
    residual = residual - (C.T @ x)[:, 0]
    return (residual / residual.norm()).to(torch.float32)


# --- using directions -----------------------------------------------------------------------------------


def parse_layers(spec: str, num_ws: int) -> tuple[int, int]:
    """W+ rows ``[start, end)`` from 'all', 'coarse' (0-3), 'middle' (4-7), 'fine' (8-end), 'a-b' (inclusive)
    or 'a'. Presets are clipped to ``num_ws``."""
    if isinstance(num_ws, bool) or not isinstance(num_ws, int) or num_ws < 1:
        raise ValueError(f"num_ws must be a positive int, got {num_ws!r}")
    if not isinstance(spec, str):
        raise ValueError(f"layers must be a string such as 'all', 'coarse' or '4-7', got {type(spec).__name__}")
    text = spec.strip().lower()
    where = f"for a generator with {num_ws} W+ rows"
    presets = {"all": (0, num_ws), "coarse": (0, min(4, num_ws)), "middle": (4, min(8, num_ws)),
               "fine": (8, num_ws)}
    if text in presets:
        start, end = presets[text]
        if end <= start:
            raise ValueError(f"layers '{spec}' select no rows {where} (rows 0-{num_ws - 1})")
        return start, end
    match = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", text)
    if match is None:
        raise ValueError(f"layers '{spec}' are not understood {where}; use one of {LAYER_PRESETS}, a row 'a' or "
                         f"an inclusive range 'a-b' within 0-{num_ws - 1}")
    start = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else start
    if last < start:
        raise ValueError(f"layers '{spec}' run backwards {where}; write the smaller row first")
    if last >= num_ws:
        raise ValueError(f"layers '{spec}' are outside 0-{num_ws - 1} {where}")
    return start, last + 1


def _layer_range(layers: Any, num_ws: int) -> tuple[int, int]:
    """``layers`` as a checked ``[start, end)``: a pair, a :func:`parse_layers` string, or None (all rows)."""
    if layers is None:
        return 0, num_ws
    if isinstance(layers, str):
        return parse_layers(layers, num_ws)
    try:
        start, end = (int(x) for x in layers)
    except (TypeError, ValueError):
        raise ValueError(f"layers must be (start, end), a layer string or None, got {layers!r}") from None
    if not 0 <= start < end <= num_ws:
        raise ValueError(f"layers {tuple(layers)} are not a [start, end) range within 0..{num_ws} "
                         f"for latents with {num_ws} W+ rows")
    return start, end


def apply_direction(ws: torch.Tensor, vector: torch.Tensor, strength: float,
                    layers: tuple[int, int]) -> torch.Tensor:
    """A new ``ws`` ``[B, num_ws, w_dim]`` with rows ``[start, end)`` moved by ``strength * vector`` (``vector``
    ``[w_dim]`` for every row, or ``[num_ws, w_dim]`` per row; GANSpace's layer-wise edit E(v, s-e)). Strength 0
    returns an exact copy. ``layers`` may also be a :func:`parse_layers` string or None (all rows)."""
    ws, vector = _tensor(ws, "ws"), _tensor(vector, "direction vector")
    if ws.ndim != 3:
        raise ValueError(f"ws must be [batch, num_ws, w_dim], got {_shape(ws)}")
    _, num_ws, w_dim = ws.shape
    if not ((vector.ndim == 1 and vector.shape[0] == w_dim) or (vector.ndim == 2 and tuple(vector.shape) ==
                                                                  (num_ws, w_dim))):
        raise ValueError(f"direction vector {_shape(vector)} does not fit ws {_shape(ws)}: expected [{w_dim}] or "
                         f"[{num_ws}, {w_dim}]")
    s = _strength(strength)
    start, end = _layer_range(layers, num_ws)
    out = ws.clone()
    if s == 0:
        return out
    v = vector.detach().to(ws.device, ws.dtype)
    if v.ndim == 2:
        v = v[start:end]
    out[:, start:end] += s * v
    return out


def sweep(ws: torch.Tensor, vector: torch.Tensor, strengths: list[float], layers: Any) -> torch.Tensor:
    """One latent ``[1, num_ws, w_dim]`` moved by each of ``strengths`` in turn: ``[S, num_ws, w_dim]``."""
    ws = _tensor(ws, "ws")
    if ws.ndim != 3 or ws.shape[0] != 1:
        raise ValueError(f"sweep takes a single latent [1, num_ws, w_dim], got {_shape(ws)}; pick one latent of "
                         f"the batch first")
    strengths = list(strengths)
    if not strengths:
        raise ValueError("sweep needs at least one strength")
    return torch.cat([apply_direction(ws, vector, s, layers) for s in strengths])


def interpolate(a: torch.Tensor, b: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` latents on the straight line from ``a`` to ``b`` (``[num_ws, w_dim]`` each), t = linspace(0, 1);
    the first is ``a`` and the last ``b``, exactly."""
    a, b = _tensor(a, "latent a"), _tensor(b, "latent b")
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"interpolate needs two latents [num_ws, w_dim] of the same shape, got a {_shape(a)} and "
                         f"b {_shape(b)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"count must be an int >= 2, got {count!r}")
    b = b.to(a.dtype)
    t = torch.linspace(0, 1, count, dtype=torch.float64).to(a.dtype)[:, None, None]
    out = torch.lerp(a[None].expand(count, -1, -1), b[None].expand(count, -1, -1), t.to(a.device))
    out[0] = a
    out[-1] = b
    return out


def style_mix(coarse: torch.Tensor, fine: torch.Tensor, crossover: int) -> torch.Tensor:
    """Style mixing (Karras et al. 2019, section 3.1): W+ rows ``[0, crossover)`` from ``coarse`` and
    ``[crossover, num_ws)`` from ``fine``. Both ``[num_ws, w_dim]`` or both ``[B, num_ws, w_dim]``."""
    coarse, fine = _tensor(coarse, "coarse latent"), _tensor(fine, "fine latent")
    if coarse.ndim not in (2, 3) or coarse.shape != fine.shape:
        raise ValueError(f"style_mix needs two latents of the same shape ([num_ws, w_dim] or [B, num_ws, w_dim]), "
                         f"got coarse {_shape(coarse)} and fine {_shape(fine)}")
    num_ws = coarse.shape[-2]
    if isinstance(crossover, bool) or not isinstance(crossover, int) or not 0 <= crossover <= num_ws:
        raise ValueError(f"crossover must be an int in 0..{num_ws} (the latents have {num_ws} W+ rows), "
                         f"got {crossover!r}")
    return torch.cat([coarse[..., :crossover, :], fine[..., crossover:, :].to(coarse.dtype)], dim=-2)


def prompt_direction(source: torch.Tensor, target: torch.Tensor, source_pooled: torch.Tensor | None = None,
                     target_pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pix2pix-zero (Parmar et al. 2023, section 3.2): mean of the target prompts' embeddings minus the mean of
    the source prompts' (``[Ns, T, C]`` and ``[Nt, T, C]``) -> ``[T, C]``, and the same for the pooled outputs
    (``[Ns, P]``, ``[Nt, P]`` -> ``[P]``) when both are given. Float64 means, float32 CPU results."""
    source, target = _tensor(source, "source embeddings"), _tensor(target, "target embeddings")
    for name, t in (("source", source), ("target", target)):
        if t.ndim != 3 or t.shape[0] == 0:
            raise ValueError(f"{name} embeddings must be [prompts, tokens, channels], got {_shape(t)}")
        _finite(t, f"{name} embeddings")
    if source.shape[1:] != target.shape[1:]:
        raise ValueError(f"source {_shape(source)} and target {_shape(target)} embeddings differ in tokens or "
                         f"channels; every prompt must give the same token length")

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64).mean(0)

    direction = (mean(target) - mean(source)).to(torch.float32)
    if (source_pooled is None) != (target_pooled is None):
        raise ValueError("give the pooled outputs of both prompt sets or of neither")
    if source_pooled is None:
        return direction, None
    sp, tp = _tensor(source_pooled, "source pooled"), _tensor(target_pooled, "target pooled")
    for name, t, n in (("source", sp, source.shape[0]), ("target", tp, target.shape[0])):
        if t.ndim != 2 or t.shape[0] != n:
            raise ValueError(f"{name} pooled output must be [prompts={n}, pooled_dim], got {_shape(t)}")
        _finite(t, f"{name} pooled output")
    if sp.shape[1] != tp.shape[1]:
        raise ValueError(f"source pooled {_shape(sp)} and target pooled {_shape(tp)} differ in width")
    return direction, (mean(tp) - mean(sp)).to(torch.float32)


def apply_prompt_direction(cond: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """``cond`` ``[B, T, C]`` + ``strength * direction`` ``[T, C]`` as a new tensor (cond's dtype and device);
    also a pooled output ``[B, P]`` with ``direction`` ``[P]``. Strength 0 returns an exact copy."""
    cond, direction = _tensor(cond, "conditioning"), _tensor(direction, "prompt direction")
    if cond.ndim not in (2, 3) or direction.ndim != cond.ndim - 1 or tuple(cond.shape[1:]) != tuple(direction.shape):
        raise ValueError(f"prompt direction {_shape(direction)} does not fit conditioning {_shape(cond)}: tokens and "
                         f"channels must match ([B, T, C] with [T, C], or pooled [B, P] with [P])")
    s = _strength(strength)
    if s == 0:
        return cond.clone()
    return cond + s * direction.detach().to(cond.device, cond.dtype)


# --- files ----------------------------------------------------------------------------------------------


def save_direction(path: str | Path, direction: Direction, overwrite: bool = False) -> Path:
    """Write ``direction`` as ``.safetensors`` (tensors ``vectors``, ``scales``, ``mean``, ``pooled``; metadata
    ``retrace.format`` = 'retrace-direction' and the other fields). Never overwrites unless asked."""
    if not isinstance(direction, Direction):
        raise ValueError(f"save_direction needs a Direction, got {type(direction).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"directions are saved as .safetensors, got {path.name}")
    tensors = {"vectors": direction.vectors}
    for name in ("scales", "mean", "pooled"):
        t = getattr(direction, name)
        if t is not None:
            tensors[name] = t
    meta = {"space": direction.space, "method": direction.method, "model_id": direction.model_id,
            "num_ws": str(direction.num_ws),
            "layers": json.dumps(list(direction.layers) if direction.layers is not None else None)}
    write_record(path, DIRECTION_FORMAT, tensors, meta, key=FORMAT_KEY, overwrite=overwrite)
    return path


def load_direction(path: str | Path) -> Direction:
    """Read a direction written by :func:`save_direction`."""
    path = Path(path)
    tensors, meta = read_record(path, DIRECTION_FORMAT, "direction", key=FORMAT_KEY, required=("vectors",))
    try:
        layers = json.loads(meta.get("layers", "null"))
        num_ws = int(meta.get("num_ws", "0"))
    except ValueError as e:
        raise ValueError(f"{path.name} has unreadable metadata: {e}") from None
    try:
        return Direction(vectors=tensors["vectors"], space=meta.get("space", ""), method=meta.get("method", ""),
                         model_id=meta.get("model_id", ""), num_ws=num_ws,
                         layers=tuple(layers) if layers is not None else None, scales=tensors.get("scales"),
                         mean=tensors.get("mean"), pooled=tensors.get("pooled"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path.name}: {e}; save the direction again with Retrace.") from None


def _pick_tensor(items: dict[Any, Any], path: Path) -> Any:
    """The direction inside a ``.pt`` dict: key 'direction' or 'boundary', else its only tensor."""
    for key in _BOUNDARY_KEYS:
        if key in items:
            return items[key]
    tensors = [k for k, v in items.items() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        raise ValueError(f"{path.name} holds {len(tensors)} tensors and none is named {' or '.join(_BOUNDARY_KEYS)}; "
                         f"cannot tell which is the direction (keys: {sorted(map(str, items))[:20]})")
    return items[tensors[0]]


def read_boundary_file(path: str | Path) -> torch.Tensor:
    """A user's direction file as float32 ``[K, w_dim]`` (``[K, num_ws, w_dim]`` when 3-D): ``.npy``
    (``allow_pickle=False``), ``.safetensors`` (key 'direction' or 'boundary', a Retrace direction's 'vectors',
    else the first tensor) or ``.pt``/``.pth`` (``torch.load(weights_only=True)``: a tensor or a dict of them,
    e.g. InterFaceGAN / PTI boundaries ``[1, 512]``). Nothing is ever unpickled beyond plain tensors."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in BOUNDARY_SUFFIXES:
        raise ValueError(f"{path.name}: direction files must be one of {BOUNDARY_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(str(path), allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path.name} is not a plain numeric array (object arrays need unpickling, which "
                             f"Retrace never does): {e}") from None
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{path.name} is not a single .npy array")
        if array.dtype.hasobject or array.dtype.kind not in "fiu":
            raise ValueError(f"{path.name} holds {array.dtype} values; a direction must be real numbers")
        data: Any = torch.from_numpy(array.astype(np.float32, copy=True))
    elif suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                if meta.get("retrace.format") == DIRECTION_FORMAT and "vectors" in keys:
                    data = f.get_tensor("vectors")
                else:
                    key = next((k for k in _BOUNDARY_KEYS if k in keys), keys[0] if keys else None)
                    if key is None:
                        raise ValueError(f"{path.name} holds no tensor")
                    data = f.get_tensor(key)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error type for a broken header
            raise ValueError(f"{path.name} is not a readable .safetensors file: {e}") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything but tensors; others for a broken file
            raise ValueError(f"{path.name} is not a plain tensor file (loaded with weights_only=True, which refuses "
                             f"anything but tensors and containers): {str(e)[:300]}") from None
        if isinstance(obj, dict):
            obj = _pick_tensor(obj, path)
        elif isinstance(obj, (list, tuple)) and len(obj) == 1:
            obj = obj[0]
        data = obj
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path.name} does not hold a tensor (found {type(data).__name__})")
    if not (data.is_floating_point() or data.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                        torch.uint8)):
        raise ValueError(f"{path.name} holds {data.dtype} values; a direction must be real numbers")
    if data.numel() == 0:
        raise ValueError(f"{path.name} holds an empty array {_shape(data)}")
    data = data.detach().to("cpu", torch.float32)
    if data.ndim == 1:
        data = data[None]
    if data.ndim not in (2, 3):
        raise ValueError(f"{path.name} holds an array of shape {_shape(data)}; expected [w_dim], [K, w_dim] or "
                         f"[K, num_ws, w_dim]")
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"{path.name} ({_shape(data)}) contains NaN or infinite values")
    return data.contiguous()
