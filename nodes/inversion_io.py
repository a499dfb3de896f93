"""Save an inversion to .safetensors and load it back, checked against the model and latent it meets."""

from __future__ import annotations

import os

import folder_paths

from ..inversion.record import Inversion
from ._api import io, ui
from ._host import Inversion as InversionType, check_latent, model_family, model_name

FOLDER = "retrace_inversions"
OUTPUT_SUBFOLDER = "retrace"


def register_folder() -> None:
    """Saved inversions live in output/retrace/; users may also keep them in models/retrace_inversions/."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBFOLDER),
             os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


def free_path(filename_prefix: str) -> tuple[str, str]:
    """A path under the output directory that does not exist yet, and its name relative to output/retrace."""
    out_dir = os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBFOLDER)
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    while True:
        file = f"{name}_{counter:05}.safetensors"
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            return path, os.path.join(subfolder, file)
        counter += 1


class RetraceSaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RetraceSaveInversion",
            display_name="Retrace Save Inversion",
            category="Retrace/inversion",
            description="Save an inversion (noise, trajectory, sigmas, model family and shapes) to "
                        "output/retrace/ as .safetensors. Never overwrites a file.",
            inputs=[
                InversionType.Input("inversion"),
                io.String.Input("filename_prefix", default="inversion",
                                tooltip="Name prefix under output/retrace/; a counter is appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion: Inversion, filename_prefix: str) -> io.NodeOutput:
        path, relative = free_path(filename_prefix)
        inversion.save(path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {relative}"))


class RetraceLoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="RetraceLoadInversion",
            display_name="Retrace Load Inversion",
            category="Retrace/inversion",
            description="Load a saved inversion and check that it fits the model (and latent, if given); "
                        "a mismatch is named before anything runs.",
            inputs=[
                io.Combo.Input("inversion_file", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="From output/retrace/ or models/retrace_inversions/."),
                io.Model.Input("model", tooltip="The model the inversion will be used with."),
                io.Latent.Input("latent", optional=True, tooltip="If given, its shape must match the inversion's."),
            ],
            outputs=[InversionType.Output()],
        )

    @classmethod
    def validate_inputs(cls, inversion_file: str, **_) -> bool | str:
        if folder_paths.get_full_path(FOLDER, inversion_file) is None:
            return f"inversion file not found: {inversion_file}"
        return True

    @classmethod
    def execute(cls, inversion_file: str, model, latent: dict | None = None) -> io.NodeOutput:
        inv = Inversion.load(folder_paths.get_full_path_or_raise(FOLDER, inversion_file))
        shape = None if latent is None else tuple(check_latent(model, latent).shape)
        inv.check(family=model_family(model), model_name=model_name(model), latent_shape=shape,
                  what=f"inversion file {inversion_file}")
        return io.NodeOutput(inv)


NODES = [RetraceSaveInversion, RetraceLoadInversion]
