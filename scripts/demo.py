"""Edit a picture through the real host server, headless: `make demo [CKPT=... IMAGE=... SOURCE="..." TARGET="..."]`.

Runs workflows/sd15_toy_world_edit.json, the recommended edit: DDIM inversion, then the source pass and the edit
pass under direct inversion's guider, with Prompt-to-Prompt word swap and a local blend on the swapped words.

- Without CKPT it edits a toy-world picture (models/toy_world/, the weights the pack ships) three times: a colour
  swap, a shape swap and a background swap, each with its exact answer known, and reports whether each edit took
  (the attribute read back from the result) and how much of the rest stayed (PSNR outside the edit's mask).
- With CKPT (an SD1.x checkpoint), IMAGE, SOURCE and TARGET it makes that one edit of the user's photo. The
  user's files are only read; the image is copied into the demo server's own input directory.

Writes source.png, reconstruction.png, one edit_*.png and mask_*.png (its local-blend mask) per edit, grid.png
(the pictures in a row, each edit's mask under it) and numbers.txt to the output directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .comfy_server import CACHE, ROOT, ComfyClient, ComfyServer, history_images
from .images import load_rgb, psnr, side_by_side
from .workflow_api import ApiPrompt, fill_load_image, load_workflow, nodes_of_type, set_inputs, ui_to_api

log = logging.getLogger("retrace.demo")
WORKFLOW = ROOT / "workflows" / "sd15_toy_world_edit.json"
RUN_DIR = CACHE / "demo" / "run"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
TOY_SEED = 0  # the bench's first scene (bench/quality.py: models/toy_world.py's edit_set(count, seed=0))
GRID_SCALE = 4  # toy pictures are 64 x 64: the grid shows them four times larger


@dataclass
class EditSpec:
    name: str  # the file stem: edit_<name>.png
    source: str
    target: str
    check: object | None = None  # the toy world's Edit (its exact answer), None for a user's photo


def crop_like_vae(img: np.ndarray, factor: int = 8) -> np.ndarray:
    """Centre-crop to a multiple of ``factor`` as the host does before encoding (VAE.vae_encode_crop_pixels)."""
    h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    y, x = (img.shape[0] % factor) // 2, (img.shape[1] % factor) // 2
    return img[y: y + h, x: x + w]


def only(ids: list[str], what: str) -> str:
    if len(ids) != 1:
        raise RuntimeError(f"{WORKFLOW.name} should have exactly one {what}; found {len(ids)}")
    return ids[0]


def saved_image(client: ComfyClient, entry: dict, node_id: str) -> np.ndarray:
    saved = history_images(entry, node_id)
    if len(saved) != 1:
        raise RuntimeError(f"expected one saved image from node {node_id}, got {saved}")
    record = saved[0]
    return load_rgb(client.view(record["filename"], record.get("subfolder", ""), record.get("type", "output")))


def save_pictures(pictures: dict[str, np.ndarray], masks: dict[str, np.ndarray], out: Path, scale: int) -> None:
    """Each picture and mask as a file; grid.png: the pictures in a row, each edit's blend mask under it."""
    for name, picture in {**pictures, **masks}.items():
        side_by_side([picture]).save(out / f"{name}.png")
    blank = np.ones_like(next(iter(pictures.values())))
    under = [masks.get(name.replace("edit_", "mask_", 1), blank) for name in pictures]
    top, bottom = side_by_side(list(pictures.values())), side_by_side(under)
    grid = Image.new("RGB", (top.width, top.height + 4 + bottom.height), "white")
    grid.paste(top, (0, 0))
    grid.paste(bottom, (0, top.height + 4))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(out / "grid.png")


def toy_edits() -> tuple[np.ndarray, list[EditSpec]]:
    """The toy-world picture and its three edits (colour, shape, background), with their exact answers."""
    from models import toy_world as tw

    edits = tw.edit_set(3, seed=TOY_SEED)
    picture = tw.render(edits[0].source).numpy()
    return picture, [EditSpec(e.kind, e.source.prompt, e.target.prompt, e) for e in edits]


def toy_numbers(edit: EditSpec, result: np.ndarray, source: np.ndarray) -> str:
    """Whether the edit took (read back from the picture) and the PSNR outside its mask, as one line."""
    from models import toy_world as tw

    e = edit.check
    attribute = "background" if e.kind == "background" else f"{e.kind}{e.thing}"
    read = tw.read_attributes(torch.from_numpy(result))[attribute]
    keep = ~tw.edit_mask(e).numpy()
    background = psnr(result[keep], source[keep])
    return (f"{edit.name}: {e.old_word} -> {e.new_word}: read back {read!r} ({'took' if read == e.new_word else 'DID NOT take'}); "
            f"PSNR outside the edit's mask {background:.1f} dB")


def run_demo(ckpt: Path | None, image: Path | None, source: str | None, target: str | None, out: Path,
             steps: int | None) -> list[str]:
    """Run the edit workflow once per edit; write the demo files; return the lines of numbers.txt."""
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    if image is not None and (not image.is_file() or image.suffix.lower() not in IMAGE_EXTENSIONS):
        raise FileNotFoundError(f"not an image file: {image} (give a {', '.join(sorted(IMAGE_EXTENSIONS))} file)")
    if ckpt is not None and (image is None or not source or not target):
        raise ValueError("a demo on your checkpoint needs IMAGE, SOURCE and TARGET too: make demo CKPT=model.safetensors "
                         "IMAGE=photo.png SOURCE=\"a photo of a cat\" TARGET=\"a photo of a dog\"")
    if ckpt is None and (image is not None or source or target):
        raise ValueError("IMAGE, SOURCE and TARGET go with CKPT (an SD1.x checkpoint); without CKPT the demo edits the "
                         "toy world's own picture.")
    out.mkdir(parents=True, exist_ok=True)
    image_name = "retrace_demo_input.png"
    with ComfyServer(run_dir=RUN_DIR, checkpoint_dirs=[ckpt.parent] if ckpt else []) as server:
        if ckpt is None:
            picture, edits = toy_edits()
            Image.fromarray(np.clip(picture * 255 + 0.5, 0, 255).astype(np.uint8)).save(server.input_dir / image_name)
        else:
            image_name = server.add_input_file(image, f"retrace_demo_input{image.suffix.lower()}")
            edits = [EditSpec("edit", source, target)]
        client = server.client()
        prompt = ui_to_api(load_workflow(WORKFLOW), client.object_info())
        if ckpt is not None:
            loader = only(nodes_of_type(prompt, "RetraceLoadToyWorld"), "toy-world loader")
            # The checkpoint loader gives MODEL, CLIP and VAE in the toy loader's slots.
            prompt[loader] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt.name}}
        fill_load_image(prompt, image_name)
        if steps is not None:
            set_inputs(prompt, only(nodes_of_type(prompt, "RetraceInvert"), "RetraceInvert"), steps=steps)
        pictures = {"source": crop_like_vae(load_rgb(server.input_dir / image_name))}
        masks: dict[str, np.ndarray] = {}
        lines = []
        for edit in edits:
            set_pair(prompt, edit)
            log.info("editing %r -> %r", edit.source, edit.target)
            started = time.monotonic()
            entry = client.run(prompt, timeout=3600)
            log.info("edit finished in %.1f s", time.monotonic() - started)
            result = saved_image(client, entry, save_node(prompt, "retrace_toy_world_edit"))
            if "reconstruction" not in pictures:
                pictures["reconstruction"] = saved_image(client, entry,
                                                         save_node(prompt, "retrace_toy_world_reconstruction"))
                lines.append(f"reconstruction (source prompt, guidance 7.5): PSNR "
                             f"{psnr(pictures['reconstruction'], pictures['source']):.1f} dB")
            pictures[f"edit_{edit.name}"] = result
            masks[f"mask_{edit.name}"] = saved_image(client, entry, save_node(prompt, "retrace_toy_world_blend_mask"))
            lines.append(toy_numbers(edit, result, pictures["source"]) if edit.check is not None else
                         f"edit {edit.source!r} -> {edit.target!r}: PSNR to the source {psnr(result, pictures['source']):.1f} dB")
    save_pictures(pictures, masks, out, GRID_SCALE if ckpt is None else 1)
    (out / "numbers.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("wrote %s and numbers.txt to %s", ", ".join(f"{n}.png" for n in [*pictures, *masks, "grid"]), out)
    return lines


def set_pair(prompt: ApiPrompt, edit: EditSpec) -> None:
    set_inputs(prompt, only(nodes_of_type(prompt, "RetracePromptPair"), "Prompt Pair"), source=edit.source,
               target=edit.target)


def save_node(prompt: ApiPrompt, prefix: str) -> str:
    return only([nid for nid in nodes_of_type(prompt, "SaveImage")
                 if prompt[nid]["inputs"].get("filename_prefix") == prefix], f"SaveImage {prefix!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="", help="an SD1.x checkpoint file (default: the toy world)")
    parser.add_argument("--image", default="", help="the photo to edit (with --ckpt)")
    parser.add_argument("--source", default="", help="a prompt that describes the photo (with --ckpt)")
    parser.add_argument("--target", default="", help="the same prompt with the words to change changed (with --ckpt)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--steps", type=int, default=None, help="inversion steps (default: the workflow's 50)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt = Path(args.ckpt).expanduser().resolve() if args.ckpt.strip() else None
    image = Path(args.image).expanduser().resolve() if args.image.strip() else None
    lines = run_demo(ckpt, image, args.source.strip() or None, args.target.strip() or None, args.out, args.steps)
    print("\n".join(lines) + f"\n(pictures: {args.out}/grid.png)")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
