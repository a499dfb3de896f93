"""Attention injection for editing real images: Prompt-to-Prompt (Hertz et al. 2023) and MasaCtrl's mutual
self-attention (Cao et al. 2023), for UNet cross/self attention and DiT joint attention.

The edit pass recomputes the source pass's attention maps from stored queries and keys (``softmax(Q K^T /
sqrt(d))``, P2P section 3.1) and uses them with its own values:

- cross-attention, P2P eq. (3) ``Edit(M_t, M*_t, t)``: word swap maps target tokens onto source tokens with
  a mapper matrix, refinement takes the source map where a target token is aligned (``alpha`` 1) and keeps
  its own where it is new (``alpha`` 0), reweighting scales chosen tokens' maps; for the first
  ``cross_steps`` of the steps;
- self-attention, P2P's self replace: the source's self-attention maps for the first ``self_steps``;
- MasaCtrl: the target's queries attend to the source's keys and values from a start step and layer on;
- local blend (P2P section 3.2): a mask from chosen words' cross-attention, thresholded (0.3) and smoothed;
  outside it the denoised estimate is the source pass's, so the latent follows the source pass.

DiT models (Flux, SD3) attend over text and image tokens at once. There the image rows' text columns play
the part of cross-attention and their image columns the part of self-attention; text rows are left alone.

All tensors are ``[batch, heads, tokens, dim_head]``. No ComfyUI import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

SELF_INJECT_MODES = ("replace", "mutual", "off")


@dataclass(frozen=True)
class TokenEdit:
    """How the target prompt's tokens take the source's cross-attention maps.

    ``mapper`` ``[target, source]`` (None: no source maps), ``alpha`` ``[target]`` (1 take the mapped source
    map, 0 keep the target's own; None: all 1), ``weights`` ``[target]`` reweighting factors (None: all 1).
    """

    mapper: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    @property
    def maps_in_place(self) -> bool:
        """Whether the mapper is the identity (a word swap of words with as many tokens)."""
        mapper = self.mapper
        return (mapper is not None and mapper.shape[0] == mapper.shape[1]
                and bool(torch.equal(mapper, torch.eye(mapper.shape[0], dtype=mapper.dtype))))


@dataclass(frozen=True)
class InjectSettings:
    """P2P's and MasaCtrl's knobs, with their papers' defaults."""

    edit: TokenEdit = TokenEdit()
    cross_steps: float = 0.8
    self_mode: str = "replace"
    self_steps: float = 0.4
    mutual_start_step: int = 4
    mutual_start_layer: int = 10
    blend_target: tuple[int, ...] = ()
    blend_source: tuple[int, ...] = ()
    blend_threshold: float = 0.3
    blend_start: float = 0.2

    def __post_init__(self) -> None:
        if self.self_mode not in SELF_INJECT_MODES:
            raise ValueError(f"self_mode must be one of {SELF_INJECT_MODES}; got {self.self_mode!r}.")

    @property
    def blends(self) -> bool:
        return bool(self.blend_target or self.blend_source)

    def cross_active(self, step: int, steps: int) -> bool:
        return step < int(self.cross_steps * steps)

    def self_replace_active(self, step: int, steps: int) -> bool:
        return self.self_mode == "replace" and step < int(self.self_steps * steps)

    def mutual_active(self, step: int, self_layer: int) -> bool:
        return self.self_mode == "mutual" and step >= self.mutual_start_step and self_layer >= self.mutual_start_layer

    def blend_active(self, step: int, steps: int) -> bool:
        return self.blends and step >= int(self.blend_start * steps)


def probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention maps ``softmax(q k^T / sqrt(d))``, softmax in float32."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return logits.to(torch.promote_types(q.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


# The attention kernel: the host's own in the nodes, so what is not edited is computed exactly as the source
# pass computed it.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_token(values: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor:
    return values if factors is None else values * factors.to(values).view(-1, 1)


def text_values(values: torch.Tensor, edit: TokenEdit) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """P2P's edit of the text columns as two value sets, since ``(M ⊙ f) V = M (f ⊙ V)`` for a per-column
    ``f``: one for the source's maps (``mapper^T (alpha w ⊙ V)``, over source tokens) and one for the target's
    own maps (``(1 - alpha) w ⊙ V``). Either is None where its maps take no part. The edited maps are never
    formed, so the fused attention kernel does the work."""
    weighted = _per_token(values, edit.weights)
    if edit.mapper is None:
        return None, weighted
    taken = _per_token(weighted, edit.alpha)
    if not edit.maps_in_place:
        taken = torch.matmul(edit.mapper.t().to(values), taken)
    own = None if edit.alpha is None else _per_token(weighted, 1 - edit.alpha)
    return taken, own


# One attention call ``attend(q, k, v)``; an edited attention is a sum of such calls (its terms).
Term = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def cross_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: dict[str, torch.Tensor] | None,
                edit: TokenEdit) -> list[Term]:
    """P2P's edited cross-attention (replace, refine, reweight), P2P eq. (3)-(5) in value form, as terms."""
    from_source, own = text_values(v, edit)
    if from_source is None:
        return [(q, k, own)]
    terms = [(source["q"], source["k"], from_source)]
    return terms if own is None else [*terms, (q, k, own)]


def self_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: dict[str, torch.Tensor] | None,
               mode: str) -> list[Term]:
    """P2P's self replace (the source's maps with the target's values) or MasaCtrl's mutual self-attention
    (the target's queries over the source's keys and values), as terms."""
    if mode == "replace":
        return [(source["q"], source["k"], v)]
    if mode == "mutual":
        return [(q, source["k"], source["v"])]
    return [(q, k, v)]


def _joined(text: torch.Tensor | None, image: torch.Tensor | None, text_tokens: int,
            like: torch.Tensor) -> torch.Tensor | None:
    if text is None and image is None:
        return None
    if text is None:
        text = like.new_zeros((*like.shape[:2], text_tokens, like.shape[-1]))
    if image is None:
        image = like.new_zeros((*like.shape[:2], like.shape[2], like.shape[-1]))
    return torch.cat((text, image), dim=2)


def joint_image_terms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int,
                      source: dict[str, torch.Tensor] | None, edit: TokenEdit | None, self_mode: str) -> list[Term]:
    """The image rows' terms of joint (DiT) attention: their text columns as cross-attention under ``edit``
    (None: unedited), their image columns as self-attention under ``self_mode`` (source maps, MasaCtrl's source
    keys and values, or their own). The text rows are ``(q[:, :, :text], k, v)``, left alone."""
    q_image, v_text, v_image = q[:, :, text:], v[:, :, :text], v[:, :, text:]
    text_source, text_own = (None, v_text) if edit is None else text_values(v_text, edit)
    own_keys = k
    image_source, image_own = None, v_image
    source_text = 0 if source is None else source["k"].shape[2] - v_image.shape[2]
    if self_mode == "replace":
        image_source, image_own = v_image, None
    elif self_mode == "mutual":
        own_keys = torch.cat((k[:, :, :text], source["k"][:, :, source_text:]), dim=2)
        image_own = source["v"][:, :, source_text:]
    terms = []
    if text_source is not None or image_source is not None:
        terms.append((source["q"], source["k"], _joined(text_source, image_source, source_text, v_image)))
    own = _joined(text_own, image_own, text, v_image)
    if own is not None:
        terms.append((q_image, own_keys, own))
    return terms


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def one_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, text: int,
             source: dict[str, torch.Tensor] | None, edit: TokenEdit | None, self_mode: str) -> Term | None:
    """The edited attention of a ``kind`` layer ("cross", "self", "joint") as one attention call with the
    inputs' shapes, where it is one; None where it takes several.

    It is one for P2P's replace with the maps in place, self replace, MasaCtrl and reweighting alone (and, in
    joint attention, where the image rows' keys and values are the text rows' own). Making that one call the way
    the unedited layer makes it means an edit that changes nothing (the source prompt injected, every weight 1)
    reproduces the source pass bit for bit, whichever kernel computes it and however it blocks the batch."""
    if kind == "self":
        terms = self_terms(q, k, v, source, self_mode)
    elif kind == "cross":
        terms = cross_terms(q, k, v, source, edit or TokenEdit())
    else:
        image = joint_image_terms(q, k, v, text, source, edit, self_mode)
        if len(image) != 1 or not (_same(image[0][1], k) and _same(image[0][2], v)):
            return None
        terms = [(torch.cat((q[:, :, :text], image[0][0]), dim=2), k, v)]
    if len(terms) != 1 or any(t.shape != o.shape for t, o in zip(terms[0], (q, k, v))):
        return None
    return terms[0]


def _attend_sum(terms: list[Term], attend: Attend) -> torch.Tensor:
    out = attend(*terms[0])
    for term in terms[1:]:
        out = out + attend(*term)
    return out


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: dict[str, torch.Tensor] | None,
                    edit: TokenEdit, attend: Attend = sdpa) -> torch.Tensor:
    """P2P's edited cross-attention (replace, refine, reweight), P2P eq. (3)-(5) in value form."""
    return _attend_sum(cross_terms(q, k, v, source, edit), attend)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: dict[str, torch.Tensor],
                   mode: str, attend: Attend = sdpa) -> torch.Tensor:
    """P2P's self replace or MasaCtrl's mutual self-attention (:func:`self_terms`)."""
    return _attend_sum(self_terms(q, k, v, source, mode), attend)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: int,
                    source: dict[str, torch.Tensor] | None, edit: TokenEdit | None, self_mode: str,
                    attend: Attend = sdpa) -> torch.Tensor:
    """Joint (DiT) attention with the image rows edited (:func:`joint_image_terms`); text rows left alone."""
    out_text = attend(q[:, :, :text], k, v)
    return torch.cat((out_text, _attend_sum(joint_image_terms(q, k, v, text, source, edit, self_mode), attend)),
                     dim=2)


def text_maps(q_image: torch.Tensor, k: torch.Tensor, text: int) -> torch.Tensor:
    """Image queries' maps over the first ``text`` keys (the prompt's tokens)."""
    return probabilities(q_image, k)[..., :text]


def word_maps(maps: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """``[batch, queries]``: chosen tokens' maps, averaged over heads and summed over the tokens."""
    return maps[..., list(positions)].float().mean(dim=1).sum(dim=-1)


def to_latent_grid(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``[batch, queries]`` laid out on ``grid`` and resized to ``size``: ``[batch, 1, *size]``."""
    rows, cols = grid
    image = maps[:, : rows * cols].reshape(maps.shape[0], 1, rows, cols)
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False) if (rows, cols) != size else image


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum (maps of zero stay zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
    return maps / peak.view(-1, *([1] * (maps.ndim - 1)))


def blend_mask(source_maps: torch.Tensor | None, target_maps: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """P2P's local-blend mask: each word map smoothed by a 3x3 max-pool, normalised, thresholded; the union of
    the source words' and the target words' masks. Maps are ``[batch, 1, h, w]``.

    Normalised from its minimum to its peak, not from zero: a real checkpoint's word map is near zero away from
    the object (the start token takes that attention), so this is P2P's peak normalisation there; a map with a
    floor (a small model's words attend everywhere a little) would otherwise pass the threshold everywhere."""
    smoothed = [F.max_pool2d(m, 3, stride=1, padding=1) for m in (source_maps, target_maps) if m is not None]
    masks = [(normalise(m - m.amin(dim=(-2, -1), keepdim=True)) > threshold).float() for m in smoothed]
    return torch.stack(masks).amax(dim=0)


def local_blend(denoised: torch.Tensor, source_denoised: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The edit inside ``mask``, the source pass's denoised estimate outside it (exactly, where it is 0)."""
    return source_denoised + mask.to(denoised) * (denoised - source_denoised)


def stored_word_maps(entries: dict[tuple[int, int], dict[str, torch.Tensor]], specs: list, words: list[tuple[int, ...]],
                     size: tuple[int, int], layers: set[int] | None = None,
                     steps: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-word heatmaps ``[images, words, *size]`` from stored cross (or joint) attention, averaged over the
    chosen layers and steps (P2P's aggregate attention) and normalised to a peak of 1."""
    total, count = None, 0
    for (step, layer), entry in sorted(entries.items()):
        spec = specs[layer]
        if spec.kind == "self" or "q" not in entry or (layers is not None and layer not in layers):
            continue
        if steps is not None and not steps[0] <= step < steps[1]:
            continue
        maps = probabilities(entry["q"].float(), entry["k"].float())[..., : spec.text]  # stored q: image rows
        grids = torch.cat([to_latent_grid(word_maps(maps, positions), spec.grid, size) for positions in words], dim=1)
        total = grids if total is None else total + grids
        count += 1
    if total is None:
        raise ValueError("the store holds no cross-attention for the chosen layers and steps; store cross-attention "
                         "and choose layers and steps it covers.")
    mean = total / count
    return normalise(mean.flatten(0, 1).unsqueeze(1)).view_as(mean)
