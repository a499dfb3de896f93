"""StyleGAN generators in the graph: load safely, convert to .safetensors, generate, save and load latents."""

from __future__ import annotations

import os

import folder_paths
import numpy as np
import torch

from ..inversion.gan_latent import LATENT_FORMAT, GanLatent, concat_latents, load_gan_latent
from ..models.layers import truncate
from ..models.loader import convert_to_safetensors
from ._api import RetraceNode, io, ui
from ._stylegan import (
    DTYPES,
    FOLDER,
    GanLatentType,
    StyleGAN,
    StyleGANType,
    check_latent_fits,
    generator_handle,
    latent_noise,
    read_generator,
    register_folders,
    tensor_to_image,
)
from ._records import (FOLDER as RECORD_FOLDER, file_exists, record_file_input, save_record,
                           save_schema)

CATEGORY = "Retrace/stylegan"
NOISE_MODES = ("const", "random", "none")


def generator_files() -> list[str]:
    register_folders()
    return folder_paths.get_filename_list(FOLDER)


def generator_exists(name: str) -> bool | str:
    register_folders()
    return True if folder_paths.get_full_path(FOLDER, name) is not None else \
        f"generator file not found in models/{FOLDER}/: {name}"


class RetraceStyleGANLoader(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceStyleGANLoader",
            display_name="Retrace Load StyleGAN",
            category=CATEGORY,
            description="Load a StyleGAN2, StyleGAN2-ADA or StyleGAN3 generator from models/stylegan/: NVlabs .pkl, "
                        "rosinality .pt or Retrace .safetensors. Only tensors and constructor arguments are read; "
                        "nothing in the file is ever run, and a file that asks to run anything is refused.",
            inputs=[
                io.Combo.Input("generator", options=generator_files(),
                               tooltip="A file in models/stylegan/. The architecture is read from the file."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: float32 weights, float16 at the top resolutions on a GPU as the "
                                       "original code does. float16/bfloat16: the whole generator in that precision."),
            ],
            outputs=[StyleGANType.Output(
                display_name="stylegan",
                tooltip="The generator in ComfyUI's model manager; connect to Generate, Project, Pivotal Tuning, "
                        "SeFa, GANSpace or the latent and direction loaders.")],
        )

    @classmethod
    def validate_inputs(cls, generator: str) -> bool | str:
        return generator_exists(generator)

    @classmethod
    def execute(cls, generator: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(generator_handle(read_generator(generator), generator, DTYPES[dtype]))


class RetraceStyleGANConvert(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceStyleGANConvert",
            display_name="Retrace Convert StyleGAN to .safetensors",
            category=CATEGORY,
            description="Read a generator file safely once and write it beside itself as Retrace .safetensors "
                        "(tensors plus the architecture in the metadata). Never overwrites a file. The same as "
                        "`python -m models.convert` in the Retrace folder.",
            inputs=[io.Combo.Input("generator", options=generator_files(), tooltip="A file in models/stylegan/.")],
            outputs=[io.String.Output(display_name="path",
                                       tooltip="Full path of the new .safetensors in models/stylegan/; refresh "
                                               "the node lists and pick it in Retrace Load StyleGAN.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, generator: str) -> bool | str:
        return generator_exists(generator)

    @classmethod
    def execute(cls, generator: str) -> io.NodeOutput:
        source = folder_paths.get_full_path_or_raise(FOLDER, generator)
        if source.endswith(".safetensors"):
            raise ValueError(f"{generator} is already a .safetensors file; nothing to convert.")
        target = os.path.splitext(source)[0] + ".safetensors"
        if os.path.exists(target):
            raise ValueError(f"{os.path.basename(target)} already exists in models/{FOLDER}/; load that one "
                             "(Retrace never overwrites a file).")
        written = convert_to_safetensors(source, target)
        return io.NodeOutput(str(written), ui=ui.PreviewText(f"wrote models/{FOLDER}/{os.path.basename(written)}"))


def seed_latents(G: torch.nn.Module, seed: int, batch_size: int, class_index: int) -> torch.Tensor:
    """z for seeds seed .. seed+batch-1, drawn as the NVlabs scripts draw them, so seeds give the same images."""
    z = np.concatenate([np.random.RandomState(s % (2 ** 32)).randn(1, G.z_dim) for s in range(seed, seed + batch_size)])
    device = next(G.parameters()).device
    z = torch.from_numpy(z).float().to(device)
    c = None
    if G.c_dim:
        if not 0 <= class_index < G.c_dim:
            raise ValueError(f"class_index must be in 0..{G.c_dim - 1} for this conditional generator, got {class_index}")
        c = torch.zeros(batch_size, G.c_dim, device=device)
        c[:, class_index] = 1
    return G.mapping(z, c)


def noise_for(G: torch.nn.Module, mode: str, seed: int, batch: int) -> tuple[str, dict[str, torch.Tensor] | None]:
    """'random' noise drawn from the seed (reproducible) and passed as explicit maps."""
    if mode != "random":
        return mode, None
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    maps = {k: torch.randn(batch, 1, *v.shape, generator=gen).to(device) for k, v in G.noise_maps().items()}
    return "const", maps


class RetraceStyleGANGenerate(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceStyleGANGenerate",
            display_name="Retrace StyleGAN Generate",
            category=CATEGORY,
            description="Render images from seeds (seed, seed+1, ... as the NVlabs scripts number them) or from a "
                        "latent. Truncation pulls w toward the generator's mean w_avg.",
            inputs=[
                StyleGANType.Input("stylegan", tooltip="From Retrace Load StyleGAN or Pivotal Tuning."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 32 - 1, control_after_generate=True,
                             tooltip="The first seed; the batch uses consecutive seeds. Ignored when a latent is given."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="How many seeds to render."),
                io.Float.Input("truncation_psi", default=0.7, min=-2.0, max=2.0, step=0.05,
                               tooltip="1 = no truncation; smaller stays closer to the average image. Seeds only: a "
                                       "given latent renders as it is."),
                io.Int.Input("truncation_cutoff", default=0, min=0, max=64,
                             tooltip="Truncate only the first N rows of W+ (coarse layers); 0 = all rows."),
                io.Combo.Input("noise_mode", options=list(NOISE_MODES), default="const",
                               tooltip="const: the generator's fixed noise (or the latent's optimised maps); random: "
                                       "fresh noise from the seed; none: no noise. The maps used go with the output "
                                       "latent. StyleGAN3 has none."),
                io.Int.Input("class_index", default=0, min=0, max=100000,
                             tooltip="Class for conditional generators; ignored otherwise."),
                GanLatentType.Input("latent", optional=True,
                                    tooltip="Render this latent (from projection or a saved file) instead of seeds."),
            ],
            outputs=[io.Image.Output(display_name="image",
                                     tooltip="One render per seed (or per latent) at the generator's resolution; "
                                             "connect to Save Image or Preview Image."),
                     GanLatentType.Output(display_name="latent",
                                          tooltip="The W/W+ latents of these renders; connect to Apply Direction, "
                                                  "Direction Sweep, Style Mix or Save GAN Latent.")],
        )

    @classmethod
    def execute(cls, stylegan: StyleGAN, seed: int, batch_size: int, truncation_psi: float, truncation_cutoff: int,
                noise_mode: str, class_index: int, latent: GanLatent | None = None) -> io.NodeOutput:
        if latent is not None:
            check_latent_fits(latent, stylegan)
        G = stylegan.load()
        device = next(G.parameters()).device
        cutoff = truncation_cutoff or None
        with torch.no_grad():
            if latent is None:
                ws = truncate(seed_latents(G, seed, batch_size, class_index), G.mapping.w_avg, truncation_psi, cutoff)
                space = "w" if truncation_psi == 1 or cutoff is None or cutoff >= G.num_ws else "w+"
                noise = None
            else:
                ws = latent.ws.to(device)
                space = latent.space
                noise = latent_noise(latent, device) if noise_mode == "const" else None
            mode, drawn = noise_for(G, noise_mode, seed, ws.shape[0])
            if drawn is not None:
                noise = drawn
            elif noise_mode == "none":
                noise = {k: torch.zeros(ws.shape[0], 1, *v.shape, device=device) for k, v in G.noise_maps().items()}
            image = G.synthesis(ws, noise_mode=mode, noise=noise)
        # The maps this render used go with its latent, so rendering the latent again (const) gives the same image.
        out = GanLatent(ws=ws.float().cpu(), space=space, model_id=stylegan.model_id, family=stylegan.family,
                        noise={k: v.float().cpu() for k, v in (noise or {}).items()})
        return io.NodeOutput(tensor_to_image(image), out)


class RetraceGANLatentSave(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return save_schema(GanLatentType.Input("latent", tooltip="From Project, Generate or Load GAN Latent."),
                           "gan_latent", node_id="RetraceGANLatentSave", display_name="Retrace Save GAN Latent",
                           category=CATEGORY,
                           description="Save a GAN latent (W or W+, noise maps, generator identity) to output/retrace/ "
                                       "as .safetensors. Never overwrites a file.")

    @classmethod
    def execute(cls, latent: GanLatent, filename_prefix: str) -> io.NodeOutput:
        return save_record(latent, filename_prefix)


class RetraceGANLatentLoad(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceGANLatentLoad",
            display_name="Retrace Load GAN Latent",
            category=CATEGORY,
            description="Load a saved GAN latent and check that it fits the generator.",
            inputs=[record_file_input("latent_file", LATENT_FORMAT, "GAN latent"),
                    StyleGANType.Input("stylegan", tooltip="The generator the latent will be rendered with.")],
            outputs=[GanLatentType.Output(display_name="latent",
                                          tooltip="The saved W/W+ latent with its noise maps; connect to Generate, "
                                                  "Apply Direction or Pivotal Tuning.")],
        )

    @classmethod
    def validate_inputs(cls, latent_file: str) -> bool | str:
        return file_exists(latent_file)

    @classmethod
    def execute(cls, latent_file: str, stylegan: StyleGAN) -> io.NodeOutput:
        latent = load_gan_latent(folder_paths.get_full_path_or_raise(RECORD_FOLDER, latent_file))
        check_latent_fits(latent, stylegan, f"latent file {latent_file}")
        return io.NodeOutput(latent)


class RetraceGANLatentPick(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceGANLatentPick",
            display_name="Retrace Pick GAN Latent",
            category=CATEGORY,
            description="Take some latents out of a batch (from Generate, a batch projection or Load GAN Latent): "
                        "count latents from index on, noise maps included. The batch itself is left as it was.",
            inputs=[GanLatentType.Input("latent", tooltip="A batch of latents."),
                    io.Int.Input("index", default=0, min=0, max=4095,
                                 tooltip="The first latent to take, counting from 0 (the first image of the batch)."),
                    io.Int.Input("count", default=1, min=1, max=4096,
                                 tooltip="How many consecutive latents to take; 1 for the nodes that take one latent.")],
            outputs=[GanLatentType.Output(display_name="latent",
                                          tooltip="The chosen latents as a batch of count; connect to Direction Sweep, "
                                                  "Interpolate Latents, Apply Direction or Generate.")],
        )

    @classmethod
    def execute(cls, latent: GanLatent, index: int, count: int) -> io.NodeOutput:
        if index + count > latent.batch_size:
            raise ValueError(f"cannot take latents {index} to {index + count - 1}: the batch holds "
                             f"{latent.batch_size} (0 to {latent.batch_size - 1}). Lower index or count.")
        return io.NodeOutput(latent.rows(slice(index, index + count)))


class RetraceGANLatentBatch(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceGANLatentBatch",
            display_name="Retrace Batch GAN Latents",
            category=CATEGORY,
            description="Join two latents (or batches) of the same generator into one batch, latent_a first: e.g. "
                        "several projected photos as the positive examples of Learn Boundary.",
            inputs=[GanLatentType.Input("latent_a", tooltip="The first latents of the batch."),
                    GanLatentType.Input("latent_b", tooltip="Appended after latent_a; same generator and space (W or "
                                                            "W+).")],
            outputs=[GanLatentType.Output(display_name="latent",
                                          tooltip="latent_a's batch followed by latent_b's; connect to Learn Boundary, "
                                                  "Generate or Save GAN Latent. Noise maps are kept when both have "
                                                  "them.")],
        )

    @classmethod
    def execute(cls, latent_a: GanLatent, latent_b: GanLatent) -> io.NodeOutput:
        if latent_a.model_id != latent_b.model_id:
            raise ValueError(f"latent_a and latent_b come from different generators ({latent_a.model_id} vs "
                             f"{latent_b.model_id}); a batch holds latents of one generator.")
        if latent_a.space != latent_b.space:
            raise ValueError(f"latent_a is in {latent_a.space.upper()} and latent_b in {latent_b.space.upper()}; "
                             "batch latents of one space (project both in W, or both in W+).")
        return io.NodeOutput(concat_latents([latent_a, latent_b]))


NODES: list[type[io.ComfyNode]] = [RetraceStyleGANLoader, RetraceStyleGANConvert, RetraceStyleGANGenerate,
                                   RetraceGANLatentSave, RetraceGANLatentLoad, RetraceGANLatentPick,
                                   RetraceGANLatentBatch]
