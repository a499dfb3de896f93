"""Small image helpers for the demo and the end-to-end tests: a synthetic test image, PSNR, a side-by-side grid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from inversion.vae_refine import psnr as core_psnr


def make_test_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with smooth gradients, a disc and a bar: structure a model can reconstruct."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    r = 0.2 + 0.6 * x
    g = 0.3 + 0.5 * y
    b = 0.5 + 0.3 * np.sin(2 * np.pi * (x + y))
    img = np.stack([r, g, b], axis=-1)
    cx, cy, radius = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), 0.22
    disc = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
    img[disc] = [0.9, 0.75, 0.2]
    bar = (np.abs(y - 0.8) < 0.06) & (x > 0.15) & (x < 0.85)
    img[bar] = [0.15, 0.2, 0.6]
    return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def load_rgb(data: bytes | str | Path) -> np.ndarray:
    """An image file (path or bytes) as float32 RGB in [0, 1], [height, width, 3], EXIF-rotated as LoadImage does."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(source) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.float32) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1] of the same shape: the core's measure, on arrays."""
    return core_psnr(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b)))


def image_batch(size: int = 64, batch: int = 1) -> torch.Tensor:
    """:func:`make_test_image` as an IMAGE batch [batch, size, size, 3] in [0, 1], each image from its own seed."""
    return torch.stack([torch.from_numpy(np.asarray(make_test_image(size, seed), dtype=np.float32) / 255.0)
                        for seed in range(batch)])


def side_by_side(images: list[np.ndarray], gap: int = 4) -> Image.Image:
    """Images of the same height next to each other on white, separated by ``gap`` pixels."""
    height = max(img.shape[0] for img in images)
    width = sum(img.shape[1] for img in images) + gap * (len(images) - 1)
    canvas = np.ones((height, width, 3), dtype=np.float32)
    x = 0
    for img in images:
        canvas[: img.shape[0], x: x + img.shape[1]] = img[..., :3]
        x += img.shape[1] + gap
    return Image.fromarray(np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
