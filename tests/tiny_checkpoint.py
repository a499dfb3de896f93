"""A tiny single-file SD1.5 checkpoint with random weights, in the host's own key layout (GUIDE section 2).

The UNet is shrunk (model_channels 320, channel_mult [1], one res block, one transformer: the host still
detects SD15); the VAE and CLIP-L have the host's fixed full-size configs. Every tensor is drawn from one
seeded generator, so the file is the same on every machine. It is written at test time into the
git-ignored cache, never into the repo. Run as a script to write it: ``python tests/tiny_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import CACHE, ensure_host  # noqa: E402

log = logging.getLogger("retrace.tiny_checkpoint")

# Bump when the layout or the initialisation changes: the cache is keyed by it.
VERSION = "v2"
SEED = 20240607
CKPT_DIR = CACHE / "tiny" / "checkpoints"
CKPT_NAME = f"retrace_tiny_sd15_{VERSION}.safetensors"

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "context_dim": 768,
    "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
    "num_heads": 8, "num_head_channels": -1, "legacy": False,
}
# The UNet's output convolution is scaled down (LDM initialises it to zero): an untrained random UNet's noise
# prediction is rough in its input, and at sigma ~15 that roughness swamps a DDIM round trip. Gentler, the
# round trip behaves like a trained model's (the error shrinks with steps and is small at 16), so the
# end-to-end tests and the demo can check reconstruction, not only plumbing.
UNET_OUT_KEY = "model.diffusion_model.out.2.weight"
UNET_OUT_SCALE = 0.02
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def checkpoint_path() -> Path:
    return CKPT_DIR / CKPT_NAME


def seeded_values(state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh values for every floating tensor, in sorted key order so the result depends on the seed alone.

    Matrices and kernels get N(0, 1/fan_in); biases zero; 1-d weights (norm scales) one; anything else
    small noise. Integer buffers (position ids) are kept as they are.
    """
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        t = state[key]
        if not torch.is_floating_point(t):
            out[key] = t.clone()
            continue
        if t.ndim >= 2:
            fan_in = math.prod(t.shape[1:])
            value = torch.randn(t.shape, generator=generator) / math.sqrt(max(fan_in, 1))
        elif key.endswith("bias"):
            value = torch.zeros(t.shape)
        elif t.ndim == 1 and key.endswith(".weight"):
            value = torch.ones(t.shape)
        else:
            value = 0.02 * torch.randn(t.shape, generator=generator)
        out[key] = value
    return out


def build_state_dict(seed: int = SEED, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, keyed as in an original SD1.5 .ckpt/.safetensors file."""
    ensure_host()
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models

    generator = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    with torch.device("meta"):
        unet = comfy.supported_models.SD15(dict(UNET_CONFIG)).get_model({}).diffusion_model
    for k, v in seeded_values(unet.state_dict(), generator).items():
        sd[f"model.diffusion_model.{k}"] = v
    sd[UNET_OUT_KEY] = sd[UNET_OUT_KEY] * UNET_OUT_SCALE
    with torch.device("meta"):
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    for k, v in seeded_values(vae.state_dict(), generator).items():
        sd[f"first_stage_model.{k}"] = v
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    clip_state = {k: v for k, v in clip.state_dict().items()
                  if k.startswith("transformer.text_model.")}  # no projection or logit_scale in SD1.5 files
    del clip
    for k, v in seeded_values(clip_state, generator).items():
        sd[f"cond_stage_model.{k}"] = v
    # The scheduler buffers an original checkpoint carries are not needed: the host derives them from its config.
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v).contiguous() for k, v in sd.items()}


def write_checkpoint(path: Path | None = None, seed: int = SEED) -> Path:
    """Write the checkpoint atomically (a temporary name, then rename) unless it is already there."""
    import safetensors.torch

    path = Path(path) if path is not None else checkpoint_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict(seed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    safetensors.torch.save_file(sd, str(tmp), metadata={"retrace_tiny": VERSION, "seed": str(seed)})
    os.replace(tmp, path)
    n = sum(v.numel() for v in sd.values())
    log.info("wrote %s (%d tensors, %.1f M values)", path, len(sd), n / 1e6)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"file to write (default {checkpoint_path()})")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--print-path", action="store_true", help="write the file's path to stdout at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    path = write_checkpoint(args.out, args.seed)
    if args.print_path:
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
