"""Edit directions in the graph: find them in a StyleGAN (SeFa, GANSpace), learn or load InterFaceGAN boundaries,
apply and sweep them over GAN latents, interpolate and style-mix latents, and text directions for diffusion
CONDITIONING (pix2pix-zero). Thin adapters over ``editing/directions.py``."""

from __future__ import annotations

import logging
import os
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..editing.directions import (
    DIRECTION_FORMAT,
    Direction,
    apply_direction,
    apply_prompt_direction,
    condition,
    fit_boundary,
    ganspace,
    interpolate,
    load_direction,
    parse_layers,
    prompt_direction,
    read_boundary_file,
    sefa,
    style_mix,
    sweep,
)
from ..inversion.gan_latent import GanLatent
from ..inversion.gan_projection import sample_ws
from ._api import RetraceNode, io, ui
from ._stylegan import GanLatentType, StyleGAN, StyleGANType, base_id, check_latent_fits, tensor_to_image
from ._records import (FOLDER as RECORD_FOLDER, file_exists, record_file_input, register_folder, save_record,
                           save_schema)

log = logging.getLogger("retrace")

DirectionType = io.Custom("RETRACE_DIRECTION")

GAN_CATEGORY = "Retrace/stylegan/directions"
TEXT_CATEGORY = "Retrace/editing/directions"
DIRECTION_FOLDER = "retrace_directions"
DIRECTION_EXTENSIONS = {".npy", ".safetensors", ".pt", ".pth"}
BOUNDARY_METHODS = {"svm": "svm", "logistic": "logistic", "mean difference": "mean-difference"}
AUTO = "auto"

LAYERS_TOOLTIP = ("Which W+ rows: all, coarse (rows 0-3), middle (4-7), fine (8 to the end), one row 'a' or an "
                  "inclusive range 'a-b'.")
APPLY_LAYERS_TOOLTIP = ("Which W+ rows to move. auto: the direction's own range (SeFa/GANSpace layers), else all. "
                        "Otherwise all, coarse (0-3), middle (4-7), fine (8 to the end), 'a' or an inclusive 'a-b'.")
INDEX_TOOLTIP = "Which component of the direction (0 = the first: the strongest for SeFa and GANSpace)."
STRENGTH_NOTE = "For GANSpace components the unit is one standard deviation of W along the component (sigma_k)."


def register_direction_folder() -> None:
    """models/retrace_directions/ for users' boundary files (.npy, .safetensors, .pt, .pth)."""
    if DIRECTION_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[DIRECTION_FOLDER] = (
            [os.path.join(folder_paths.models_dir, DIRECTION_FOLDER)], set(DIRECTION_EXTENSIONS))
    else:
        folder_paths.folder_names_and_paths[DIRECTION_FOLDER][1].update(DIRECTION_EXTENSIONS)


# --- checks --------------------------------------------------------------------------------------------------


def check_gan_direction(direction: Direction, num_ws: int, w_dim: int, model_id: str, target: str) -> None:
    """Refuse a 'text' direction, or one made for a generator of another identity or size."""
    if direction.space != "w":
        raise ValueError(f"this is a '{direction.space}' direction (an offset of diffusion CONDITIONING, from Retrace "
                         f"Prompt Direction); {target} takes a StyleGAN ('w') direction. Use it with Retrace Apply "
                         "Prompt Direction instead.")
    made_for = (f"this direction was made for generator {base_id(direction.model_id)}" if direction.model_id
                else "this direction")
    if direction.w_dim != w_dim:
        raise ValueError(f"{made_for}; its vectors have {direction.w_dim} values, but {target} has w of {w_dim}. "
                         "Make or load a direction for this generator.")
    rows = int(direction.vectors.shape[1]) if direction.per_layer else direction.num_ws
    if rows and rows != num_ws:
        raise ValueError(f"{made_for}, which has {rows} W+ rows; {target} has {num_ws}. Make or load a direction "
                         "for this generator.")
    if direction.model_id and model_id and base_id(direction.model_id) != base_id(model_id):
        raise ValueError(f"{made_for}; {target} belongs to generator {base_id(model_id)}. Directions do not carry "
                         "over between generators: make it again with this one (SeFa, GANSpace, Learn Boundary).")


def check_text_direction(direction: Direction, target: str) -> None:
    if direction.space != "text":
        raise ValueError(f"this is a StyleGAN '{direction.space}' direction; {target} takes a text direction (from "
                         "Retrace Prompt Direction). Use it with Retrace Apply Direction or Direction Sweep instead.")


def check_single(latent: GanLatent, what: str) -> None:
    if latent.batch_size != 1:
        raise ValueError(f"the {what} holds a batch of {latent.batch_size} latents; this node takes one. Pick one "
                         "first with Retrace Pick GAN Latent.")


def row_range(spec: str, direction: Direction | None, num_ws: int) -> tuple[int, int]:
    """'auto' -> the direction's own W+ rows, else all; anything else through ``parse_layers``."""
    if spec.strip().lower() == AUTO:
        return direction.layers if direction is not None and direction.layers is not None else (0, num_ws)
    return parse_layers(spec.strip(), num_ws)


def vector_and_scale(direction: Direction, index: int) -> tuple[torch.Tensor, float]:
    """One component and the factor a strength is multiplied by (GANSpace: its sigma_k; otherwise 1)."""
    picked = direction.pick(index)
    scale = 1.0
    if direction.method == "ganspace" and picked.scales is not None:
        scale = float(picked.scales[0])
    return picked.vectors[0], scale


def w_space(inputs: list[GanLatent], ws: torch.Tensor) -> str:
    """'w' when every input was in W and every output row is still the same w; else 'w+'."""
    same_rows = bool(torch.equal(ws, ws[:, :1].expand_as(ws)))
    return "w" if same_rows and all(lat.space == "w" for lat in inputs) else "w+"


# --- rendering -----------------------------------------------------------------------------------------------


def render(gan: StyleGAN, ws: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
    """Render ``ws`` [S, num_ws, w_dim] one latent at a time (so each image is the one a single render gives),
    with constant noise or the given maps [S, 1, H, W]; IMAGE [S, H, W, C]."""
    G = gan.load()
    device = next(G.parameters()).device
    bar = comfy.utils.ProgressBar(ws.shape[0])
    images = []
    with torch.no_grad():
        for i in range(ws.shape[0]):
            comfy.model_management.throw_exception_if_processing_interrupted()
            maps = {k: v[i:i + 1].to(device) for k, v in noise.items()} or None
            images.append(G.synthesis(ws[i:i + 1].to(device), noise_mode="const", noise=maps))
            bar.update_absolute(i + 1, ws.shape[0])
    return tensor_to_image(torch.cat(images))


def const_noise(G: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The generator's fixed noise maps as [1, 1, H, W] (what a latent without maps renders with)."""
    return {k: v.detach().float().cpu()[None, None] for k, v in G.noise_maps().items()}


def filled_noise(latent: GanLatent, G: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The latent's noise maps, with the generator's constant maps for any it lacks."""
    maps = const_noise(G)
    maps.update({k: v.float().cpu() for k, v in latent.noise.items()})
    return maps


def out_latent(ws: torch.Tensor, space: str, gan: StyleGAN, noise: dict[str, torch.Tensor]) -> GanLatent:
    return GanLatent(ws=ws.float().cpu(), space=space, model_id=gan.model_id, family=gan.family,
                     noise={k: v.float().cpu() for k, v in noise.items()})


def summary(direction: Direction, extra: str = "") -> ui.PreviewText:
    layers = "" if direction.layers is None else f", W+ rows {direction.layers[0]}-{direction.layers[1] - 1}"
    return ui.PreviewText(f"{direction.method}: {direction.count} direction(s){layers}{extra}")


# --- StyleGAN directions -------------------------------------------------------------------------------------


class RetraceSeFa(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceSeFa",
            display_name="Retrace SeFa Directions",
            category=GAN_CATEGORY,
            description="Closed-form factorization (Shen & Zhou 2021): the directions in W that change the chosen "
                        "layers' styles most, read from the generator's weights alone (no sampling, no labels). "
                        "Each direction is a unit vector; strengths of about -3 to 3 are typical.",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="From Retrace Load StyleGAN (or a tuned copy)."),
                io.String.Input("layers", default="all", tooltip=LAYERS_TOOLTIP + " Only these rows' style layers "
                                "are factorised; the direction remembers them for Apply Direction's 'auto'."),
                io.Int.Input("count", default=10, min=1, max=4096,
                             tooltip="How many directions, strongest first (at most w_dim)."),
            ],
            outputs=[DirectionType.Output(
                display_name="direction",
                tooltip="Unit directions in W, strongest first, with their layer range; connect to "
                        "Apply Direction, Direction Sweep or Save Direction.")],
        )

    @classmethod
    def execute(cls, stylegan: StyleGAN, layers: str, count: int) -> io.NodeOutput:
        info = stylegan.info
        if not 1 <= count <= info.w_dim:
            raise ValueError(f"count must be 1..{info.w_dim} (w_dim of {stylegan.name}), got {count}")
        start, end = parse_layers(layers.strip(), info.num_ws)
        G = stylegan.load()  # a tuned copy's weights are in place only once loaded
        weights = [affine.weight.detach().float().cpu() for _, idx, affine in G.style_layers() if start <= idx < end]
        if not weights:
            raise ValueError(f"W+ rows {start}-{end - 1} of {stylegan.name} drive no style layer; choose other layers")
        vectors, eigenvalues = sefa(weights, count)
        direction = Direction(vectors=vectors, space="w", method="sefa", model_id=base_id(stylegan.model_id),
                              num_ws=info.num_ws, layers=(start, end), scales=eigenvalues)
        log.info("Retrace SeFa: %d directions from %d style layers (rows %d-%d)", count, len(weights), start, end - 1)
        return io.NodeOutput(direction, ui=summary(direction))


class RetraceGANSpace(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceGANSpace",
            display_name="Retrace GANSpace Directions",
            category=GAN_CATEGORY,
            description="GANSpace (Harkonen et al. 2020): principal components of W over mapped random z (no "
                        "truncation). Strengths of these directions are in standard deviations along each "
                        "component; the layer range makes the paper's layer-wise edits.",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="From Retrace Load StyleGAN (or a tuned copy)."),
                io.Int.Input("samples", default=10000, min=100, max=1000000,
                             tooltip="How many random z are mapped to W for the PCA (the paper uses up to 1e6)."),
                io.Int.Input("components", default=20, min=1, max=4096,
                             tooltip="How many principal components, by decreasing variance (at most w_dim)."),
                io.String.Input("layers", default="all", tooltip=LAYERS_TOOLTIP + " Remembered for Apply "
                                "Direction's 'auto'."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seeds the sampled z (and classes "
                             "of a conditional generator)."),
            ],
            outputs=[DirectionType.Output(
                display_name="direction",
                tooltip="Principal components of W (strength unit: one standard deviation each) "
                        "with their layer range; connect to Apply Direction or Direction Sweep.")],
        )

    @classmethod
    def execute(cls, stylegan: StyleGAN, samples: int, components: int, layers: str, seed: int) -> io.NodeOutput:
        info = stylegan.info
        if not 1 <= components <= info.w_dim:
            raise ValueError(f"components must be 1..{info.w_dim} (w_dim of {stylegan.name}), got {components}")
        if samples <= components:
            raise ValueError(f"samples ({samples}) must exceed components ({components}) for a PCA")
        span = parse_layers(layers.strip(), info.num_ws)
        ws = sample_ws(stylegan.load(), samples, seed).cpu()
        vectors, stds, mean, ratio = ganspace(ws, components)
        direction = Direction(vectors=vectors, space="w", method="ganspace", model_id=base_id(stylegan.model_id),
                              num_ws=info.num_ws, layers=span, scales=stds, mean=mean)
        explained = float(ratio.sum())
        log.info("Retrace GANSpace: %d components explain %.1f%% of W's variance", components, 100 * explained)
        return io.NodeOutput(direction, ui=summary(direction, f", {100 * explained:.1f}% of the variance"))


def direction_files() -> list[str]:
    register_direction_folder()
    return folder_paths.get_filename_list(DIRECTION_FOLDER)


class RetraceLoadBoundary(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceLoadBoundary",
            display_name="Retrace Load Boundary",
            category=GAN_CATEGORY,
            description="Load a direction file (an InterFaceGAN boundary normal, PTI/e4e editing directions, ...) "
                        "from models/retrace_directions/: .npy, .safetensors or .pt/.pth, read without running any "
                        "code. The file must match the generator's w size; it is taken to belong to this generator.",
            inputs=[
                io.Combo.Input("boundary_file", options=direction_files(),
                               tooltip="A file in models/retrace_directions/: [w_dim], [K, w_dim] or "
                                       "[K, num_ws, w_dim] values."),
                StyleGANType.Input("stylegan", tooltip="The generator the direction was made for."),
            ],
            outputs=[DirectionType.Output(
                display_name="direction",
                tooltip="The file's direction(s), now tied to this generator; connect to Apply "
                        "Direction, Direction Sweep or Conditional Direction.")],
        )

    @classmethod
    def validate_inputs(cls, boundary_file: str) -> bool | str:
        register_direction_folder()
        return True if folder_paths.get_full_path(DIRECTION_FOLDER, boundary_file) is not None else \
            f"direction file not found in models/{DIRECTION_FOLDER}/: {boundary_file}"

    @classmethod
    def execute(cls, boundary_file: str, stylegan: StyleGAN) -> io.NodeOutput:
        register_direction_folder()
        vectors = read_boundary_file(folder_paths.get_full_path_or_raise(DIRECTION_FOLDER, boundary_file))
        info = stylegan.info
        if vectors.shape[-1] != info.w_dim:
            raise ValueError(f"{boundary_file} holds vectors of {vectors.shape[-1]} values, but {stylegan.name} has "
                             f"w of {info.w_dim}: it was made for another generator")
        if vectors.ndim == 3 and vectors.shape[1] != info.num_ws:
            raise ValueError(f"{boundary_file} holds per-layer directions of {vectors.shape[1]} W+ rows, but "
                             f"{stylegan.name} has {info.num_ws}: it was made for another generator")
        direction = Direction(vectors=vectors, space="w", method="file", model_id=base_id(stylegan.model_id),
                              num_ws=info.num_ws)
        return io.NodeOutput(direction, ui=summary(direction))


class RetraceLearnBoundary(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceLearnBoundary",
            display_name="Retrace Learn Boundary",
            category=GAN_CATEGORY,
            description="InterFaceGAN (Shen et al. 2020): the unit normal of a hyperplane in W that separates "
                        "latents with an attribute (positive) from latents without it (negative). Each W+ latent is "
                        "reduced to the mean of its rows. The direction points toward the positive set.",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="The generator the latents belong to."),
                GanLatentType.Input("positive", tooltip="A batch of latents that show the attribute (at least 2)."),
                GanLatentType.Input("negative", tooltip="A batch of latents that do not show it (at least 2)."),
                io.Combo.Input("method", options=list(BOUNDARY_METHODS), default="svm",
                               tooltip="svm: linear SVM (as InterFaceGAN); logistic: logistic regression; mean "
                                       "difference: the normalised difference of the two means."),
            ],
            outputs=[DirectionType.Output(
                display_name="direction",
                tooltip="The unit normal of the boundary, pointing toward the positive set; connect "
                        "to Apply Direction, Direction Sweep or Save Direction.")],
        )

    @classmethod
    def execute(cls, stylegan: StyleGAN, positive: GanLatent, negative: GanLatent, method: str) -> io.NodeOutput:
        if method not in BOUNDARY_METHODS:
            raise ValueError(f"method must be one of {list(BOUNDARY_METHODS)}, got {method!r}")
        check_latent_fits(positive, stylegan, "positive latents")
        check_latent_fits(negative, stylegan, "negative latents")
        for what, latent in (("positive", positive), ("negative", negative)):
            if latent.batch_size < 2:
                raise ValueError(f"the {what} set holds {latent.batch_size} latent; give at least 2 (batch them "
                                 "with several seeds or projections)")
        normal = fit_boundary(positive.ws.float().mean(1), negative.ws.float().mean(1), BOUNDARY_METHODS[method])
        direction = Direction(vectors=normal[None], space="w", method=BOUNDARY_METHODS[method],
                              model_id=base_id(stylegan.model_id), num_ws=stylegan.info.num_ws)
        return io.NodeOutput(direction, ui=summary(direction))


class RetraceConditionalDirection(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceConditionalDirection",
            display_name="Retrace Conditional Direction",
            category=GAN_CATEGORY,
            description="InterFaceGAN conditional manipulation: remove from a direction its part along other "
                        "directions (e.g. change age without changing glasses), so moving along the result leaves "
                        "them unchanged to first order. The result is a unit vector (strength in w units, also for "
                        "a GANSpace component).",
            inputs=[
                DirectionType.Input("direction", tooltip="The direction to keep (one component of it)."),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip=INDEX_TOOLTIP),
                DirectionType.Input("remove", tooltip="The direction(s) to make it independent of."),
                io.Int.Input("remove_index", default=-1, min=-1, max=4095,
                             tooltip="Which component of 'remove'; -1 = all of its components."),
            ],
            outputs=[DirectionType.Output(
                display_name="direction",
                tooltip="One unit direction with the removed parts taken out (strength in w "
                        "units); connect to Apply Direction or Direction Sweep.")],
        )

    @classmethod
    def execute(cls, direction: Direction, index: int, remove: Direction, remove_index: int) -> io.NodeOutput:
        for what, d in (("direction", direction), ("remove", remove)):
            if d.space != "w":
                raise ValueError(f"'{what}' is a '{d.space}' direction; conditional directions are for StyleGAN "
                                 "('w') directions")
            if d.per_layer:
                raise ValueError(f"'{what}' holds per-layer (W+) vectors; conditioning needs one w per direction")
        check_gan_direction(remove, direction.num_ws or remove.num_ws, direction.w_dim, direction.model_id,
                            "the direction it is removed from")
        primary = direction.pick(index)
        others = remove.vectors if remove_index == -1 else remove.pick(remove_index).vectors
        vector = condition(primary.vectors[0], others)
        result = Direction(vectors=vector[None], space="w", method="conditional",
                           model_id=direction.model_id or remove.model_id, num_ws=direction.num_ws or remove.num_ws,
                           layers=direction.layers)
        return io.NodeOutput(result, ui=summary(result))


class RetraceApplyDirection(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceApplyDirection",
            display_name="Retrace Apply Direction",
            category=GAN_CATEGORY,
            description="Move latents along a direction: w+ rows in the chosen range += strength x direction. The "
                        "result is W+ unless every row moved alike. " + STRENGTH_NOTE,
            inputs=[
                GanLatentType.Input("latent", tooltip="From projection, Generate or Load GAN Latent (a batch moves "
                                    "as a whole)."),
                DirectionType.Input("direction", tooltip="From SeFa, GANSpace, Load/Learn Boundary or Load "
                                    "Direction."),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip=INDEX_TOOLTIP),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.1,
                               tooltip="How far to move; negative moves the other way. " + STRENGTH_NOTE),
                io.String.Input("layers", default=AUTO, tooltip=APPLY_LAYERS_TOOLTIP),
            ],
            outputs=[GanLatentType.Output(
                display_name="latent",
                tooltip="The moved latent (W+ unless every row moved alike), noise maps kept; "
                        "render it with Generate or save it.")],
        )

    @classmethod
    def execute(cls, latent: GanLatent, direction: Direction, index: int, strength: float,
                layers: str) -> io.NodeOutput:
        check_gan_direction(direction, latent.num_ws, latent.w_dim, latent.model_id, "the latent")
        span = row_range(layers, direction, latent.num_ws)
        vector, scale = vector_and_scale(direction, index)
        ws = apply_direction(latent.ws.float(), vector, strength * scale, span)
        space = latent.space if strength == 0 else w_space([latent], ws)
        out = GanLatent(ws=ws, space=space, model_id=latent.model_id, family=latent.family,
                        noise={k: v.clone() for k, v in latent.noise.items()})
        return io.NodeOutput(out)


class RetraceDirectionSweep(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceDirectionSweep",
            display_name="Retrace Direction Sweep",
            category=GAN_CATEGORY,
            description="Render one latent moved along a direction at evenly spaced strengths from strength_min "
                        "to strength_max: a strip of images to see what a direction does. " + STRENGTH_NOTE,
            inputs=[
                StyleGANType.Input("stylegan", tooltip="The generator to render with."),
                GanLatentType.Input("latent", tooltip="One latent (a batch of one)."),
                DirectionType.Input("direction", tooltip="From SeFa, GANSpace, a boundary or Load Direction."),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip=INDEX_TOOLTIP),
                io.Float.Input("strength_min", default=-3.0, min=-100.0, max=100.0, step=0.1,
                               tooltip="The first image's strength."),
                io.Float.Input("strength_max", default=3.0, min=-100.0, max=100.0, step=0.1,
                               tooltip="The last image's strength."),
                io.Int.Input("count", default=7, min=2, max=64,
                             tooltip="How many images; an odd count over a symmetric range includes strength 0."),
                io.String.Input("layers", default=AUTO, tooltip=APPLY_LAYERS_TOOLTIP),
            ],
            outputs=[io.Image.Output(
                display_name="images",
                tooltip="One render per strength, strength_min first; connect to Save Image or "
                        "Preview Image."),
                     GanLatentType.Output(
                display_name="latents",
                tooltip="The swept latents, one per image in the same order (Save GAN Latent "
                        "saves them as one batch).")],
        )

    @classmethod
    def execute(cls, stylegan: StyleGAN, latent: GanLatent, direction: Direction, index: int, strength_min: float,
                strength_max: float, count: int, layers: str) -> io.NodeOutput:
        check_single(latent, "latent")
        check_latent_fits(latent, stylegan)
        info = stylegan.info
        check_gan_direction(direction, info.num_ws, info.w_dim, stylegan.model_id, f"generator {stylegan.name}")
        if count < 2:
            raise ValueError(f"count must be at least 2, got {count}")
        span = row_range(layers, direction, info.num_ws)
        vector, scale = vector_and_scale(direction, index)
        # lo + (hi - lo) * i / (count - 1): the middle of an odd symmetric sweep is exactly 0
        strengths = [strength_min + (strength_max - strength_min) * (i / (count - 1)) for i in range(count)]
        strengths[-1] = strength_max
        ws = sweep(latent.ws.float(), vector, [s * scale for s in strengths], span)
        noise = {k: v.expand(count, *v.shape[1:]).clone() for k, v in latent.noise.items()}
        images = render(stylegan, ws, noise)
        space = w_space([latent], ws)
        return io.NodeOutput(images, out_latent(ws, space, stylegan, noise))


class RetraceInterpolateLatents(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceInterpolateLatents",
            display_name="Retrace Interpolate Latents",
            category=GAN_CATEGORY,
            description="Render the straight path in W+ from latent_a to latent_b (count images, both ends "
                        "included). Noise maps blend with their variance kept.",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="The generator to render with."),
                GanLatentType.Input("latent_a", tooltip="The first image's latent (a batch of one)."),
                GanLatentType.Input("latent_b", tooltip="The last image's latent (a batch of one)."),
                io.Int.Input("count", default=8, min=2, max=256, tooltip="How many images, ends included."),
            ],
            outputs=[io.Image.Output(
                display_name="images",
                tooltip="count renders from latent_a to latent_b; connect to Save Image or "
                        "Preview Image."),
                     GanLatentType.Output(
                display_name="latents",
                tooltip="The interpolated latents, one per image in the same order.")],
        )

    @classmethod
    def execute(cls, stylegan: StyleGAN, latent_a: GanLatent, latent_b: GanLatent, count: int) -> io.NodeOutput:
        for what, latent in (("latent_a", latent_a), ("latent_b", latent_b)):
            check_single(latent, what)
            check_latent_fits(latent, stylegan, what)
        if count < 2:
            raise ValueError(f"count must be at least 2, got {count}")
        ws = interpolate(latent_a.ws[0].float(), latent_b.ws[0].float(), count)
        noise: dict[str, torch.Tensor] = {}
        if latent_a.noise or latent_b.noise:
            info = stylegan.info
            maps_a, maps_b = filled_noise(latent_a, info), filled_noise(latent_b, info)
            t = torch.linspace(0, 1, count)
            wa, wb = 1 - t, t
            norm = (wa ** 2 + wb ** 2).sqrt()
            wa, wb = (wa / norm).view(-1, 1, 1, 1), (wb / norm).view(-1, 1, 1, 1)
            for k in maps_a:
                blend = wa * maps_a[k] + wb * maps_b[k]
                blend[0], blend[-1] = maps_a[k][0], maps_b[k][0]  # the ends are the latents' own maps, exactly
                noise[k] = blend
        images = render(stylegan, ws, noise)
        return io.NodeOutput(images, out_latent(ws, w_space([latent_a, latent_b], ws), stylegan, noise))


class RetraceStyleMix(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceStyleMix",
            display_name="Retrace Style Mix",
            category=GAN_CATEGORY,
            description="Style mixing (Karras et al. 2019): W+ rows before the crossover from one latent (pose, "
                        "shape), the rest from another (colours, texture). Noise maps follow the rows.",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="The generator to render with."),
                GanLatentType.Input("coarse", tooltip="Gives rows 0 .. crossover-1 (one latent, or a batch as "
                                    "large as 'fine')."),
                GanLatentType.Input("fine", tooltip="Gives rows crossover .. end (one latent, or a batch as large as "
                                    "'coarse')."),
                io.Int.Input("crossover", default=4, min=0, max=64,
                             tooltip="The first W+ row taken from 'fine' (0 = all from fine; num_ws = all from "
                                     "coarse)."),
            ],
            outputs=[io.Image.Output(
                display_name="images",
                tooltip="The mixed renders; connect to Save Image or Preview Image."),
                     GanLatentType.Output(
                display_name="latents",
                tooltip="The mixed latents (one per image) with the noise maps of the rows "
                        "they came from.")],
        )

    @classmethod
    def execute(cls, stylegan: StyleGAN, coarse: GanLatent, fine: GanLatent, crossover: int) -> io.NodeOutput:
        check_latent_fits(coarse, stylegan, "coarse latent")
        check_latent_fits(fine, stylegan, "fine latent")
        info = stylegan.info
        if not 0 <= crossover <= info.num_ws:
            raise ValueError(f"crossover must be 0..{info.num_ws} for {stylegan.name} ({info.num_ws} W+ rows), "
                             f"got {crossover}")
        batch = max(coarse.batch_size, fine.batch_size)
        if {coarse.batch_size, fine.batch_size} - {1, batch}:
            raise ValueError(f"coarse holds {coarse.batch_size} latents and fine {fine.batch_size}: give one of "
                             "them a single latent, or both the same number")
        pick = [(i if coarse.batch_size > 1 else 0, i if fine.batch_size > 1 else 0) for i in range(batch)]
        ws = torch.stack([style_mix(coarse.ws[c].float(), fine.ws[f].float(), crossover) for c, f in pick])
        noise: dict[str, torch.Tensor] = {}
        if coarse.noise or fine.noise:
            maps_c, maps_f = filled_noise(coarse, info), filled_noise(fine, info)
            rows = {name: idx for name, idx, _ in info.style_layers()}
            for k in maps_c:
                source, index = (maps_c, 0) if rows.get(k, info.num_ws) < crossover else (maps_f, 1)
                noise[k] = torch.cat([source[k][p[index] if source[k].shape[0] > 1 else 0][None] for p in pick])
        images = render(stylegan, ws, noise)
        return io.NodeOutput(images, out_latent(ws, w_space([coarse, fine], ws), stylegan, noise))


# --- files ---------------------------------------------------------------------------------------------------


class RetraceSaveDirection(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return save_schema(DirectionType.Input("direction", tooltip="Any Retrace direction (StyleGAN or text)."),
                           "direction", node_id="RetraceSaveDirection", display_name="Retrace Save Direction",
                           category=GAN_CATEGORY,
                           description="Save a direction (vectors, method, generator identity, layer range, scales) to "
                                       "output/retrace/ as .safetensors. Never overwrites a file.")

    @classmethod
    def execute(cls, direction: Direction, filename_prefix: str) -> io.NodeOutput:
        return save_record(direction, filename_prefix)


class RetraceLoadDirection(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceLoadDirection",
            display_name="Retrace Load Direction",
            category=GAN_CATEGORY,
            description="Load a direction saved by Retrace Save Direction. With a generator connected, a StyleGAN "
                        "direction is checked against it before anything runs.",
            inputs=[
                record_file_input("direction_file", DIRECTION_FORMAT, "direction"),
                StyleGANType.Input("stylegan", optional=True,
                                   tooltip="If given, the direction must belong to this generator."),
            ],
            outputs=[DirectionType.Output(
                display_name="direction",
                tooltip="The saved direction; connect to Apply Direction or Direction Sweep "
                        "(StyleGAN) or Apply Prompt Direction (text).")],
        )

    @classmethod
    def validate_inputs(cls, direction_file: str) -> bool | str:
        register_folder()
        return file_exists(direction_file)

    @classmethod
    def execute(cls, direction_file: str, stylegan: StyleGAN | None = None) -> io.NodeOutput:
        register_folder()
        direction = load_direction(folder_paths.get_full_path_or_raise(RECORD_FOLDER, direction_file))
        if stylegan is not None:
            info = stylegan.info
            check_gan_direction(direction, info.num_ws, info.w_dim, stylegan.model_id, f"generator {stylegan.name}")
        return io.NodeOutput(direction, ui=summary(direction))


# --- text directions (diffusion CONDITIONING) ----------------------------------------------------------------


def prompt_lines(text: str, what: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} is empty: give one prompt per line")
    return lines


def encode_lines(clip: Any, lines: list[str], what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each line through the CLIP as CLIPTextEncode does: ([N, T, C], pooled [N, P] or None)."""
    conds, pooled = [], []
    for line in lines:
        cond, extras = clip.encode_from_tokens_scheduled(clip.tokenize(line))[0]
        conds.append(cond[:1].float().cpu())
        p = extras.get("pooled_output")
        pooled.append(None if p is None else p[:1].float().cpu())
    shapes = {tuple(c.shape[1:]) for c in conds}
    if len(shapes) > 1:
        lengths = ", ".join(f"{line[:40]!r}: {c.shape[1]}" for line, c in zip(lines, conds))
        raise ValueError(f"the {what} encode to different token lengths ({lengths}); keep every prompt short enough "
                         "for one 77-token chunk (or equally long), so the tokens stay aligned")
    have = [p is not None for p in pooled]
    return torch.cat(conds), torch.cat(pooled) if all(have) else None


class RetracePromptDirection(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetracePromptDirection",
            display_name="Retrace Prompt Direction",
            category=TEXT_CATEGORY,
            description="A text edit direction (pix2pix-zero, Parmar et al. 2023): the mean embedding of the target "
                        "prompts minus the mean of the source prompts. Add it to a prompt's conditioning with "
                        "Retrace Apply Prompt Direction (e.g. cat -> dog from many sentences about each).",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model the direction will be used with."),
                io.String.Input("source_prompts", multiline=True, default="a photo of a cat\na cat sitting",
                                tooltip="One prompt per line describing what is there now."),
                io.String.Input("target_prompts", multiline=True, default="a photo of a dog\na dog sitting",
                                tooltip="One prompt per line describing what it should become."),
            ],
            outputs=[DirectionType.Output(
                display_name="direction",
                tooltip="A text direction (mean of the target prompts minus mean of the source "
                        "prompts); connect to Apply Prompt Direction or Save Direction.")],
        )

    @classmethod
    def execute(cls, clip: Any, source_prompts: str, target_prompts: str) -> io.NodeOutput:
        if clip is None:
            raise ValueError("Retrace Prompt Direction: no CLIP is connected (a checkpoint without a text encoder?).")
        source_lines = prompt_lines(source_prompts, "source_prompts")
        target_lines = prompt_lines(target_prompts, "target_prompts")
        source, source_pooled = encode_lines(clip, source_lines, "source prompts")
        target, target_pooled = encode_lines(clip, target_lines, "target prompts")
        if source.shape[1:] != target.shape[1:]:
            raise ValueError(f"source prompts encode to {source.shape[1]} tokens of {source.shape[2]} and target "
                             f"prompts to {target.shape[1]} of {target.shape[2]}; they must match")
        if (source_pooled is None) != (target_pooled is None):
            source_pooled = target_pooled = None
        vector, pooled = prompt_direction(source, target, source_pooled, target_pooled)
        direction = Direction(vectors=vector[None], space="text", method="prompt",
                              pooled=None if pooled is None else pooled[None])
        log.info("Retrace Prompt Direction: %d source and %d target prompts, offset norm %.4f", len(source_lines),
                 len(target_lines), float(vector.norm()))
        return io.NodeOutput(direction, ui=ui.PreviewText(f"{len(source_lines)} source, {len(target_lines)} target "
                                                          f"prompts; offset norm {float(vector.norm()):.4f}"))


class RetraceApplyPromptDirection(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceApplyPromptDirection",
            display_name="Retrace Apply Prompt Direction",
            category=TEXT_CATEGORY,
            description="Add strength x a text direction to every entry of a CONDITIONING (and to its pooled "
                        "output when both have one). Returns new conditioning; the input is never changed.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="From CLIP Text Encode with the same text encoder."),
                DirectionType.Input("direction", tooltip="From Retrace Prompt Direction (or a loaded text "
                                    "direction)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="1 = the full source-to-target offset; 0 = unchanged; negative = the other "
                                       "way."),
            ],
            outputs=[io.Conditioning.Output(
                display_name="conditioning",
                tooltip="The shifted conditioning (a new copy; the input is unchanged); use "
                        "it as the edit prompt of the guider or sampler.")],
        )

    @classmethod
    def execute(cls, conditioning: list, direction: Direction, strength: float) -> io.NodeOutput:
        check_text_direction(direction, "Retrace Apply Prompt Direction")
        if direction.count != 1:
            raise ValueError(f"this text direction holds {direction.count} components; Apply Prompt Direction takes "
                             "one")
        offset = direction.vectors[0]
        pooled_offset = None if direction.pooled is None else direction.pooled[0]
        out = []
        for i, (cond, extras) in enumerate(conditioning):
            if tuple(cond.shape[1:]) != tuple(offset.shape):
                raise ValueError(f"conditioning entry {i} has {cond.shape[1]} tokens of {cond.shape[2]} values, but "
                                 f"the direction has {offset.shape[0]} of {offset.shape[1]}: it was made with another "
                                 "text encoder or a prompt of another length")
            new_extras = dict(extras)
            pooled = extras.get("pooled_output")
            if pooled is not None and pooled_offset is not None:
                if pooled.shape[-1] != pooled_offset.shape[-1]:
                    raise ValueError(f"conditioning entry {i} has a pooled output of {pooled.shape[-1]} values, but "
                                     f"the direction's has {pooled_offset.shape[-1]}")
                new_extras["pooled_output"] = shift(pooled[:, None], pooled_offset[None], strength)[:, 0]
            elif pooled_offset is not None:
                log.warning("Retrace Apply Prompt Direction: conditioning entry %d has no pooled output; only its "
                            "tokens move", i)
            out.append([shift(cond, offset, strength), new_extras])
        return io.NodeOutput(out)


def shift(cond: torch.Tensor, offset: torch.Tensor, strength: float) -> torch.Tensor:
    """cond + strength x offset, computed in float32 on cond's device and returned in cond's dtype."""
    moved = apply_prompt_direction(cond.float(), offset.to(cond.device, torch.float32), strength)
    return moved.to(cond.dtype)


NODES: list[type[io.ComfyNode]] = [
    RetraceSeFa, RetraceGANSpace, RetraceLoadBoundary, RetraceLearnBoundary, RetraceConditionalDirection,
    RetraceApplyDirection, RetraceDirectionSweep, RetraceInterpolateLatents, RetraceStyleMix, RetraceSaveDirection,
    RetraceLoadDirection, RetracePromptDirection, RetraceApplyPromptDirection,
]
