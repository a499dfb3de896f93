"""Invert an image and reconstruct it through the real host server, headless: `make demo [CKPT=...] [IMAGE=...]`.

Runs workflows/sd15_invert_reconstruct.json (DDIM inversion with the source prompt, then sampling back
with the same prompt). Without CKPT it uses a generated tiny SD1.5 checkpoint with random weights (a
plumbing demo: expect a low PSNR); without IMAGE a generated 64x64 test image. The user's files are only
read; the image is copied into the demo server's own input directory. Writes input.png, reconstruction.png,
grid.png and psnr.txt to the output directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .comfy_server import CACHE, ROOT, ComfyServer, ensure_tiny_checkpoint, history_images
from .images import load_rgb, make_test_image, psnr, side_by_side
from .workflow_api import fill_load_image, load_workflow, nodes_of_type, set_inputs, ui_to_api

log = logging.getLogger("retrace.demo")
WORKFLOW = ROOT / "workflows" / "sd15_invert_reconstruct.json"
RUN_DIR = CACHE / "demo" / "run"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def crop_like_vae(img: np.ndarray, factor: int = 8) -> np.ndarray:
    """Centre-crop to a multiple of ``factor`` as the host does before encoding (VAE.vae_encode_crop_pixels)."""
    h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    y, x = (img.shape[0] % factor) // 2, (img.shape[1] % factor) // 2
    return img[y: y + h, x: x + w]


def only(ids: list[str], what: str) -> str:
    if len(ids) != 1:
        raise RuntimeError(f"{WORKFLOW.name} should have exactly one {what}; found {len(ids)}")
    return ids[0]


def run_demo(ckpt: Path | None, image: Path | None, out: Path, steps: int | None, prompt_text: str | None) -> float:
    """Run the reconstruction workflow; write the demo files; return the PSNR in dB."""
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    if image is not None and (not image.is_file() or image.suffix.lower() not in IMAGE_EXTENSIONS):
        raise FileNotFoundError(f"not an image file: {image}")
    if ckpt is None:
        log.info("no CKPT given: writing/using the seeded tiny SD1.5 checkpoint (random weights)")
        ckpt = ensure_tiny_checkpoint()
    out.mkdir(parents=True, exist_ok=True)

    with ComfyServer(run_dir=RUN_DIR, checkpoint_dirs=[ckpt.parent]) as server:
        if image is not None:
            image_name = server.add_input_file(image, f"retrace_demo_input{image.suffix.lower()}")
        else:
            image_name = "retrace_demo_input.png"
            make_test_image(64).save(server.input_dir / image_name)
        client = server.client()
        prompt = ui_to_api(load_workflow(WORKFLOW), client.object_info())
        set_inputs(prompt, only(nodes_of_type(prompt, "CheckpointLoaderSimple"), "checkpoint loader"),
                   ckpt_name=ckpt.name)
        fill_load_image(prompt, image_name)
        if steps is not None:
            set_inputs(prompt, only(nodes_of_type(prompt, "RetraceInvert"), "RetraceInvert"), steps=steps)
        if prompt_text is not None:
            for nid in nodes_of_type(prompt, "CLIPTextEncode"):
                set_inputs(prompt, nid, text=prompt_text)
        log.info("running %s on %s with %s", WORKFLOW.name, image_name, ckpt.name)
        start = time.monotonic()
        entry = client.run(prompt, timeout=3600)
        log.info("workflow finished in %.1f s", time.monotonic() - start)

        saved = history_images(entry, only(nodes_of_type(prompt, "SaveImage"), "SaveImage"))
        if len(saved) != 1:
            raise RuntimeError(f"expected one saved image, got {saved}")
        encoder = only(nodes_of_type(prompt, "RetraceVAEEncodeForInversion"), "encoder")
        for text in entry["outputs"].get(encoder, {}).get("text", []):
            log.info("VAE round trip alone (the ceiling for the reconstruction): %s", text)
        rec = saved[0]
        reconstruction = load_rgb(client.view(rec["filename"], rec.get("subfolder", ""), rec.get("type", "output")))

    original = crop_like_vae(load_rgb(server.input_dir / image_name))
    if original.shape != reconstruction.shape:
        raise RuntimeError(f"reconstruction {reconstruction.shape} does not match the input {original.shape}")
    value = psnr(reconstruction, original)
    side_by_side([original]).save(out / "input.png")
    side_by_side([reconstruction]).save(out / "reconstruction.png")
    side_by_side([original, reconstruction]).save(out / "grid.png")
    (out / "psnr.txt").write_text(f"{value:.2f}\n", encoding="utf-8")
    log.info("wrote input.png, reconstruction.png, grid.png, psnr.txt to %s", out)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="", help="an SD1.x checkpoint file (default: a generated tiny one)")
    parser.add_argument("--image", default="", help="an image file (default: a generated 64x64 test image)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--steps", type=int, default=None, help="inversion steps (default: the workflow's 50)")
    parser.add_argument("--prompt", default=None, help="the source prompt (default: the workflow's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt = Path(args.ckpt).expanduser().resolve() if args.ckpt.strip() else None
    image = Path(args.image).expanduser().resolve() if args.image.strip() else None
    value = run_demo(ckpt, image, args.out, args.steps, args.prompt)
    print(f"PSNR of the reconstruction vs the input: {value:.2f} dB ({args.out}/grid.png)")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
