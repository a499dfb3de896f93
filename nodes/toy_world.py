"""Retrace Load Toy World: the trained toy world's models (the pack's one set of weights), so every workflow runs
on pictures whose edits have an exact answer (models/toy_world.py)."""

from __future__ import annotations

from . import _toy_world as toy
from ._api import RetraceNode, io

CATEGORY = "Retrace/toy world"


class RetraceLoadToyWorld(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceLoadToyWorld",
            display_name="Retrace Load Toy World",
            category=CATEGORY,
            description="The toy world's trained models, shipped with Retrace: 64 px scenes of two coloured shapes "
                        "on a background, generated from prompts such as 'a red circle and a blue square on a white "
                        "background'. Edits of one word have an exact answer, so inversion and editing can be judged "
                        "on them. No download: the weights are in models/toy_world/.",
            inputs=[io.Combo.Input("family", options=list(toy.FAMILIES), default="sd15",
                                   tooltip="sd15: an SD1.5-family UNet (eps) with a CLIP text encoder behind the "
                                           "real SD1 tokenizer and a small VAE (8x: 64 px to 8x8 latents). flux: a "
                                           "rectified-flow DiT in the host's Flux class (no guidance input: use "
                                           "CFG), its own text encoder and a 16-channel VAE (4x: 64 px to 16x16 "
                                           "latents, so make empty latents at 128 x 128 for 64 px pictures).")],
            outputs=[io.Model.Output(tooltip="The diffusion model, as a checkpoint loader gives it."),
                     io.Clip.Output(tooltip="The text encoder: use with CLIP Text Encode or Retrace Prompt Pair."),
                     io.Vae.Output(tooltip="The VAE: 64 x 64 pictures to latents (sd15 8 x 8, flux 16 x 16) "
                                           "and back.")],
        )

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(*toy.load(family))


NODES = [RetraceLoadToyWorld]
