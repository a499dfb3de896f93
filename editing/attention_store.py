"""An attention store for Prompt-to-Prompt (Hertz et al. 2023, "Prompt-to-Prompt Image Editing with Cross
Attention Control") and MasaCtrl (Cao et al. 2023): what one sampling run's attention layers saw, per step.

Prompt-to-Prompt keeps whole attention maps (``queries x keys`` per head, 4096 x 4096 for one SD1.5
self-attention layer at 512 px). Storing the projected queries and keys instead is ``(queries + keys) x
channels``: the maps are recomputed, exactly, when an edit pass needs them. Entries are kept on the CPU in
the store's dtype (float16 by default), for the conditional half of the batch only (the half the edit
changes), and the whole run's size is checked against a byte budget before the first network call.

Layers are numbered in the order a forward pass calls attention. Sigma is the one time variable: a step is
the index of its sigma in the run's schedule.

No ComfyUI import here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..inversion.schedules import step_index

SELF_MODES = ("qk", "kv", "off")
KINDS = ("self", "cross", "joint")


class AttentionBudgetError(ValueError):
    """A run would store more than the store's byte budget."""


@dataclass(frozen=True)
class LayerSpec:
    """One attention call of a forward pass.

    ``kind`` is "self" (image tokens attend to image tokens), "cross" (image queries, text keys) or "joint"
    (DiT: text and image tokens share one attention; keys are ``text`` text tokens then the image tokens).
    ``queries`` counts image tokens, laid out on ``grid`` (rows, columns).
    """

    kind: str
    heads: int
    dim_head: int
    queries: int
    keys: int
    text: int
    grid: tuple[int, int]

    @property
    def channels(self) -> int:
        return self.heads * self.dim_head


@dataclass(frozen=True)
class StoreSettings:
    """What a store keeps: cross-attention (queries and the prompt's keys), self-attention as queries and keys
    (P2P's self replace) or keys and values (MasaCtrl's mutual self-attention), which layers ("auto":
    :func:`default_layers`; see :func:`parse_layers`), the dtype entries are kept in, and the byte budget of a
    whole run."""

    cross: bool = True
    self_mode: str = "qk"
    layers: str = "auto"
    dtype: torch.dtype = torch.float16
    budget_bytes: int = 8 << 30

    def __post_init__(self) -> None:
        if self.self_mode not in SELF_MODES:
            raise ValueError(f"self_mode must be one of {SELF_MODES}; got {self.self_mode!r}.")
        parse_layers(self.layers)
        if not self.cross and self.self_mode == "off":
            raise ValueError("the store would keep nothing: enable cross-attention or a self-attention mode.")


def default_layers(specs: Sequence[LayerSpec]) -> set[int]:
    """P2P's choice: every cross (and joint) layer; self-attention only below the finest resolution (P2P keeps
    self maps of at most 32x32 tokens at 512 px, i.e. it skips SD1.5's 64x64 level)."""
    finest = max((s.queries for s in specs if s.kind == "self"), default=0)
    return {i for i, s in enumerate(specs) if s.kind != "self" or s.queries < finest}


def parse_layers(text: str, count: int | None = None) -> frozenset[int] | None:
    """Layer indices from "auto" (None), "all", or a list like "0-5, 9, 12-15"; checked against ``count`` (the
    model's number of attention layers) where given."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    if text == "all":
        return frozenset(range(count or 0))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            low, _, high = part.partition("-")
            first, last = int(low), int(high) if high else int(low)
        except ValueError:
            raise ValueError(f"layers: cannot read {part!r} in {text!r}; write 'auto', 'all' or indices and ranges "
                             f"such as '0-5, 9'.") from None
        chosen.update(range(first, last + 1))
    if not chosen or min(chosen) < 0 or (count is not None and max(chosen) >= count):
        raise ValueError(f"layers {text!r} is outside this model's {count} attention layers (0 to {count - 1}).")
    return frozenset(chosen)


def stored_names(spec: LayerSpec, settings: StoreSettings) -> tuple[str, ...]:
    """The tensors kept for a layer: "q" (image queries), "k" and "v" (all keys/values of the layer)."""
    names: set[str] = set()
    if spec.kind in ("cross", "joint") and settings.cross:
        names |= {"q", "k"}
    if spec.kind in ("self", "joint"):
        if settings.self_mode == "qk":
            names |= {"q", "k"}
        elif settings.self_mode == "kv":
            names |= {"k", "v"}
    return tuple(sorted(names))


def entry_numel(spec: LayerSpec, names: Iterable[str]) -> int:
    """Elements one image's entry of a layer holds."""
    return sum((spec.queries if n == "q" else spec.keys) * spec.channels for n in names)


def plan_layers(specs: Sequence[LayerSpec], settings: StoreSettings) -> dict[int, tuple[str, ...]]:
    """Layer index -> stored tensor names, for the chosen layers that keep anything."""
    chosen = parse_layers(settings.layers, len(specs))
    chosen = default_layers(specs) if chosen is None else chosen
    plan = {i: stored_names(specs[i], settings) for i in sorted(chosen)}
    return {i: names for i, names in plan.items() if names}


def bytes_per_step(specs: Sequence[LayerSpec], settings: StoreSettings, images: int = 1) -> int:
    """Bytes one sampling step adds to a store (attention entries only)."""
    itemsize = torch.empty((), dtype=settings.dtype).element_size()
    numel = sum(entry_numel(specs[i], names) for i, names in plan_layers(specs, settings).items())
    return numel * itemsize * images


def same_origin(a: tuple, b: tuple) -> bool:
    """Whether two tuples hold the very same objects (numbers: equal values) in the same order."""
    return len(a) == len(b) and all(x == y if isinstance(x, (int, float)) else x is y for x, y in zip(a, b))


@dataclass
class AttentionStore:
    """What one sampling run's chosen attention layers saw, per step, for the conditional images.

    A store is a shared handle on purpose: the host deep-copies model options whenever a model is cloned, and a
    copy would be filled instead of the store the edit pass reads. :meth:`begin` resets it at the start of
    each run that fills it (the host caches node outputs, so the node that made it does not run again).
    """

    settings: StoreSettings = field(default_factory=StoreSettings)
    identity: dict = field(default_factory=dict)
    latent_shape: tuple[int, ...] | None = None
    sigmas: torch.Tensor | None = None
    specs: list[LayerSpec] | None = None
    layers: dict[int, tuple[str, ...]] = field(default_factory=dict)
    entries: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    denoised: dict[int, torch.Tensor] = field(default_factory=dict)
    # Estimates a guider computed during the run for its edit pass to reuse: key -> (what they were computed
    # from, per step). Direct inversion's source branch is one (the edit pass would evaluate it again).
    branches: dict[str, tuple[Any, dict[int, torch.Tensor]]] = field(default_factory=dict)
    complete: bool = False
    runs: int = 0

    def __deepcopy__(self, memo: dict) -> AttentionStore:
        return self

    @property
    def steps(self) -> int:
        return 0 if self.sigmas is None else len(self.sigmas) - 1

    def begin(self, identity: dict, latent_shape: Sequence[int], sigmas: torch.Tensor) -> None:
        """Start a run: forget everything stored before."""
        self.identity = dict(identity)
        self.latent_shape = tuple(int(n) for n in latent_shape)
        self.sigmas = sigmas.detach().to("cpu", torch.float64).clone()
        self.specs, self.layers = None, {}
        self.entries, self.denoised, self.branches = {}, {}, {}
        self.complete = False
        self.runs += 1

    def plan(self, specs: Sequence[LayerSpec], images: int) -> None:
        """Fix the layers of this run and check the whole run fits the budget, before anything is stored."""
        self.specs = list(specs)
        self.layers = plan_layers(self.specs, self.settings)
        per_step = bytes_per_step(self.specs, self.settings, images)
        # Two float32 latents per step: the denoised estimate and one guider branch (put_branch).
        latents = 2 * 4 * images * math.prod(self.latent_shape[1:]) if self.latent_shape else 0
        total = (per_step + latents) * self.steps
        if total > self.settings.budget_bytes:
            raise AttentionBudgetError(
                f"Retrace Attention Store: this run would store {total / 2**20:.1f} MB ({per_step / 2**20:.2f} MB per "
                f"step x {self.steps} steps, {len(self.layers)} of {len(self.specs)} layers, {images} image(s)), over "
                f"the budget of {self.settings.budget_bytes / 2**20:.0f} MB. Raise budget_mb, store fewer layers, "
                f"turn self-attention off, or sample fewer steps or a smaller image.")

    def step_of(self, sigma: float) -> int | None:
        return None if self.sigmas is None else step_index(self.sigmas[:-1], sigma)

    def put(self, step: int, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        self.entries[(step, layer)] = {n: t.detach().to("cpu", self.settings.dtype, copy=True)
                                       for n, t in tensors.items()}

    def put_denoised(self, step: int, denoised: torch.Tensor) -> None:
        self.denoised[step] = denoised.detach().to("cpu", torch.float32, copy=True)

    def put_branch(self, key: str, made_from: tuple, step: int, estimate: torch.Tensor) -> None:
        """Keep a guider's estimate of ``step``, computed from ``made_from``: the objects (compared by identity)
        and numbers (by value) it depends on."""
        if key not in self.branches or not same_origin(self.branches[key][0], made_from):
            self.branches[key] = (made_from, {})
        self.branches[key][1][step] = estimate.detach().to("cpu", torch.float32, copy=True)

    def branch(self, key: str, made_from: tuple, step: int) -> torch.Tensor | None:
        """The estimate :meth:`put_branch` kept for ``step`` from the same ``made_from``; None otherwise."""
        kept = self.branches.get(key)
        return kept[1].get(step) if kept is not None and same_origin(kept[0], made_from) else None

    def get(self, step: int, layer: int) -> dict[str, torch.Tensor] | None:
        return self.entries.get((step, layer))

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries.values() for t in e.values())

    def finish(self) -> None:
        self.complete = self.steps > 0 and len(self.denoised) == self.steps
