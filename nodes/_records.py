"""Retrace's record files (inversions, null-text, GAN latents, directions) in the host's folders: where they are
saved and found, checked names and paths, and the schemas of the save and load nodes."""

from __future__ import annotations

import os
from typing import Any

import folder_paths

from ..inversion.record import record_format
from ._api import io, ui
from ._host import check_fits, check_latent

FOLDER = "retrace_inversions"
OUTPUT_SUBFOLDER = "retrace"


def register_folder() -> None:
    """Saved inversions live in output/retrace/; users may also keep them in models/retrace_inversions/."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBFOLDER),
             os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


# A file name's part from the prefix: the counter and extension add 18 characters, and file systems allow 255.
MAX_NAME = 200


def free_path(filename_prefix: str) -> tuple[str, str]:
    """A path under the output directory that does not exist yet (not even as a dangling link), and its name
    relative to output/retrace. The folder's real path (links resolved) must lie inside the output directory."""
    if "\x00" in filename_prefix:
        raise ValueError(f"filename_prefix {filename_prefix!r} holds a NUL character; use letters, digits, '_', '-' "
                         f"and '/' for subfolders.")
    name_part = filename_prefix.replace("\\", "/").rsplit("/", 1)[-1]
    if len(name_part) > MAX_NAME:
        raise ValueError(f"filename_prefix's file name is {len(name_part)} characters long; at most {MAX_NAME} fit a "
                         f"file name. Shorten it.")
    out_dir = os.path.join(folder_paths.get_output_directory(), OUTPUT_SUBFOLDER)
    root = os.path.realpath(folder_paths.get_output_directory())
    # Checked before the host's own check (newer hosts have one, with a bare message; older ones none).
    real = os.path.realpath(os.path.join(out_dir, os.path.dirname(os.path.normpath(filename_prefix))))
    if os.path.commonpath([root, real]) != root:
        raise ValueError(f"filename_prefix {filename_prefix!r} leads to {real}, outside the output folder {root} "
                         f"(through '..' or a symbolic link); choose a prefix whose folders are inside the output folder.")
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    while True:
        file = f"{name}_{counter:05}.safetensors"
        path = os.path.join(folder, file)
        if not os.path.lexists(path):
            return path, os.path.join(subfolder, file)
        counter += 1


def save_record(record: Any, filename_prefix: str) -> io.NodeOutput:
    """Save anything with a ``save(path)`` method (inversions, null-text, GAN latents, directions)."""
    path, relative = free_path(filename_prefix)
    record.save(path)
    return io.NodeOutput(ui=ui.PreviewText(f"saved {relative}"))


def load_record(kind: type, file: str, model, latent: dict | None, what: str) -> io.NodeOutput:
    record = kind.load(folder_paths.get_full_path_or_raise(FOLDER, file))
    shape = None if latent is None else tuple(check_latent(model, latent).shape)
    check_fits(record, model, f"{what} {file}", shape)
    return io.NodeOutput(record)


def record_files(file_format: str) -> list[str]:
    """The records of one kind in output/retrace/ and models/retrace_inversions/ (told apart by their headers), so
    each load node lists only the files it can load."""
    register_folder()
    return [name for name in folder_paths.get_filename_list(FOLDER)
            if record_format(folder_paths.get_full_path(FOLDER, name) or "") == file_format]


def record_file_input(name: str, file_format: str, what: str) -> io.Combo.Input:
    return io.Combo.Input(name, options=record_files(file_format),
                          tooltip=f"A saved {what} from output/retrace/ or models/retrace_inversions/ (only {what} "
                                  "files are listed).")


def file_exists(file: str) -> bool | str:
    return True if folder_paths.get_full_path(FOLDER, file) is not None else f"file not found: {file}"


def file_inputs(name: str, file_format: str, what: str) -> list:
    """The load nodes' inputs: the file, the model it must fit and, optionally, a latent."""
    return [
        record_file_input(name, file_format, what),
        io.Model.Input("model", tooltip=f"The model the {what} will be used with."),
        io.Latent.Input("latent", optional=True, tooltip=f"If given, its shape must match the {what}'s."),
    ]


def save_schema(record: io.Input, prefix: str, *, node_id: str, display_name: str, category: str,
                description: str) -> io.Schema:
    return io.Schema(
        node_id=node_id, display_name=display_name, category=category, description=description,
        inputs=[record, io.String.Input("filename_prefix", default=prefix,
                                        tooltip="Name prefix under output/retrace/; a counter is appended.")],
        outputs=[], is_output_node=True)


def load_schema(file_input: str, file_format: str, what: str, output: io.Output, *, node_id: str,
                display_name: str, category: str, description: str) -> io.Schema:
    return io.Schema(node_id=node_id, display_name=display_name, category=category, description=description,
                     inputs=file_inputs(file_input, file_format, what), outputs=[output])
