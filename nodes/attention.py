"""Attention store and inject nodes: Prompt-to-Prompt and MasaCtrl edits of real images (SD1.x, SDXL, Flux, SD3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..editing.alignment import AlignmentError, changed_tokens, refine_alignment, replace_mapper
from ..editing.attention_store import AttentionStore, StoreSettings, parse_layers
from ..editing.prompt_to_prompt import InjectSettings, TokenEdit, stored_word_maps
from ._api import RetraceNode, io
from ._attention_hooks import AttentionHook, AttentionInjector, AttentionRecorder, check_store_fits, identity_of
from ._prompts import context_tokens, word_positions

AttentionStoreType = io.Custom("RETRACE_ATTENTION_STORE")
PromptPairType = io.Custom("RETRACE_PROMPT_PAIR")

CATEGORY = "Retrace/editing/attention"
SELF_STORE = {"queries and keys": "qk", "keys and values": "kv", "off": "off"}
PRECISIONS = {"float16": torch.float16, "float32": torch.float32}
MODES = ("replace", "refine", "none")
SELF_INJECT = ("replace", "mutual", "off")
ORDER_HINT = ("Connect the source pass's output latent to source_result so the edit runs after the pass that fills "
              "the store.")


@dataclass(frozen=True)
class PromptPair:
    """A source and a target prompt, their context token sequences and the CLIP that tokenised them."""

    source: str
    target: str
    source_tokens: list
    target_tokens: list
    clip: Any

    @property
    def source_length(self) -> int:
        return len(self.source_tokens)

    @property
    def target_length(self) -> int:
        return len(self.target_tokens)


def _encode(clip: Any, text: str) -> tuple[list, list]:
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return conditioning, context_tokens(clip, text, conditioning[0][0].shape[1])


def _existing_override(model: Any, node: str) -> Any:
    previous = model.model_options.get("transformer_options", {}).get("optimized_attention_override")
    if isinstance(previous, AttentionHook):
        raise ValueError(f"{node}: this model already carries a Retrace attention store or inject. Connect the "
                         f"model from the loader (or the LoRA chain) instead: each pass gets its own patched clone.")
    return previous


def _positions(clip: Any, text: str, length: int, words: str) -> list[int]:
    return word_positions(clip, text, length, words) if words.strip() else []


AUTO_BLEND = "auto"


def _blend_positions(pair: PromptPair, words: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each blend word's positions in the source and in the target prompt (a word may be in one of them); for
    ``auto``, the tokens the pair changes."""
    if words.strip().lower() == AUTO_BLEND:
        source_changed, target_changed = changed_tokens(pair.source_tokens, pair.target_tokens)
        return tuple(source_changed), tuple(target_changed)
    source: list[int] = []
    target: list[int] = []
    for word in (w.strip() for w in words.split(",")):
        if not word:
            continue
        found = False
        for text, length, out in ((pair.source, pair.source_length, source), (pair.target, pair.target_length, target)):
            try:
                # A swapped word is in one prompt only: the normal case, not worth a warning.
                out.extend(word_positions(pair.clip, text, length, word, warn=False))
                found = True
            except AlignmentError:
                pass
        if not found:
            raise ValueError(f"Retrace Attention Inject: blend word {word!r} is in neither prompt (source "
                             f"{pair.source!r}, target {pair.target!r}).")
    return tuple(sorted(set(source))), tuple(sorted(set(target)))


def token_edit(pair: PromptPair, mode: str, reweight_words: str, reweight_factor: float) -> TokenEdit:
    """P2P's mapping from the pair (replace: word swap, refine: added words, none) and its reweighting."""
    mapper = alpha = None
    if mode == "replace":
        try:
            mapper = replace_mapper(pair.source_tokens, pair.target_tokens)
        except AlignmentError as e:
            raise ValueError(f"Retrace Attention Inject: {e}") from None
    elif mode == "refine":
        index, alpha = refine_alignment(pair.source_tokens, pair.target_tokens)
        mapper = torch.nn.functional.one_hot(index, pair.source_length).float()
    weights = None
    positions = _positions(pair.clip, pair.target, pair.target_length, reweight_words)
    if positions:
        weights = torch.ones(pair.target_length)
        weights[positions] = reweight_factor
    return TokenEdit(mapper=mapper, alpha=alpha, weights=weights)


PAIR_OUTPUT = 2  # the Prompt Pair's ``pair`` output slot


def _pair_users(prompt: dict | None, node_id: str | None) -> list[tuple[str, str, dict]]:
    """The Attention Inject and Attention Maps nodes of the queued prompt fed by this Prompt Pair's pair, with
    their inputs."""
    if not isinstance(prompt, dict) or node_id is None:
        return []
    users = []
    for other, node in prompt.items():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        link = inputs.get("pair")
        if (node.get("class_type") in ("RetraceAttentionInject", "RetraceAttentionMaps") and isinstance(link, list)
                and len(link) == 2 and str(link[0]) == str(node_id) and link[1] == PAIR_OUTPUT):
            users.append((str(other), node["class_type"], inputs))
    return users


def check_pair_users(pair: PromptPair, prompt: dict | None, node_id: str | None) -> None:
    """Refuse, when the pair is made, what the Attention Inject or Maps nodes it feeds would refuse after the
    inversion and the source pass: unaligned word swaps and words missing from the prompts. Widgets fed by links
    are left to those nodes."""
    for other, class_type, inputs in _pair_users(prompt, node_id):
        def text(name: str) -> str | None:
            value = inputs.get(name)
            return value if isinstance(value, str) else None
        try:
            if class_type == "RetraceAttentionMaps":
                if text("words") is not None:
                    for word in (w.strip() for w in text("words").split(",") if w.strip()):
                        word_positions(pair.clip, pair.source, pair.source_length, word, warn=False)
                continue
            if text("mode") in MODES and text("reweight_words") is not None:
                token_edit(pair, text("mode"), text("reweight_words"), 1.0)
            if text("blend_words") is not None:
                _blend_positions(pair, text("blend_words"))
        except ValueError as e:
            name = "Attention Inject" if class_type == "RetraceAttentionInject" else "Attention Maps"
            reason = str(e).removeprefix("Retrace Attention Inject: ")
            raise ValueError(f"Retrace Prompt Pair: the Retrace {name} node #{other} this pair feeds would refuse it "
                             f"after the inversion and the source pass, so nothing has run yet: {reason}") from None


class RetracePromptPair(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetracePromptPair",
            display_name="Retrace Prompt Pair",
            category=CATEGORY,
            description="Encodes a source prompt (what the photo shows) and a target prompt (what it should show) "
                        "with one CLIP, and keeps their tokens so Retrace Attention Inject can align them "
                        "(Prompt-to-Prompt, Hertz et al. 2023). Use the source conditioning for the inversion and "
                        "the source pass, the target for the edit pass.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the checkpoint you will sample (SD1.x, SDXL, Flux "
                                              "or SD3); both prompts are encoded with it."),
                io.String.Input("source", multiline=True, default="a photo of a cat",
                                tooltip="What the photo shows: the prompt it is inverted and reconstructed with."),
                io.String.Input("target", multiline=True, default="a photo of a dog",
                                tooltip="The edited description. Word swap: same number of words, some "
                                        "swapped. Refine: words added. Empty: the same as the source."),
            ],
            outputs=[
                io.Conditioning.Output("source_conditioning", display_name="source",
                                       tooltip="The source prompt's conditioning: for Retrace Invert, null-text and "
                                               "the source pass."),
                io.Conditioning.Output("target_conditioning", display_name="target",
                                       tooltip="The target prompt's conditioning: for the edit pass."),
                PromptPairType.Output("pair", display_name="pair",
                                      tooltip="Both prompts' tokens; connect to Retrace Attention Inject and Retrace "
                                              "Attention Maps."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, clip: Any, source: str, target: str) -> io.NodeOutput:
        if clip is None:
            raise ValueError("Retrace Prompt Pair: no CLIP is connected (a checkpoint without a text encoder?).")
        target = target if target.strip() else source
        source_cond, source_tokens = _encode(clip, source)
        target_cond, target_tokens = _encode(clip, target)
        pair = PromptPair(source, target, source_tokens, target_tokens, clip)
        hidden = getattr(cls, "hidden", None)
        check_pair_users(pair, getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None))
        return io.NodeOutput(source_cond, target_cond, pair)


class RetraceAttentionStore(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceAttentionStore",
            display_name="Retrace Attention Store",
            category=CATEGORY,
            description="Patches a clone of the model so that the sampling run using it (the source pass: the "
                        "reconstruction of the photo) records its attention, as queries and keys in CPU memory. "
                        "The store is reset at the start of that run. Feed it to Retrace Attention Inject for the "
                        "edit pass, or to Retrace Attention Maps. SD1.x, SDXL, Flux and SD3.",
            inputs=[
                io.Model.Input("model", tooltip="The model from the loader (or LoRA chain), not one already patched by "
                                                "a Retrace store or inject."),
                io.Boolean.Input("cross_attention", default=True,
                                 tooltip="Record cross-attention (the prompt's words): needed for replace, refine, "
                                         "reweight with a source, local blend and the maps."),
                io.Combo.Input("self_attention", options=list(SELF_STORE), default="queries and keys",
                               tooltip="queries and keys: for Prompt-to-Prompt's self-attention replace. keys and "
                                       "values: for MasaCtrl's mutual self-attention. off: smallest store."),
                io.String.Input("layers", default="auto",
                                tooltip="auto: every cross-attention layer and the self-attention layers below the "
                                        "finest resolution (as P2P; about 45 MB per step for SD1.5 at 512 px). "
                                        "all, or indices in call order such as '0-5, 9'."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="float16",
                               tooltip="float16 halves the memory; float32 makes an unchanged prompt reproduce the "
                                       "source pass bit for bit."),
                io.Int.Input("budget_mb", default=8192, min=1, max=1 << 20,
                             tooltip="Most CPU memory the store may take for a whole run. A run that would need more "
                                     "is refused before its first step, saying how much it needs."),
            ],
            outputs=[
                io.Model.Output("model_out", display_name="model",
                                tooltip="Sample the source pass with this model."),
                AttentionStoreType.Output("store", display_name="store",
                                          tooltip="Filled when the source pass runs; connect to Retrace Attention "
                                                  "Inject or Retrace Attention Maps."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, cross_attention: bool, self_attention: str, layers: str, precision: str,
                budget_mb: int) -> io.NodeOutput:
        previous = _existing_override(model, "Retrace Attention Store")
        settings = StoreSettings(cross=cross_attention, self_mode=SELF_STORE[self_attention], layers=layers,
                                 dtype=PRECISIONS[precision], budget_bytes=budget_mb << 20)
        store = AttentionStore(settings)
        patched = AttentionRecorder(store, identity_of(model), previous).install(model.clone())
        return io.NodeOutput(patched, store)


class RetraceAttentionInject(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceAttentionInject",
            display_name="Retrace Attention Inject",
            category=CATEGORY,
            description="Patches a clone of the model for the edit pass: its attention takes the source pass's "
                        "where Prompt-to-Prompt (Hertz et al. 2023) or MasaCtrl (Cao et al. 2023) say so, so the "
                        "layout stays while the words change. Sample the edit with the target conditioning, on the "
                        "same schedule and latent as the source pass.",
            inputs=[
                io.Model.Input("model", tooltip="The same model the store was made from (not the store's output)."),
                PromptPairType.Input("pair", tooltip="From Retrace Prompt Pair: the source and target prompts whose "
                                                     "tokens are aligned."),
                io.Combo.Input("mode", options=list(MODES), default="replace",
                               tooltip="replace: word swap, cross-attention maps taken word for word. refine: words "
                                       "added, aligned tokens take the source's maps. none: no source maps (only "
                                       "reweighting, self-attention or local blend)."),
                io.Float.Input("cross_steps", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps, from the first, in which cross-attention is injected "
                                       "and reweighted (P2P: 0.8)."),
                io.Combo.Input("self_attention", options=list(SELF_INJECT), default="replace",
                               tooltip="replace: P2P's self-attention maps from the source (store 'queries and "
                                       "keys'). mutual: MasaCtrl, the edit's queries over the source's keys and values "
                                       "(store 'keys and values'). off."),
                io.Float.Input("self_steps", default=0.4, min=0.0, max=1.0, step=0.05,
                               tooltip="replace: fraction of the steps, from the first, with the source's "
                                       "self-attention (P2P: 0.2 to 0.6; 0.4 default)."),
                io.Int.Input("mutual_start_step", default=4, min=0, max=10000,
                             tooltip="mutual: first step with mutual self-attention (MasaCtrl: 4)."),
                io.Int.Input("mutual_start_layer", default=10, min=0, max=10000,
                             tooltip="mutual: first self-attention layer, counted in call order (MasaCtrl: 10 of "
                                     "SD1.5's 16, the decoder)."),
                io.String.Input("reweight_words", default="",
                                tooltip="Comma-separated words of the target prompt whose attention is scaled."),
                io.Float.Input("reweight_factor", default=1.0, min=-10.0, max=10.0, step=0.1,
                               tooltip="Scale of the reweighted words' attention (P2P uses -2 to 5; 1 changes "
                                       "nothing)."),
                io.String.Input("blend_words", default=AUTO_BLEND,
                                tooltip="Local blend: comma-separated words (from either prompt, e.g. 'cat, dog') "
                                        "whose attention marks the region to edit; outside it the image follows the "
                                        "source pass. auto (the default): the words the pair changes, only where "
                                        "they change. Empty: no blend."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Local blend: fraction of the peak attention that counts as inside (P2P: 0.3)."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Local blend: fraction of the steps before blending starts (P2P: 0.2)."),
                AttentionStoreType.Input("store", optional=True,
                                         tooltip="From Retrace Attention Store. Only reweighting works without one."),
                io.Latent.Input("source_result", optional=True,
                                tooltip="The source pass's output latent. " + ORDER_HINT),
            ],
            outputs=[io.Model.Output(tooltip="Sample the edit pass with this model and the target conditioning.")],
        )

    @classmethod
    def execute(cls, model: Any, pair: PromptPair, mode: str, cross_steps: float, self_attention: str,
                self_steps: float, mutual_start_step: int, mutual_start_layer: int, reweight_words: str,
                reweight_factor: float, blend_words: str, blend_threshold: float, blend_start: float,
                store: AttentionStore | None = None, source_result: dict | None = None) -> io.NodeOutput:
        previous = _existing_override(model, "Retrace Attention Inject")
        identity = identity_of(model)
        blend_source, blend_target = _blend_positions(pair, blend_words)
        if store is None:
            needs = [what for what, used in (("mode " + mode, mode != "none"), ("self-attention " + self_attention,
                     self_attention != "off"), ("local blend", bool(blend_source or blend_target))) if used]
            if needs:
                raise ValueError(f"Retrace Attention Inject: {', '.join(needs)} need the source pass's attention; "
                                 f"connect a Retrace Attention Store, or use mode none, self_attention off and no "
                                 f"blend words to only reweight.")
        else:
            if source_result is None:
                raise ValueError(f"Retrace Attention Inject: a store is connected but source_result is not. "
                                 f"{ORDER_HINT}")
            check_store_fits(store, identity, tuple(source_result["samples"].shape), None)
            _check_store_holds(store, pair, mode, self_attention, bool(blend_source))
        settings = InjectSettings(
            edit=token_edit(pair, mode, reweight_words, reweight_factor), cross_steps=cross_steps,
            self_mode=self_attention, self_steps=self_steps, mutual_start_step=mutual_start_step,
            mutual_start_layer=mutual_start_layer, blend_target=blend_target, blend_source=blend_source,
            blend_threshold=blend_threshold, blend_start=blend_start)
        patched = AttentionInjector(store, settings, identity, previous).install(model.clone())
        return io.NodeOutput(patched)


def _check_store_holds(store: AttentionStore, pair: PromptPair, mode: str, self_attention: str,
                       source_blend: bool) -> None:
    stored = store.settings
    if (mode != "none" or source_blend) and not stored.cross:
        raise ValueError(f"Retrace Attention Inject: mode {mode!r} and local blend need cross-attention in the store; "
                         f"it was made with cross_attention off.")
    wanted = {"replace": "qk", "mutual": "kv"}.get(self_attention)
    if wanted and stored.self_mode != wanted:
        have = {v: k for k, v in SELF_STORE.items()}
        raise ValueError(f"Retrace Attention Inject: self_attention {self_attention!r} needs a store with "
                         f"self_attention '{have[wanted]}'; this store has '{have[stored.self_mode]}'.")
    texts = {s.text for s in store.specs or [] if s.kind != "self"}
    if texts and pair.source_length not in texts:
        raise ValueError(f"Retrace Attention Inject: the source pass was sampled with a prompt of {sorted(texts)[0]} "
                         f"tokens; the pair's source prompt has {pair.source_length}. Sample the source pass with the "
                         f"pair's source conditioning.")


class RetraceAttentionMaps(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceAttentionMaps",
            display_name="Retrace Attention Maps",
            category=CATEGORY,
            description="Per-word cross-attention heatmaps of the source pass, averaged over the chosen layers and "
                        "steps (as Prompt-to-Prompt shows them): an overlay IMAGE and a MASK per image and word, "
                        "image by image, word by word.",
            inputs=[
                AttentionStoreType.Input("store", tooltip="From Retrace Attention Store with cross_attention on, "
                                                          "filled by the source pass."),
                PromptPairType.Input("pair", tooltip="The pair whose source prompt the store's pass was sampled with."),
                io.Latent.Input("samples", tooltip="The output of the pass that filled the store (so the maps are "
                                                   "made after it)."),
                io.String.Input("words", default="cat", tooltip="Comma-separated words of the source prompt."),
                io.String.Input("layers", default="auto", tooltip="auto: every stored cross-attention layer; or "
                                                                  "indices in call order such as '0-5, 9'."),
                io.Float.Input("first_step", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps where averaging starts."),
                io.Float.Input("last_step", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the steps where averaging ends."),
                io.Image.Input("image", optional=True, tooltip="The photo to overlay the heatmaps on."),
            ],
            outputs=[io.Image.Output("overlay", display_name="overlay",
                                     tooltip="Heatmaps (blue low, red high), half over the image if one is given; one "
                                             "per image and word. Connect to Save Image or Preview Image."),
                     io.Mask.Output("mask", display_name="mask",
                                    tooltip="The same heatmaps as masks with a peak of 1, in the overlay's order.")],
        )

    @classmethod
    def execute(cls, store: AttentionStore, pair: PromptPair, samples: dict, words: str, layers: str,
                first_step: float, last_step: float, image: torch.Tensor | None = None) -> io.NodeOutput:
        if not store.complete:
            raise ValueError("Retrace Attention Maps: the store is empty; sample the source pass with the model from "
                             "Retrace Attention Store and connect its output to samples.")
        names = [w.strip() for w in words.split(",") if w.strip()]
        if not names:
            raise ValueError("Retrace Attention Maps: no words given; write words of the source prompt, e.g. 'cat'.")
        positions = [tuple(word_positions(pair.clip, pair.source, pair.source_length, w)) for w in names]
        chosen = parse_layers(layers, len(store.specs))
        steps = (int(first_step * store.steps), max(int(first_step * store.steps) + 1, int(last_step * store.steps)))
        size = tuple(store.latent_shape[-2:])
        maps = stored_word_maps(store.entries, store.specs, positions, size, None if chosen is None else set(chosen),
                                steps)
        height, width = (image.shape[1:3] if image is not None else (size[0] * 8, size[1] * 8))
        maps = torch.nn.functional.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        masks = maps.clamp(0, 1).flatten(0, 1)
        heat = _colormap(masks)
        if image is not None:
            base = image[:, :, :, :3].repeat_interleave(len(names), dim=0)
            if base.shape[0] != heat.shape[0]:
                base = base[:1].expand(heat.shape[0], -1, -1, -1)
            heat = 0.5 * base.to(heat) + 0.5 * heat
        return io.NodeOutput(heat, masks)


class RetraceBlendMask(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceBlendMask",
            display_name="Retrace Blend Mask",
            category=CATEGORY,
            description="The local-blend mask an edit pass used (its last step's), as a MASK at pixel size: where the "
                        "edit was allowed to change the picture. Shows whether the blend words' attention marked "
                        "the object or spread over everything.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Retrace Attention Inject (with blend words) that the "
                                                "edit pass sampled with."),
                io.Latent.Input("samples", tooltip="The edit pass's output latent (so the mask is read after it)."),
            ],
            outputs=[io.Mask.Output("mask", display_name="mask",
                                    tooltip="1 where the edit passed, 0 where the source was kept; one per image. "
                                            "Connect to Mask To Image and Preview Image, or use it as a mask.")],
        )

    @classmethod
    def execute(cls, model: Any, samples: dict) -> io.NodeOutput:
        hook = model.model_options.get("transformer_options", {}).get("optimized_attention_override")
        if not isinstance(hook, AttentionInjector):
            raise ValueError("Retrace Blend Mask: this model carries no Retrace Attention Inject; connect the MODEL "
                             "output of Attention Inject that the edit pass sampled with.")
        if not hook.settings.blends:
            raise ValueError("Retrace Blend Mask: the inject has no local blend (blend_words is empty, or auto found "
                             "no changed word); set blend_words on Retrace Attention Inject.")
        mask = hook.run.blend_mask
        latent = samples["samples"]
        if mask is None or tuple(hook.run.latent_shape or ()) != tuple(latent.shape):
            raise ValueError("Retrace Blend Mask: no edit pass has been sampled with this model yet (or it sampled "
                             "another latent); connect the edit pass's output latent to samples.")
        height, width = latent.shape[-2] * 8, latent.shape[-1] * 8  # the VAE's 8x of every supported family
        pixels = torch.nn.functional.interpolate(mask, size=(height, width), mode="nearest")[:, 0]
        return io.NodeOutput(pixels)


def _colormap(maps: torch.Tensor) -> torch.Tensor:
    """``[n, h, w]`` in [0, 1] to a blue-to-red IMAGE ``[n, h, w, 3]`` (a jet-like ramp)."""
    x = maps.unsqueeze(-1)
    centres = torch.tensor([0.75, 0.5, 0.25], dtype=maps.dtype)
    return (1.5 - (4 * x - 4 * centres).abs()).clamp(0, 1)


NODES = [RetracePromptPair, RetraceAttentionStore, RetraceAttentionInject, RetraceAttentionMaps, RetraceBlendMask]
