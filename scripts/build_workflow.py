"""Write a UI-format (0.4) workflow from a compact graph description, using the server's /object_info.

For maintainers adding a workflow to workflows/: describe the nodes (type, widget values by name, links by
input name) and let the host's own schemas fill in the slots, types and widget order the frontend expects.
The end-to-end and browser tests then load the file as a user would.

    python -m scripts.build_workflow  # rebuilds every graph in GRAPHS from a fresh headless server
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.comfy_server import ComfyServer
from scripts.workflow_api import has_control_widget, is_widget, ordered_inputs

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("retrace.build_workflow")


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (source node id, output slot)
    title: str | None = None


def build(nodes: list[Node], object_info: dict[str, Any], name: str) -> dict[str, Any]:
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    by_id = {n.id: n for n in nodes}
    ui_nodes = []
    for order, node in enumerate(nodes):
        schema = object_info[node.type]
        inputs, values = [], []
        specs = ordered_inputs(schema)
        unknown = set(node.widgets) | set(node.links)
        unknown -= {n for n, _ in specs}
        if unknown:
            raise ValueError(f"{node.type} has no inputs {sorted(unknown)}")
        optional = set((schema.get("input", {}).get("optional") or {}))
        for input_name, spec in specs:  # sockets first, as the frontend lays them out
            if is_widget(spec):
                continue
            link_id = None
            if input_name in node.links:
                src, slot = node.links[input_name]
                link_id = len(links) + 1
                kind = object_info[by_id[src].type]["output"][slot]
                links.append([link_id, src, slot, node.id, len(inputs), kind])
                out_links.setdefault((src, slot), []).append(link_id)
            elif input_name not in optional:
                raise ValueError(f"{node.type} input {input_name} is required but not linked")
            entry = {"localized_name": input_name, "name": input_name, "type": spec[0], "link": link_id}
            if input_name in optional:
                entry["shape"] = 7
            inputs.append(entry)
        for input_name, spec in specs:
            if not is_widget(spec):
                continue
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            inputs.append({"localized_name": input_name, "name": input_name, "type": kind,
                           "widget": {"name": input_name}, "link": None})
            if input_name not in node.widgets:
                default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                if default is None and isinstance(spec[0], list) and spec[0]:
                    default = spec[0][0]
                values.append(default)
            else:
                values.append(node.widgets[input_name])
            if has_control_widget(input_name, spec):
                values.append("fixed")
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("image_upload"):
                values.append("image")  # the frontend's upload button keeps a value of its own
        ui = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": [320, 120], "flags": {},
              "order": order, "mode": 0, "inputs": inputs, "outputs": [],
              "properties": {"cnr_id": "retrace" if node.type.startswith("Retrace") else "comfy-core",
                             "ver": "0.1.0" if node.type.startswith("Retrace") else "0.3.75",
                             "Node name for S&R": node.type},
              "widgets_values": values}
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
    for ui, node in zip(ui_nodes, nodes):
        schema = object_info[node.type]
        names = schema.get("output_name") or schema["output"]
        for slot, (kind, out_name) in enumerate(zip(schema["output"], names)):
            ui["outputs"].append({"localized_name": out_name, "name": out_name, "type": kind,
                                  "links": out_links.get((node.id, slot), []), "slot_index": slot})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"retrace/{name}")), "revision": 0,
            "last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}, "frontendVersion": "1.32.9"}, "version": 0.4}


def _prompts(clip: int, source: str, target: str, x: int = 420) -> list[Node]:
    return [Node(4, "CLIPTextEncode", (x, 40), {"text": source}, {"clip": (clip, 1)}, "Source prompt"),
            Node(5, "CLIPTextEncode", (x, 220), {"text": target}, {"clip": (clip, 1)}, "Edit prompt"),
            Node(6, "CLIPTextEncode", (x, 400), {"text": ""}, {"clip": (clip, 1)}, "Negative prompt")]


def _front(checkpoint: str, source: str, target: str) -> list[Node]:
    """Checkpoint, image, prompts, inversion-ready encode and a guidance-1 inversion (node ids 1-7)."""
    return [
        Node(1, "CheckpointLoaderSimple", (40, 160), {"ckpt_name": checkpoint}),
        Node(2, "LoadImage", (40, 340), {"image": "example.png"}),
        Node(3, "RetraceVAEEncodeForInversion", (420, 560), {"refine_steps": 0}, {"image": (2, 0), "vae": (1, 2)}),
        *_prompts(1, source, target),
        Node(7, "RetraceInvert", (810, 160), {"steps": 50, "guidance": 1.0, "scheduler": "normal"},
             {"model": (1, 0), "latent": (3, 0), "positive": (4, 0)}),
    ]


def _decode_and_save(latent: tuple[int, int], first_id: int, prefix: str, x: int) -> list[Node]:
    return [Node(first_id, "VAEDecode", (x, 160), {}, {"samples": latent, "vae": (1, 2)}),
            Node(first_id + 1, "SaveImage", (x + 260, 160), {"filename_prefix": prefix}, {"images": (first_id, 0)})]


CAT, DOG = "a photo of a cat sitting on a wooden table", "a photo of a dog sitting on a wooden table"

GRAPHS: dict[str, list[Node]] = {
    "sd15_null_text_edit.json": [
        *_front("v1-5-pruned-emaonly.safetensors", CAT, DOG),
        Node(8, "RetraceNullTextInversion", (1170, 160), {"guidance": 7.5},
             {"model": (1, 0), "inversion": (7, 1), "positive": (4, 0), "negative": (6, 0)}),
        Node(9, "RetraceNullTextGuider", (1530, 160), {}, {"model": (1, 0), "null_text": (8, 0), "positive": (5, 0)}),
        Node(10, "RetraceSampleInversionGuided", (1890, 160), {}, {"inversion": (7, 1), "guider": (9, 0)}),
        *_decode_and_save((10, 0), 11, "retrace_sd15_null_text_edit", 2250),
        Node(13, "VAEDecode", (1530, 420), {}, {"samples": (8, 1), "vae": (1, 2)}, "Decode reconstruction"),
        Node(14, "SaveImage", (1890, 420), {"filename_prefix": "retrace_sd15_null_text_reconstruction"},
             {"images": (13, 0)}),
        Node(15, "RetraceSaveNullText", (1530, 600), {"filename_prefix": "null_text"}, {"null_text": (8, 0)}),
    ],
    "sdxl_npi_edit.json": [
        *_front("sd_xl_base_1.0.safetensors", CAT, DOG),
        Node(8, "RetraceNegativePromptGuider", (1170, 160), {"guidance": 7.5},
             {"model": (1, 0), "positive": (5, 0), "source": (4, 0)}),
        Node(9, "DisableNoise", (1170, 40)),
        Node(10, "RetraceInversionSampler", (1170, 420), {"solver": "euler"}),
        Node(11, "BasicScheduler", (1170, 560), {"scheduler": "normal", "steps": 50, "denoise": 1.0},
             {"model": (1, 0)}),
        Node(12, "SamplerCustomAdvanced", (1530, 160), {},
             {"noise": (9, 0), "guider": (8, 0), "sampler": (10, 0), "sigmas": (11, 0), "latent_image": (7, 0)}),
        *_decode_and_save((12, 0), 13, "retrace_sdxl_npi_edit", 1890),
    ],
    "sd15_direct_inversion_edit.json": [
        *_front("v1-5-pruned-emaonly.safetensors", CAT, DOG),
        Node(8, "RetraceDirectInversionGuider", (1170, 160), {"guidance": 7.5},
             {"model": (1, 0), "inversion": (7, 1), "positive": (5, 0), "source": (4, 0), "negative": (6, 0)}),
        Node(9, "RetraceSampleInversionGuided", (1530, 160), {}, {"inversion": (7, 1), "guider": (8, 0)}),
        *_decode_and_save((9, 0), 10, "retrace_sd15_direct_inversion_edit", 1890),
    ],
}


def _attention_front(loaders: list[Node], model: tuple[int, int], clip: tuple[int, int], vae: tuple[int, int],
                     source: str, target: str, steps: int, scheduler: str, negative: bool = True) -> list[Node]:
    """Loaders, image, prompt pair, negative, inversion-ready encode and a guidance-1 inversion (ids up to 7)."""
    nodes = [
        *loaders,
        Node(2, "LoadImage", (40, 340), {"image": "example.png"}),
        Node(3, "RetraceVAEEncodeForInversion", (420, 560), {"refine_steps": 0}, {"image": (2, 0), "vae": vae}),
        Node(4, "RetracePromptPair", (420, 40), {"source": source, "target": target}, {"clip": clip}),
        Node(6, "CLIPTextEncode", (420, 360), {"text": ""}, {"clip": clip}, "Negative prompt"),
        Node(7, "RetraceInvert", (810, 160), {"steps": steps, "guidance": 1.0, "scheduler": scheduler},
             {"model": model, "latent": (3, 0), "positive": (4, 0)}),
    ]
    return nodes if negative else [n for n in nodes if n.id != 6]


SD15 = [Node(1, "CheckpointLoaderSimple", (40, 160), {"ckpt_name": "v1-5-pruned-emaonly.safetensors"})]
SDXL = [Node(1, "CheckpointLoaderSimple", (40, 160), {"ckpt_name": "sd_xl_base_1.0.safetensors"})]
TOY = [Node(1, "RetraceLoadToyWorld", (40, 160), {"family": "sd15"})]
TOY_SOURCE = "a red circle and a blue square on a white background"
TOY_TARGET = "a green circle and a blue square on a white background"
FLUX = [Node(1, "UNETLoader", (40, 40), {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        Node(5, "DualCLIPLoader", (40, 180), {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                              "type": "flux", "device": "default"}),
        Node(8, "VAELoader", (40, 480), {"vae_name": "ae.safetensors"})]

ATTENTION_GRAPHS: dict[str, list[Node]] = {
    # Mokady et al.'s recipe: null-text inversion, then Prompt-to-Prompt word swap with local blend.
    "sd15_p2p_word_swap.json": [
        *_attention_front(SD15, (1, 0), (1, 1), (1, 2), CAT, DOG, 50, "normal"),
        Node(8, "RetraceNullTextInversion", (1170, 160), {"guidance": 7.5},
             {"model": (1, 0), "inversion": (7, 1), "positive": (4, 0), "negative": (6, 0)}),
        Node(9, "RetraceAttentionStore", (1170, 480), {}, {"model": (1, 0)}),
        Node(10, "RetraceNullTextGuider", (1530, 160), {}, {"model": (9, 0), "null_text": (8, 0), "positive": (4, 0)},
             "Source pass guider"),
        Node(11, "RetraceSampleInversionGuided", (1890, 160), {}, {"inversion": (7, 1), "guider": (10, 0)},
             "Source pass"),
        Node(12, "RetraceAttentionInject", (1530, 420), {"mode": "replace", "blend_words": "cat, dog"},
             {"model": (1, 0), "pair": (4, 2), "store": (9, 1), "source_result": (11, 0)}),
        Node(13, "RetraceNullTextGuider", (1890, 420), {}, {"model": (12, 0), "null_text": (8, 0), "positive": (4, 1)},
             "Edit pass guider"),
        Node(14, "RetraceSampleInversionGuided", (2250, 420), {}, {"inversion": (7, 1), "guider": (13, 0)},
             "Edit pass"),
        *_decode_and_save((14, 0), 15, "retrace_sd15_p2p_word_swap", 2610),
    ],
    # Reweighting one word of an unchanged prompt, on negative-prompt inversion.
    "sdxl_p2p_reweight.json": [
        *_attention_front(SDXL, (1, 0), (1, 1), (1, 2), CAT, CAT, 50, "normal", negative=False),
        Node(9, "RetraceAttentionStore", (1170, 480), {}, {"model": (1, 0)}),
        Node(10, "RetraceNegativePromptGuider", (1170, 160), {"guidance": 7.5},
             {"model": (9, 0), "positive": (4, 0), "source": (4, 0)}, "Source pass guider"),
        Node(11, "RetraceSampleInversionGuided", (1530, 160), {}, {"inversion": (7, 1), "guider": (10, 0)},
             "Source pass"),
        Node(12, "RetraceAttentionInject", (1530, 420),
             {"mode": "replace", "self_attention": "off", "reweight_words": "wooden", "reweight_factor": 2.0},
             {"model": (1, 0), "pair": (4, 2), "store": (9, 1), "source_result": (11, 0)}),
        Node(13, "RetraceNegativePromptGuider", (1890, 420), {"guidance": 7.5},
             {"model": (12, 0), "positive": (4, 1), "source": (4, 0)}, "Edit pass guider"),
        Node(14, "RetraceSampleInversionGuided", (2250, 420), {}, {"inversion": (7, 1), "guider": (13, 0)},
             "Edit pass"),
        *_decode_and_save((14, 0), 15, "retrace_sdxl_p2p_reweight", 2610),
    ],
    # Flux: rectified-flow inversion, then the source's joint attention injected into the edit.
    "flux_p2p_edit.json": [
        *_attention_front(FLUX, (1, 0), (5, 0), (8, 0), CAT, DOG, 28, "simple", negative=False),
        Node(9, "RetraceAttentionStore", (1170, 480), {}, {"model": (1, 0)}),
        Node(10, "BasicGuider", (1170, 160), {}, {"model": (9, 0), "conditioning": (4, 0)}, "Source pass guider"),
        Node(11, "RetraceSampleInversionGuided", (1530, 160), {}, {"inversion": (7, 1), "guider": (10, 0)},
             "Source pass"),
        Node(12, "RetraceAttentionInject", (1530, 420), {"mode": "replace"},
             {"model": (1, 0), "pair": (4, 2), "store": (9, 1), "source_result": (11, 0)}),
        Node(13, "BasicGuider", (1890, 420), {}, {"model": (12, 0), "conditioning": (4, 1)}, "Edit pass guider"),
        Node(14, "RetraceSampleInversionGuided", (2250, 420), {}, {"inversion": (7, 1), "guider": (13, 0)},
             "Edit pass"),
        Node(15, "VAEDecode", (2610, 160), {}, {"samples": (14, 0), "vae": (8, 0)}),
        Node(16, "SaveImage", (2870, 160), {"filename_prefix": "retrace_flux_p2p_edit"}, {"images": (15, 0)}),
    ],
    # Where each word looks: the source pass's cross-attention as heatmaps over the photo.
    "sd15_attention_maps.json": [
        *_attention_front(SD15, (1, 0), (1, 1), (1, 2), CAT, "", 50, "normal", negative=False),
        Node(9, "RetraceAttentionStore", (1170, 480), {"self_attention": "off"}, {"model": (1, 0)}),
        Node(10, "RetraceNegativePromptGuider", (1170, 160), {"guidance": 7.5},
             {"model": (9, 0), "positive": (4, 0), "source": (4, 0)}),
        Node(11, "RetraceSampleInversionGuided", (1530, 160), {}, {"inversion": (7, 1), "guider": (10, 0)}),
        Node(12, "RetraceAttentionMaps", (1890, 420), {"words": "cat"},
             {"store": (9, 1), "pair": (4, 2), "samples": (11, 0), "image": (2, 0)}),
        Node(13, "SaveImage", (2250, 420), {"filename_prefix": "retrace_attention_maps"}, {"images": (12, 0)}),
        *_decode_and_save((11, 0), 14, "retrace_sd15_attention_maps_reconstruction", 1890),
    ],
    # The recommended edit (the demo's), on the toy world the pack ships: direct inversion's guider for both passes
    # (the source pass reconstructs exactly), Prompt-to-Prompt word swap and a local blend on the swapped words.
    "sd15_toy_world_edit.json": [
        *_attention_front(TOY, (1, 0), (1, 1), (1, 2), TOY_SOURCE, TOY_TARGET, 50, "normal"),
        Node(8, "RetraceAttentionStore", (1170, 480), {}, {"model": (1, 0)}),
        Node(9, "RetraceDirectInversionGuider", (1170, 160), {"guidance": 7.5},
             {"model": (8, 0), "inversion": (7, 1), "positive": (4, 0), "source": (4, 0), "negative": (6, 0)},
             "Source pass guider"),
        Node(10, "RetraceSampleInversionGuided", (1530, 160), {}, {"inversion": (7, 1), "guider": (9, 0)},
             "Source pass"),
        Node(11, "RetraceAttentionInject", (1530, 420), {"mode": "replace", "blend_words": "auto"},
             {"model": (1, 0), "pair": (4, 2), "store": (8, 1), "source_result": (10, 0)}),
        Node(12, "RetraceDirectInversionGuider", (1890, 420), {"guidance": 7.5},
             {"model": (11, 0), "inversion": (7, 1), "positive": (4, 1), "source": (4, 0), "negative": (6, 0)},
             "Edit pass guider"),
        Node(13, "RetraceSampleInversionGuided", (2250, 420), {}, {"inversion": (7, 1), "guider": (12, 0)},
             "Edit pass"),
        *_decode_and_save((13, 0), 14, "retrace_toy_world_edit", 2610),
        Node(16, "VAEDecode", (1890, 160), {}, {"samples": (10, 0), "vae": (1, 2)}, "Decode reconstruction"),
        Node(17, "SaveImage", (2250, 160), {"filename_prefix": "retrace_toy_world_reconstruction"},
             {"images": (16, 0)}),
        Node(18, "RetraceBlendMask", (2610, 420), {}, {"model": (11, 0), "samples": (13, 0)}),
        Node(19, "MaskToImage", (2870, 420), {}, {"mask": (18, 0)}),
        Node(20, "SaveImage", (3130, 420), {"filename_prefix": "retrace_toy_world_blend_mask"}, {"images": (19, 0)}),
    ],
}
GRAPHS.update(ATTENTION_GRAPHS)

STYLEGAN_FILE = "stylegan2-ffhq-1024x1024.pkl"
PROJECT_DEFAULTS = {"space": "W+", "steps": 250, "recipe": "retrace (fast)", "learning_rate": 0.0,
                    "optimize_noise": True, "lpips_backbone": "none", "ssim_weight": 1.0, "downscale": 1,
                    "grayscale": False, "on_mismatch": "resize", "seed": 0}


def _render(node_id: int, pos: tuple[int, int], stylegan: tuple[int, int], latent: tuple[int, int] | None,
            title: str, batch: int = 4) -> Node:
    links = {"stylegan": stylegan} if latent is None else {"stylegan": stylegan, "latent": latent}
    return Node(node_id, "RetraceStyleGANGenerate", pos,
                {"seed": 0, "batch_size": 1 if latent else batch, "truncation_psi": 1.0 if latent else 0.7,
                 "truncation_cutoff": 0, "noise_mode": "const", "class_index": 0}, links, title)


def _stylegan_front(project: dict[str, Any], mask: bool = False) -> list[Node]:
    """Generator, photo and projection (node ids 1-3)."""
    links = {"stylegan": (1, 0), "image": (2, 0)}
    if mask:
        links["mask"] = (2, 1)
    return [Node(1, "RetraceStyleGANLoader", (40, 160), {"generator": STYLEGAN_FILE, "dtype": "auto"}),
            Node(2, "LoadImage", (40, 340), {"image": "example.png"}),
            Node(3, "RetraceStyleGANProject", (420, 160), {**PROJECT_DEFAULTS, **project}, links)]


STYLEGAN_GRAPHS: dict[str, list[Node]] = {
    "stylegan_generate.json": [
        Node(1, "RetraceStyleGANLoader", (40, 160), {"generator": STYLEGAN_FILE, "dtype": "auto"}),
        _render(2, (420, 160), (1, 0), None, "Generate from seeds"),
        Node(3, "SaveImage", (800, 160), {"filename_prefix": "retrace_stylegan_samples"}, {"images": (2, 0)}),
        Node(4, "RetraceGANLatentSave", (800, 520), {"filename_prefix": "stylegan_samples"}, {"latent": (2, 1)}),
    ],
    "stylegan_project_reconstruct.json": [
        *_stylegan_front({}),
        _render(4, (820, 160), (1, 0), (3, 0), "Reconstruct from the latent"),
        Node(5, "SaveImage", (1200, 160), {"filename_prefix": "retrace_stylegan_reconstruction"}, {"images": (4, 0)}),
        Node(6, "RetraceGANLatentSave", (820, 520), {"filename_prefix": "stylegan_projection"}, {"latent": (3, 0)}),
    ],
    "stylegan_pti_reconstruct.json": [
        *_stylegan_front({"space": "W", "steps": 450}),
        Node(4, "RetraceStyleGANPivotalTuning", (820, 160),
             {"steps": 350, "learning_rate": 3e-4, "locality_weight": 0.0, "locality_distance": 30.0,
              "lpips_backbone": "none", "on_mismatch": "resize", "seed": 0},
             {"stylegan": (1, 0), "image": (2, 0), "latent": (3, 0)}),
        _render(5, (1200, 160), (4, 0), (3, 0), "Reconstruct with the tuned generator"),
        Node(6, "SaveImage", (1580, 160), {"filename_prefix": "retrace_stylegan_pti"}, {"images": (5, 0)}),
    ],
    "stylegan_inpaint.json": [
        *_stylegan_front({"space": "W", "optimize_noise": False}, mask=True),
        Node(4, "SaveImage", (820, 160), {"filename_prefix": "retrace_stylegan_inpaint"}, {"images": (3, 1)},
             "Inpainted (paint the mask on the photo: right click, Open in MaskEditor)"),
    ],
}
GRAPHS.update(STYLEGAN_GRAPHS)


def _sweep(node_id: int, index: int, y: int) -> list[Node]:
    return [Node(node_id, "RetraceDirectionSweep", (1200, y),
                 {"index": index, "strength_min": -3.0, "strength_max": 3.0, "count": 7, "layers": "auto"},
                 {"stylegan": (1, 0), "latent": (2, 1), "direction": (3, 0)}, f"Direction {index}"),
            Node(node_id + 1, "SaveImage", (1580, y), {"filename_prefix": f"retrace_sefa_{index}"},
                 {"images": (node_id, 0)})]


DIRECTION_GRAPHS: dict[str, list[Node]] = {
    "stylegan_sefa_explorer.json": [
        Node(1, "RetraceStyleGANLoader", (40, 160), {"generator": STYLEGAN_FILE, "dtype": "auto"}),
        _render(2, (420, 160), (1, 0), None, "One sample", batch=1),
        Node(3, "RetraceSeFa", (820, 160), {"layers": "all", "count": 10}, {"stylegan": (1, 0)}),
        *_sweep(4, 0, 40), *_sweep(6, 1, 420), *_sweep(8, 2, 800),
    ],
    "stylegan_project_boundary_edit.json": [
        *_stylegan_front({"space": "W"}),
        Node(4, "RetraceLoadBoundary", (420, 560), {"boundary_file": "smile.npy"}, {"stylegan": (1, 0)}),
        Node(5, "RetraceApplyDirection", (820, 160), {"index": 0, "strength": 3.0, "layers": "auto"},
             {"latent": (3, 0), "direction": (4, 0)}),
        _render(6, (1200, 160), (1, 0), (5, 0), "Render the edit"),
        Node(7, "SaveImage", (1580, 160), {"filename_prefix": "retrace_stylegan_boundary_edit"}, {"images": (6, 0)}),
    ],
    "sd15_prompt_direction_edit.json": [
        *(n for n in _front("v1-5-pruned-emaonly.safetensors", CAT, CAT) if n.title != "Edit prompt"),
        Node(8, "RetraceNullTextInversion", (1170, 160), {"guidance": 7.5},
             {"model": (1, 0), "inversion": (7, 1), "positive": (4, 0), "negative": (6, 0)}),
        Node(9, "RetracePromptDirection", (810, 560),
             {"source_prompts": "a cat\na photo of a cat\na cat sitting on a table\na close-up of a cat",
              "target_prompts": "a dog\na photo of a dog\na dog sitting on a table\na close-up of a dog"},
             {"clip": (1, 1)}, "cat -> dog (mean of each set)"),
        Node(10, "RetraceApplyPromptDirection", (1170, 560), {"strength": 1.0}, {"conditioning": (4, 0),
                                                                                 "direction": (9, 0)}),
        Node(11, "RetraceNullTextGuider", (1530, 160), {}, {"model": (1, 0), "null_text": (8, 0),
                                                             "positive": (10, 0)}),
        Node(12, "RetraceSampleInversionGuided", (1890, 160), {}, {"inversion": (7, 1), "guider": (11, 0)}),
        *_decode_and_save((12, 0), 13, "retrace_sd15_prompt_direction_edit", 2250),
    ],
    "stylegan_learn_boundary.json": [
        Node(1, "RetraceStyleGANLoader", (40, 160), {"generator": STYLEGAN_FILE, "dtype": "auto"}),
        _render(2, (420, 160), (1, 0), None, "Candidates: seeds 0-7", batch=8),
        Node(3, "SaveImage", (800, 560), {"filename_prefix": "retrace_boundary_candidates"}, {"images": (2, 0)},
             "Look at the candidates; pick by index below"),
        Node(4, "RetraceGANLatentPick", (800, 40), {"index": 0, "count": 2}, {"latent": (2, 1)}, "With it: seeds 0-1"),
        Node(5, "RetraceGANLatentPick", (800, 200), {"index": 3, "count": 1}, {"latent": (2, 1)}, "With it: seed 3"),
        Node(6, "RetraceGANLatentBatch", (1180, 40), {}, {"latent_a": (4, 0), "latent_b": (5, 0)}, "Positive examples"),
        Node(7, "RetraceGANLatentPick", (800, 360), {"index": 4, "count": 4}, {"latent": (2, 1)},
             "Without it: seeds 4-7"),
        Node(8, "RetraceLearnBoundary", (1560, 160), {"method": "svm"},
             {"stylegan": (1, 0), "positive": (6, 0), "negative": (7, 0)}),
        Node(9, "RetraceGANLatentPick", (1180, 360), {"index": 2, "count": 1}, {"latent": (2, 1)},
             "The sample to edit: seed 2"),
        Node(10, "RetraceDirectionSweep", (1940, 160),
             {"index": 0, "strength_min": -3.0, "strength_max": 3.0, "count": 7, "layers": "auto"},
             {"stylegan": (1, 0), "latent": (9, 0), "direction": (8, 0)}),
        Node(11, "SaveImage", (2320, 160), {"filename_prefix": "retrace_boundary_sweep"}, {"images": (10, 0)}),
        Node(12, "RetraceSaveDirection", (1940, 620), {"filename_prefix": "learned_boundary"}, {"direction": (8, 0)}),
    ],
}
GRAPHS.update(DIRECTION_GRAPHS)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = (argv if argv is not None else sys.argv[1:]) or list(GRAPHS)
    with ComfyServer(run_dir=ROOT / ".cache" / "build_workflow") as server:
        info = server.client().object_info()
    for name in names:
        path = ROOT / "workflows" / name
        path.write_text(json.dumps(build(GRAPHS[name], info, name), indent=1) + "\n", encoding="utf-8")
        log.info("wrote %s", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
