"""Train the toy world's SD1.5-family models (models/toy_world.py's scenes; nodes/_toy_world.py's host classes) and
write models/toy_world/sd15_toy.safetensors (fp16).

    python -m scripts.train_toy_world [--quick] [--out PATH]

Deterministic: fixed seeds, two CPU threads, the scenes drawn from a seeded generator. Three stages, each on the
host's own modules: a small AutoencoderKL (64 px scenes to 8 x 8 x 4 latents, rescaled so the host's SD1 latent
scale 0.18215 gives them unit variance), then the SD15-class UNet and the CLIP text model together (eps loss on the
host's discrete schedule, the prompt dropped 10% of the time for classifier-free guidance), then a read-back check:
scenes generated from prompts with the host's sampler, decoded, and read with ``toy_world.read_attributes``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from paths import ensure_host  # noqa: E402

ensure_host()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from retrace.models import toy_world as world  # noqa: E402
from retrace.nodes import _toy_world as toy  # noqa: E402

log = logging.getLogger("retrace.train")
SD1_SCALE = 0.18215
WORLD_WORDS = [*world.COLOURS, *world.SHAPES, *world.BACKGROUNDS, "a", "and", "on", "background"]


def init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """The host builds layers without initialising them: fan-in normal weights, zero biases, unit norms."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif "norm" in name and leaf == "weight":
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point() and "position_ids" not in name:
                b.zero_()


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int, warmup: float = 0.03) -> torch.optim.lr_scheduler.LambdaLR:
    ramp = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - ramp) / max(1, steps - ramp))))
    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def scenes(count: int, seed: int) -> list[world.Scene]:
    generator = torch.Generator().manual_seed(seed)
    return [world.sample_scene(generator) for _ in range(count)]


def images_of(batch: list[world.Scene]) -> torch.Tensor:
    """``[B, 3, 64, 64]`` in [-1, 1], as the host's VAE takes pixels."""
    return torch.stack([world.render(s) for s in batch]).movedim(-1, 1) * 2 - 1


def train_vae(steps: int, batch: int, seed: int) -> torch.nn.Module:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**toy.VAE_CONFIG)
    init_weights(vae, generator)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = warmup_cosine(optimiser, steps)
    pool = scenes(4096, seed + 1)
    start = time.monotonic()
    for step in range(steps):
        index = torch.randint(len(pool), (batch,), generator=generator)
        x = images_of([pool[i] for i in index])
        z = vae.encode(x)
        # Noise on the latent makes the decoder robust to the small errors a diffusion model leaves.
        noisy = z + 0.05 * z.detach().std() * torch.randn(z.shape, generator=generator)
        loss = torch.nn.functional.mse_loss(vae.decode(noisy), x) + 1e-4 * z.square().mean()
        check_finite(loss, "vae", step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.5f (%.0f s)", step, steps, float(loss), time.monotonic() - start)
    vae.eval()
    with torch.no_grad():
        std = float(torch.cat([vae.encode(images_of(pool[i:i + 256])) for i in range(0, 1024, 256)]).std())
        # Fold the scale into the latent's two 1x1 convolutions, so z * 0.18215 has unit variance.
        factor = 1.0 / (SD1_SCALE * std)
        channels = toy.VAE_CONFIG["embed_dim"]
        vae.quant_conv.weight[:channels] *= factor
        vae.quant_conv.bias[:channels] *= factor
        vae.quant_conv.bias[channels:] += 2 * math.log(factor)
        vae.post_quant_conv.weight /= factor
    return vae


def check_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} step {step}: loss {float(loss)}; the run diverged (nothing written)")


def vae_of(path: Path) -> torch.nn.Module:
    """The VAE part of a toy world file, read and checked as the loader reads it (to train the diffusion stage
    again without the VAE stage)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    parts, _configs = toy.read_weights(path, "sd15")
    vae = AutoencoderKL(**toy.VAE_CONFIG)
    vae.load_state_dict({k: v.float() for k, v in parts["vae"].items()}, strict=True)
    return vae.eval()


def token_ids(clip, prompts: list[str]) -> dict[str, list[int]]:
    """Each distinct prompt's 77 token ids from the host's SD1 tokenizer (tokenising is the slow part: once)."""
    return {p: [int(t) for t, _w in clip.tokenize(p)["l"][0]] for p in sorted(set(prompts))}


def encode_prompts(clip, ids: list[list[int]]) -> torch.Tensor:
    """``[B, 77, width]``: the host's SD1 text encoder (clip_l) on token ids, as CLIP Text Encode runs it."""
    return clip.cond_stage_model.clip_l(ids)[0]


def train_diffusion(vae: torch.nn.Module, steps: int, batch: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    patcher = toy.build_unet()
    clip = toy.build_clip(dtype=torch.float32)
    unet, text = toy.unet_module(patcher), toy.text_module(clip)
    init_weights(unet, generator)
    init_weights(text, generator)
    for p in [*unet.parameters(), *text.parameters()]:
        p.requires_grad_(True)
    text.train()
    model = patcher.model
    pool = scenes(8000, seed + 2)
    log.info("encoding %d scenes", len(pool))
    with torch.no_grad():
        latents = torch.cat([vae.encode(images_of(pool[i:i + 500])) for i in range(0, len(pool), 500)]) * SD1_SCALE
    prompts = [s.prompt for s in pool]
    ids = token_ids(clip, [*prompts, ""])
    sigmas = model.model_sampling.sigmas.float()
    parameters = [*unet.parameters(), *text.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimiser, steps)
    start = time.monotonic()
    running = None
    for step in range(steps):
        index = torch.randint(len(pool), (batch,), generator=generator)
        drop = torch.rand(batch, generator=generator) < 0.1
        texts = ["" if d else prompts[i] for i, d in zip(index.tolist(), drop.tolist())]
        x0 = latents[index]
        sigma = sigmas[torch.randint(len(sigmas), (batch,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        x = x0 + sigma.view(-1, 1, 1, 1) * noise
        # The host's text model adds residuals in place (GUIDE section 3).
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            context = encode_prompts(clip, [ids[t] for t in texts])
            denoised = model.apply_model(x, sigma, c_crossattn=context)
            eps = (x - denoised) / sigma.view(-1, 1, 1, 1)
            loss = torch.nn.functional.mse_loss(eps, noise)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
        check_finite(loss, "unet", step)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        running = float(loss) if running is None else 0.98 * running + 0.02 * float(loss)
        if step % 200 == 0 or step == steps - 1:
            log.info("unet step %d/%d loss %.4f (%.0f s)", step, steps, running, time.monotonic() - start)
    unet.eval()
    text.eval()
    for p in parameters:
        p.requires_grad_(False)
    return patcher, clip


def state_dict(patcher, clip, vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in toy.unet_module(patcher).state_dict().items()}
    text = toy.text_module(clip).state_dict()
    rows = toy.token_rows(clip.tokenizer, WORLD_WORDS)
    table_key = next(k for k in text if k.endswith("token_embedding.weight"))
    out["text.token_rows"] = torch.tensor(rows, dtype=torch.int32)
    out[f"text.{table_key}"] = text.pop(table_key)[rows]
    out.update({f"text.{k}": v for k, v in text.items()})
    out.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in out.items()}


def save(path: Path, patcher, clip, vae: torch.nn.Module, training: dict) -> Path:
    """Write the three parts (fp16) and their configs as one toy world file (nodes/_toy_world.py reads it)."""
    metadata = {"format": toy.FORMAT, "family": "sd15", "unet_config": json.dumps(toy.UNET_CONFIG),
                "text_config": json.dumps(toy.TEXT_CONFIG), "vae_config": json.dumps(toy.VAE_CONFIG),
                "training": json.dumps(training)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(patcher, clip, vae), str(path), metadata=metadata)
    return path


def untrained(seed: int) -> tuple:
    """The three parts with seeded random weights (tests: the file format and the loader, not the world)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**toy.VAE_CONFIG)
    patcher, clip = toy.build_unet(), toy.build_clip()
    for module in (vae, toy.unet_module(patcher), toy.text_module(clip)):
        init_weights(module, generator)
    return patcher, clip, vae.eval()


def read_back(patcher, clip, vae: torch.nn.Module, count: int, seed: int, steps: int = 30, cfg: float = 5.0) -> dict:
    """Generate ``count`` scenes from their prompts and read their attributes back: accuracy per attribute."""
    batch = scenes(count, seed)
    correct: dict[str, int] = {}
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    for i, scene in enumerate(batch):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(scene.prompt))
        latent = torch.zeros(1, 4, 8, 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed + i))
        with torch.no_grad():
            samples = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, empty, latent,
                                          disable_pbar=True, seed=seed + i)
            image = ((vae.decode(samples) + 1) / 2).clamp(0, 1)[0].movedim(0, -1)
        got, want = world.read_attributes(image), world.attributes_of(scene)
        for key in want:
            correct[key] = correct.get(key, 0) + (got[key] == want[key])
        correct["all"] = correct.get("all", 0) + (got == want)
    return {k: v / count for k, v in correct.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=toy.WEIGHTS_DIR / toy.FAMILIES["sd15"])
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--check", type=int, default=48, help="scenes generated for the read-back check")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (plumbing only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-from", type=Path, help="take the VAE from this toy world file (skips the VAE stage)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    if args.quick:
        args.vae_steps, args.unet_steps, args.check = 20, 20, 3
    start = time.monotonic()
    vae = vae_of(args.vae_from) if args.vae_from else train_vae(args.vae_steps, 16, args.seed)
    vae_time = time.monotonic() - start
    patcher, clip = train_diffusion(vae, args.unet_steps, args.batch, args.seed)
    train_time = time.monotonic() - start
    accuracy = read_back(patcher, clip, vae, args.check, seed=10_000)
    log.info("read-back accuracy: %s", json.dumps(accuracy))
    save(args.out, patcher, clip, vae, {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
                                        "batch": args.batch, "seed": args.seed, "seconds": round(train_time),
                                        "vae_seconds": round(vae_time), "read_back": accuracy})
    log.info("wrote %s (%.1f MB) in %.0f s", args.out, args.out.stat().st_size / 1e6, time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
