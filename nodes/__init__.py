"""Retrace's ComfyUI nodes (V3). Thin adapters from host objects to the core in inversion/ and editing/."""

from __future__ import annotations

from ._api import ComfyExtension, io
from .attention import NODES as ATTENTION_NODES
from .directions import NODES as DIRECTION_NODES, register_direction_folder
from .gan_projection import NODES as GAN_PROJECTION_NODES
from .inversion import NODES as INVERSION_NODES
from .inversion_guiders import NODES as GUIDER_NODES
from ._records import register_folder
from .inversion_io import NODES as INVERSION_IO_NODES
from .null_text import NODES as NULL_TEXT_NODES
from ._stylegan import register_folders
from .samplers import NODES as SAMPLER_NODES
from .stylegan import NODES as STYLEGAN_NODES
from .toy_world import NODES as TOY_WORLD_NODES
from .vae_encode import NODES as VAE_NODES

ALL_NODES: list[type[io.ComfyNode]] = [*VAE_NODES, *INVERSION_NODES, *SAMPLER_NODES, *INVERSION_IO_NODES,
                                        *NULL_TEXT_NODES, *GUIDER_NODES, *ATTENTION_NODES,
                                        *STYLEGAN_NODES, *GAN_PROJECTION_NODES, *DIRECTION_NODES, *TOY_WORLD_NODES]


class RetraceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_folder()
        register_folders()
        register_direction_folder()
        return ALL_NODES
