"""Editing quality on the trained toy world (models/toy_world/): does an edit take, does the rest stay put.

Each pipeline runs a fixed set of single-word edits (models/toy_world.py's ``edit_set``: colour, shape and
background swaps with their exact targets and masks) through Retrace's own node functions, in-process on the host,
at 50 steps and guidance 7.5 with the nodes' defaults (P2P replace, cross 0.8, self replace 0.4). Per pipeline:

- ``accuracy``: the fraction of edits whose changed attribute reads back as the target word (``read_attributes``
  on the decoded result);
- ``bg_psnr_db``: latent-space PSNR (peak 8) against the source latent, over the latent cells that hold no
  pixel of the edit's mask (what must not move);
- ``target_psnr_db``: latent-space PSNR against the encoded ground-truth target scene;
- ``recon_psnr_db``: the source pass (source prompt, editing guidance) against the source latent;
- ``cost_ratio``: seconds per edit over DDIM + P2P's, measured in the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("retrace.bench.quality")
STEPS = 50
GUIDANCE = 7.5
PEAK = 8.0
INJECT_DEFAULTS = {"mode": "replace", "cross_steps": 0.8, "self_attention": "replace", "self_steps": 0.4,
                   "mutual_start_step": 4, "mutual_start_layer": 10, "reweight_words": "", "reweight_factor": 1.0,
                   "blend_words": "", "blend_threshold": 0.3, "blend_start": 0.2}


@dataclass
class Edited:
    source: torch.Tensor  # the source pass (reconstruction), LATENT space
    edit: torch.Tensor  # the edit pass, LATENT space


def latent_mask(pixel_mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """``[h, w]`` bool: the latent cells whose ``factor`` x ``factor`` pixel block meets the mask."""
    h, w = pixel_mask.shape
    return pixel_mask.view(h // factor, factor, w // factor, factor).any(3).any(1)


class World:
    """The toy world's models and the node functions a pipeline calls."""

    def __init__(self) -> None:
        from retrace.nodes import _toy_world as toy

        self.model, self.clip, self.vae = toy.load("sd15")
        self.empty = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(""))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        from retrace.nodes.vae_encode import encode_for_inversion

        return encode_for_inversion(self.vae, image[None], 0, 0.0)[0].float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.vae.decode(latent)[0].float()

    def pair(self, source: str, target: str) -> tuple[list, list, Any]:
        from retrace.nodes.attention import RetracePromptPair

        return tuple(RetracePromptPair.execute(self.clip, source, target).args)


def p2p(world: World, inversion: Any, pair: tuple, guider_for: Callable[[Any, list, list], Any],
        **inject: Any) -> Edited:
    """Source pass through an attention store, edit pass through Attention Inject, both with ``guider_for``."""
    from retrace.nodes.attention import RetraceAttentionInject, RetraceAttentionStore
    from retrace.nodes.inversion import sample_with_guider

    source_cond, target_cond, prompt_pair = pair
    stored_model, store = RetraceAttentionStore.execute(world.model, True, "queries and keys", "auto", "float32",
                                                        8192).args
    source = sample_with_guider(stored_model, inversion, guider_for(stored_model, source_cond, source_cond))
    edit_model = RetraceAttentionInject.execute(world.model, prompt_pair, store=store, source_result=source,
                                                **{**INJECT_DEFAULTS, **inject}).args[0]
    edit = sample_with_guider(edit_model, inversion, guider_for(edit_model, target_cond, source_cond))
    return Edited(source["samples"], edit["samples"])


def inverted(world: World, latent: torch.Tensor, pair: tuple) -> Any:
    """DDIM inversion of ``latent`` with the source prompt at guidance 1 (every pipeline's start)."""
    from retrace.nodes.inversion import invert

    return invert(world.model, {"samples": latent}, pair[0], None, STEPS, 1.0, "normal")[1]


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


def with_blend(pipeline: Callable[..., Edited]) -> Callable[..., Edited]:
    def run(world: World, latent: torch.Tensor, pair: tuple, old: str, new: str) -> Edited:
        return pipeline(world, latent, pair, blend_words=f"{old}, {new}")
    return run


def plain(pipeline: Callable[..., Edited]) -> Callable[..., Edited]:
    def run(world: World, latent: torch.Tensor, pair: tuple, old: str, new: str) -> Edited:
        return pipeline(world, latent, pair)
    return run


PIPELINES: dict[str, Callable[..., Edited]] = {
    "ddim_p2p": plain(ddim), "ddim_p2p_blend": with_blend(ddim),
    "npi_p2p": plain(negative_prompt), "npi_p2p_blend": with_blend(negative_prompt),
    "direct_p2p": plain(direct), "direct_p2p_blend": with_blend(direct),
}


def edited_attribute(edit: Any) -> str:
    return "background" if edit.kind == "background" else f"{edit.kind}{edit.thing}"


def measure(count: int, pipelines: list[str] | None = None) -> dict[str, float]:
    """Run every pipeline on ``count`` edits; the bench keys of bench/run.py."""
    from retrace.models import toy_world as tw

    world = World()
    edits = tw.edit_set(count, seed=0)
    prepared = []
    for e in edits:
        source_latent = world.encode(tw.render(e.source))
        target_latent = world.encode(tw.render(e.target))
        keep = ~latent_mask(tw.edit_mask(e))
        prepared.append((e, source_latent, target_latent, keep, world.pair(e.source.prompt, e.target.prompt)))
    metrics: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name in pipelines or list(PIPELINES):
        took, bg, target, recon = [], [], [], []
        started = time.perf_counter()
        for e, source_latent, target_latent, keep, pair in prepared:
            with torch.inference_mode():
                out = PIPELINES[name](world, source_latent, pair, e.old_word, e.new_word)
            read = tw.read_attributes(world.decode(out.edit))
            took.append(read[edited_attribute(e)] == e.new_word)
            bg.append(tw.psnr(out.edit, source_latent, PEAK, keep[None, None]))
            target.append(tw.psnr(out.edit, target_latent, PEAK))
            recon.append(tw.psnr(out.source, source_latent, PEAK))
        seconds[name] = (time.perf_counter() - started) / len(prepared)
        metrics.update({f"quality_{name}_accuracy": sum(took) / len(took),
                        f"quality_{name}_bg_psnr_db": sum(bg) / len(bg),
                        f"quality_{name}_target_psnr_db": sum(target) / len(target),
                        f"quality_{name}_recon_psnr_db": sum(recon) / len(recon)})
        log.info("%s: took %d/%d, background %.1f dB, target %.1f dB, reconstruction %.1f dB, %.2f s/edit", name,
                 sum(took), len(took), metrics[f"quality_{name}_bg_psnr_db"],
                 metrics[f"quality_{name}_target_psnr_db"], metrics[f"quality_{name}_recon_psnr_db"], seconds[name])
    reference = seconds.get("ddim_p2p")
    if reference:
        for name, s in seconds.items():
            metrics[f"quality_{name}_cost_ratio"] = s / reference
    return metrics
