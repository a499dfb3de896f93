"""Editing quality on the trained toy world (models/toy_world/): does an edit take, does the rest stay put.

Each pipeline runs a fixed set of single-word edits (models/toy_world.py's ``edit_set``: colour, shape and
background swaps with their exact targets and masks) through Retrace's own node functions, in-process on the host,
at 50 steps and guidance 7.5 with the nodes' defaults (P2P replace, cross 0.8, self replace 0.4). Per pipeline:

- ``accuracy``: the fraction of edits whose changed attribute reads back as the target word (``read_attributes``
  on the decoded result);
- ``kept``: the fraction of edits whose every other attribute (the other object's and the edited object's other
  attribute, and the background for an object edit) still reads back as the source's: an edit that took by
  redrawing the picture is not a good edit;
- ``bg_psnr_db``: latent-space PSNR (peak 8) against the source latent, over the latent cells that hold no
  pixel of the edit's mask (what must not move); edits whose every cell meets the mask (a background swap may)
  have no such cells and are left out of this mean;
- ``bg_pixel_psnr_db``: the same in pixels (peak 1) over the pixels outside the edit's mask, the decoded edit
  against the source picture (PIE-Bench's background PSNR);
- ``target_psnr_db``: latent-space PSNR against the encoded ground-truth target scene;
- ``recon_psnr_db``: the source pass (source prompt, editing guidance) against the source latent;

Latent PSNR is taken in the model's latent space (the host's ``process_latent_in``: SD1.5's LATENT times 0.18215,
standard deviation about 1), where peak 8 spans the values; a LATENT as nodes pass it is 5.5 times larger. Each
edit's PSNR is capped at ``PSNR_CAP`` dB, so that an exact result (direct inversion's reconstruction) does not
outweigh the others in a mean.
- ``cost_ratio``: seconds per edit over DDIM + P2P's, measured in the same run; the flux toy's rows also give
  ``flow_cost_ratio``, over Euler RF inversion + P2P's (the flow model's DDIM + P2P).

The ``rf_`` rows run the flux toy (a rectified-flow DiT in the host's Flux class, 16-channel latents at 4x, so
16 x 16 latent cells and 8 x 8 image tokens) on the same edits, with the host's ``simple`` schedule; their latent
PSNR is in that model's space (the host's Flux latent format, standard deviation about 1 as well).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

log = logging.getLogger("retrace.bench.quality")
STEPS = 50
GUIDANCE = 7.5
SCHEDULER = {"sd15": "normal", "flux": "simple"}  # the host's default for each kind of model
PEAK = 8.0
PSNR_CAP = 60.0
# Attention Inject's defaults, but no blend: the plain rows are without it, the _blend rows set it.
INJECT_DEFAULTS = {"mode": "replace", "cross_steps": 0.8, "self_attention": "replace", "self_steps": 0.4,
                   "mutual_start_step": 4, "mutual_start_layer": 10, "reweight_words": "", "reweight_factor": 1.0,
                   "blend_words": "", "blend_threshold": 0.3, "blend_start": 0.2}
NULL_TEXT_RECIPES = {"nti": {}, "nti_paper": {"solver": "adam", "start": "negative"}}


@dataclass
class Edited:
    source: torch.Tensor  # the source pass (reconstruction), LATENT space
    edit: torch.Tensor  # the edit pass, LATENT space


def capped_psnr(a: torch.Tensor, b: torch.Tensor, peak: float, mask: torch.Tensor | None = None) -> float:
    from retrace.models import toy_world as tw

    return min(tw.psnr(a, b, peak, mask), PSNR_CAP)


def latent_mask(pixel_mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """``[h, w]`` bool: the latent cells whose ``factor`` x ``factor`` pixel block meets the mask."""
    h, w = pixel_mask.shape
    return pixel_mask.view(h // factor, factor, w // factor, factor).any(3).any(1)


class World:
    """A toy world family's models and the node functions a pipeline calls."""

    def __init__(self, family: str = "sd15") -> None:
        from retrace.nodes import _toy_world as toy

        self.family = family
        self.model, self.clip, self.vae = toy.load(family)
        self.empty = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(""))
        self.factor = self.vae.downscale_ratio  # pixels per latent cell

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        from retrace.nodes.vae_encode import encode_for_inversion

        return encode_for_inversion(self.vae, image[None], 0, 0.0)[0].float()

    def model_space(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.model.process_latent_in(latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.vae.decode(latent)[0].float()

    def pair(self, source: str, target: str) -> tuple[list, list, Any]:
        from retrace.nodes.attention import RetracePromptPair

        return tuple(RetracePromptPair.execute(self.clip, source, target).args)


def p2p(world: World, inversion: Any, pair: tuple, guider_for: Callable[[Any, list, list], Any],
        store_self: str = "queries and keys", **inject: Any) -> Edited:
    """Source pass through an attention store (self-attention kept as ``store_self``), edit pass through Attention
    Inject, both with ``guider_for``."""
    from retrace.nodes.attention import RetraceAttentionInject, RetraceAttentionStore
    from retrace.nodes.inversion import sample_with_guider

    source_cond, target_cond, prompt_pair = pair
    stored_model, store = RetraceAttentionStore.execute(world.model, True, store_self, "auto", "float32", 8192).args
    source = sample_with_guider(stored_model, inversion, guider_for(stored_model, source_cond, source_cond))
    edit_model = RetraceAttentionInject.execute(world.model, prompt_pair, store=store, source_result=source,
                                                **{**INJECT_DEFAULTS, **inject}).args[0]
    edit = sample_with_guider(edit_model, inversion, guider_for(edit_model, target_cond, source_cond))
    return Edited(source["samples"], edit["samples"])


def inverted(world: World, latent: torch.Tensor, pair: tuple) -> Any:
    """DDIM inversion of ``latent`` with the source prompt at guidance 1 (every pipeline's start)."""
    from retrace.nodes.inversion import invert

    return invert(world.model, {"samples": latent}, pair[0], None, STEPS, 1.0, SCHEDULER[world.family])[1]


def rf_inversion(world: World, latent: torch.Tensor, pair: tuple, **_inject: Any) -> Edited:
    """RF-Inversion (Rout et al. 2025) at its published settings: the controlled forward ODE (gamma 0.5), then the
    controlled reverse ODE with the target prompt (eta 0.9 over the first quarter of the steps), no attention
    control; the source pass samples the inversion back with the source prompt."""
    from retrace.nodes.inversion import invert, sample_inversion
    from retrace.nodes.samplers import RetraceRFInversionEditSampler, RetraceRFInversionSampler

    source_cond, target_cond, _prompt_pair = pair
    controlled = RetraceRFInversionSampler.execute(0.5, 0, "euler").args[0]
    inversion = invert(world.model, {"samples": latent}, source_cond, None, STEPS, 1.0, SCHEDULER[world.family],
                       controlled)[1]
    pull = RetraceRFInversionEditSampler.execute(0.9, 0, STEPS // 4, "constant", "euler").args[0]
    source = sample_inversion(world.model, inversion, source_cond, world.empty, GUIDANCE, pull)
    edit = sample_inversion(world.model, inversion, target_cond, world.empty, GUIDANCE, pull)
    return Edited(source["samples"], edit["samples"])


def ddim(world: World, latent: torch.Tensor, pair: tuple, **inject: Any) -> Edited:
    from retrace.nodes._host import make_guider

    inversion = inverted(world, latent, pair)
    return p2p(world, inversion, pair, lambda m, pos, _src: make_guider(m, pos, world.empty, GUIDANCE), **inject)


def negative_prompt(world: World, latent: torch.Tensor, pair: tuple, **inject: Any) -> Edited:
    from retrace.nodes._host import make_guider

    inversion = inverted(world, latent, pair)
    return p2p(world, inversion, pair, lambda m, pos, src: make_guider(m, pos, src, GUIDANCE), **inject)


def direct(world: World, latent: torch.Tensor, pair: tuple, **inject: Any) -> Edited:
    from retrace.nodes.inversion_guiders import DirectInversionGuider

    inversion = inverted(world, latent, pair)
    return p2p(world, inversion, pair,
               lambda m, pos, src: DirectInversionGuider(m, inversion, pos, src, world.empty, GUIDANCE), **inject)


def null_text(recipe: dict) -> Callable[..., Edited]:
    """Null-text inversion with ``recipe`` (NullTextSettings' fields), then P2P through the Null-Text Guider."""
    def run(world: World, latent: torch.Tensor, pair: tuple, **inject: Any) -> Edited:
        from retrace.inversion.null_text import NullTextSettings
        from retrace.nodes.null_text import NullTextGuider, optimize_null_text

        inversion = inverted(world, latent, pair)
        null, _ = optimize_null_text(world.model, inversion, pair[0], world.empty, GUIDANCE, NullTextSettings(**recipe))
        return p2p(world, inversion, pair, lambda m, pos, _src: NullTextGuider(m, null, pos), **inject)
    return run


NEW_WORD = object()  # in with_inject's settings: the edit's new word


def with_inject(pipeline: Callable[..., Edited], **settings: Any) -> Callable[..., Edited]:
    """``pipeline`` with these Attention Inject settings (and ``store_self`` for the store) over the defaults."""
    def run(world: World, latent: torch.Tensor, pair: tuple, old: str, new: str) -> Edited:
        return pipeline(world, latent, pair, **{k: new if v is NEW_WORD else v for k, v in settings.items()})
    return run


def plain(pipeline: Callable[..., Edited]) -> Callable[..., Edited]:
    return with_inject(pipeline)


def with_blend(pipeline: Callable[..., Edited]) -> Callable[..., Edited]:
    return with_inject(pipeline, blend_words="auto")


# MasaCtrl (Cao et al. 2023) as published: mutual self-attention from step 4 and layer 10, no cross-attention maps.
MASACTRL = {"mode": "none", "self_attention": "mutual", "store_self": "keys and values"}


DESCRIPTIONS = {
    "quality_best_accuracy": "toy world, the recommended pipeline (BEST: direct inversion + P2P + local blend auto): "
                             "edits whose attribute reads back as the target word (goal >= 0.95)",
    "quality_best_kept": "its edits whose other attributes all read back unchanged",
    "quality_best_bg_psnr_db": "its background PSNR outside the edit's mask, latent space, peak 8 (goal >= 25)",
    "quality_best_cost_ratio": "its seconds per edit / DDIM + P2P's, side by side (goal <= 1.5)",
    "quality_blend_gain_db": "background PSNR with the blend minus without, colour and shape swaps (goal >= 6)",
}
# The pipeline the project recommends (the demo's and the help pages'): its numbers are the quality_best_* keys,
# and its gain over the same pipeline without the blend on colour and shape edits is quality_blend_gain_db.
BEST = "direct_p2p_blend"
PIPELINES: dict[str, Callable[..., Edited]] = {
    "ddim_p2p": plain(ddim), "ddim_p2p_blend": with_blend(ddim),
    "npi_p2p": plain(negative_prompt), "npi_p2p_blend": with_blend(negative_prompt),
    "direct_p2p": plain(direct), "direct_p2p_blend": with_blend(direct),
    **{f"{name}_p2p": plain(null_text(recipe)) for name, recipe in NULL_TEXT_RECIPES.items()},
    **{f"{name}_p2p_blend": with_blend(null_text(recipe)) for name, recipe in NULL_TEXT_RECIPES.items()},
    # The other attention controls on the best pipeline: P2P refine (the pair aligned as added and removed words),
    # reweight (the new word's attention doubled), and MasaCtrl (on DDIM inversion, as published, and direct).
    "direct_refine_blend": with_inject(direct, mode="refine", blend_words="auto"),
    "direct_reweight_blend": with_inject(direct, reweight_words=NEW_WORD, reweight_factor=2.0, blend_words="auto"),
    "ddim_masactrl": with_inject(ddim, **MASACTRL),
    "direct_masactrl": with_inject(direct, **MASACTRL),
    # The flux toy (a rectified-flow DiT in the host's Flux class): Euler RF inversion (the flow analogue of DDIM
    # inversion) with P2P on joint attention, with and without the blend, direct inversion, and RF-Inversion.
    "rf_p2p": plain(ddim), "rf_p2p_blend": with_blend(ddim), "rf_direct_p2p_blend": with_blend(direct),
    "rf_inversion": plain(rf_inversion),
}
FLOW_PIPELINES = ("rf_p2p", "rf_p2p_blend", "rf_direct_p2p_blend", "rf_inversion")


def family_of(pipeline: str) -> str:
    return "flux" if pipeline in FLOW_PIPELINES else "sd15"


def edited_attribute(edit: Any) -> str:
    return "background" if edit.kind == "background" else f"{edit.kind}{edit.thing}"


@dataclass
class Scores:
    """One pipeline's per-edit scores, in the edit set's order."""

    took: list[bool] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)
    bg: list[float | None] = field(default_factory=list)  # None: the edit leaves no latent cell to keep
    bg_pixels: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    recon: list[float] = field(default_factory=list)
    seconds: float = 0.0


def mean(values: list) -> float:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")


def measure(count: int, pipelines: list[str] | None = None) -> dict[str, float]:
    """Run every pipeline on ``count`` edits; the bench keys of bench/run.py.

    Edits are the outer loop and pipelines the inner one, so every pipeline's seconds are measured side by side
    with DDIM + P2P's under the same machine load."""
    from retrace.models import toy_world as tw

    names = pipelines or list(PIPELINES)
    worlds = {family: World(family) for family in sorted({family_of(n) for n in names})}
    scores = {name: Scores() for name in names}
    edits = tw.edit_set(count, seed=0)
    for e in edits:
        pixels = tw.edit_mask(e)
        keep_pixels = ~pixels
        inputs = {}
        for family, world in worlds.items():
            source_latent = world.encode(tw.render(e.source))
            inputs[family] = (source_latent, world.encode(tw.render(e.target)), ~latent_mask(pixels, world.factor),
                              world.pair(e.source.prompt, e.target.prompt), world.model_space(source_latent))
        for name in names:
            world = worlds[family_of(name)]
            source_latent, target_latent, keep, pair, source = inputs[world.family]
            started = time.perf_counter()
            with torch.inference_mode():
                out = PIPELINES[name](world, source_latent, pair, e.old_word, e.new_word)
            score = scores[name]
            score.seconds += time.perf_counter() - started
            picture = world.decode(out.edit)
            read, wanted, changed = tw.read_attributes(picture), tw.attributes_of(e.target), edited_attribute(e)
            score.took.append(read[changed] == e.new_word)
            score.kept.append(all(read[k] == v for k, v in wanted.items() if k != changed))
            edit = world.model_space(out.edit)
            score.bg.append(capped_psnr(edit, source, PEAK, keep[None, None]) if keep.any() else None)
            score.bg_pixels.append(capped_psnr(picture, tw.render(e.source), 1.0, keep_pixels[..., None]))
            score.target.append(capped_psnr(edit, world.model_space(target_latent), PEAK))
            score.recon.append(capped_psnr(world.model_space(out.source), source, PEAK))
            log.debug("%s, %s %s -> %s: %s, background %s dB", name, e.kind, e.old_word, e.new_word,
                      "took" if score.took[-1] else "did not take",
                      "-" if score.bg[-1] is None else f"{score.bg[-1]:.1f}")
    metrics: dict[str, float] = {}
    for name, score in scores.items():
        metrics.update({f"quality_{name}_accuracy": mean(score.took), f"quality_{name}_kept": mean(score.kept),
                        f"quality_{name}_bg_psnr_db": mean(score.bg),
                        f"quality_{name}_bg_pixel_psnr_db": mean(score.bg_pixels),
                        f"quality_{name}_target_psnr_db": mean(score.target),
                        f"quality_{name}_recon_psnr_db": mean(score.recon)})
        if "ddim_p2p" in scores:
            metrics[f"quality_{name}_cost_ratio"] = score.seconds / scores["ddim_p2p"].seconds
        if "rf_p2p" in scores and name in FLOW_PIPELINES:
            metrics[f"quality_{name}_flow_cost_ratio"] = score.seconds / scores["rf_p2p"].seconds
        log.info("%s: took %d/%d, kept the rest %d/%d, background %.1f dB (pixels %.1f dB), target %.1f dB, "
                 "reconstruction %.1f dB, %.2f s/edit", name, sum(score.took), len(edits), sum(score.kept), len(edits),
                 metrics[f"quality_{name}_bg_psnr_db"],
                 metrics[f"quality_{name}_bg_pixel_psnr_db"], metrics[f"quality_{name}_target_psnr_db"],
                 metrics[f"quality_{name}_recon_psnr_db"], score.seconds / len(edits))
    if BEST in scores:
        for key in ("accuracy", "kept", "bg_psnr_db", "cost_ratio"):
            if f"quality_{BEST}_{key}" in metrics:
                metrics[f"quality_best_{key}"] = metrics[f"quality_{BEST}_{key}"]
        for kind in tw.EDIT_KINDS:
            of_kind = [b for b, e in zip(scores[BEST].bg, edits) if e.kind == kind]
            metrics[f"quality_best_bg_psnr_db_{kind}"] = mean(of_kind)
            metrics[f"quality_best_accuracy_{kind}"] = mean([t for t, e in zip(scores[BEST].took, edits)
                                                             if e.kind == kind])
    plain_name = BEST.removesuffix("_blend")
    if BEST in scores and plain_name in scores:
        local = [i for i, e in enumerate(edits) if e.kind != "background"]
        gains = [scores[BEST].bg[i] - scores[plain_name].bg[i] for i in local
                 if scores[BEST].bg[i] is not None and scores[plain_name].bg[i] is not None]
        metrics["quality_blend_gain_db"] = mean(gains)
        metrics["quality_blend_accuracy_change"] = (mean([scores[BEST].took[i] for i in local])
                                                    - mean([scores[plain_name].took[i] for i in local]))
    return metrics
