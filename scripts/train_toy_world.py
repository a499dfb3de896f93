"""Train the toy world's models (models/toy_world.py's scenes; nodes/_toy_world.py's host classes) and write
models/toy_world/sd15_toy.safetensors or flux_toy.safetensors (fp16).

    python -m scripts.train_toy_world [--family sd15|flux] [--quick] [--out PATH]

Deterministic: fixed seeds, two CPU threads, the scenes drawn from a seeded generator. Four stages, each on the
host's own modules: a small AutoencoderKL (64 px scenes to 8 x 8 x 4 latents, rescaled so the host's SD1 latent
scale 0.18215 gives them unit variance), then the SD15-class UNet and the CLIP text model together (eps loss on the
host's discrete schedule, the prompt dropped 10% of the time for classifier-free guidance; 8000 steps, 46 minutes
on this repository's 2-core CPU), then a localising stage (1500 steps, 5 minutes: the eps loss plus TokenCompose's
token loss, so that each word's cross-attention lies on what it names; without it the background words' maps
missed the background, AUC 0.45), then checks: scenes generated from prompts with the host's sampler, decoded and
read with ``toy_world.read_attributes``, and the words' attention localisation (``localisation``). Both are kept
in the file's ``training`` metadata. ``--localise-from FILE`` runs the localising stage alone on a trained file.

``--family flux``: a VAE with 16 latent channels at 4x (1200 steps, about 14 minutes), then the DiT (the host's
Flux class, FluxSchnell's layout) and its text model together on the rectified-flow velocity loss plus the token
loss from the start (5000 steps, 49 minutes), then the same checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from paths import ensure_host  # noqa: E402

ensure_host()

import comfy.latent_formats  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from retrace.models import toy_world as world  # noqa: E402
from retrace.nodes import _toy_world as toy  # noqa: E402

log = logging.getLogger("retrace.train")
SD1_SCALE = 0.18215
FLUX_FORMAT = comfy.latent_formats.Flux()
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


def train_vae(steps: int, batch: int, seed: int, family: str = "sd15") -> torch.nn.Module:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**toy.VAE_CONFIGS[family])
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
            log.info("vae step %d/%d loss %.5f (%.0f s)", step, steps, float(loss.detach()), time.monotonic() - start)
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images_of(pool[i:i + 256])) for i in range(0, 1024, 256)])
        if family == "sd15":
            # Fold the scale into the latent's two 1x1 convolutions, so z * 0.18215 has unit variance.
            fold_latent_affine(vae, torch.full((z.shape[1],), 1.0 / (SD1_SCALE * float(z.std()))),
                               torch.zeros(z.shape[1]))
        else:
            # Per channel, so that the host's Flux latent format, (z - shift) * scale, gives zero mean, unit variance.
            mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
            factor = 1.0 / (FLUX_FORMAT.scale_factor * std)
            fold_latent_affine(vae, factor, FLUX_FORMAT.shift_factor - factor * mean)
    return vae


def fold_latent_affine(vae: torch.nn.Module, factor: torch.Tensor, offset: torch.Tensor) -> None:
    """Make the encoder's latent ``factor * z + offset`` (per channel) and the decoder read it back, by folding the
    map into the latent's two 1x1 convolutions (the log-variance moves with the scale)."""
    channels = len(factor)
    view = factor.view(-1, 1, 1, 1)
    vae.quant_conv.weight[:channels] *= view
    vae.quant_conv.bias[:channels] = vae.quant_conv.bias[:channels] * factor + offset
    vae.quant_conv.bias[channels:] += 2 * torch.log(factor)
    # post_quant_conv(z) = W z + c with z = (z' - offset) / factor.
    vae.post_quant_conv.bias -= (vae.post_quant_conv.weight[:, :, 0, 0] * (offset / factor)).sum(1)
    vae.post_quant_conv.weight /= factor.view(1, -1, 1, 1)


def check_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage} step {step}: loss {float(loss)}; the run diverged (nothing written)")


def vae_of(path: Path, family: str = "sd15") -> torch.nn.Module:
    """The VAE part of a toy world file, read and checked as the loader reads it (to train the diffusion stage
    again without the VAE stage)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    parts, _configs = toy.read_weights(path, family)
    vae = AutoencoderKL(**toy.VAE_CONFIGS[family])
    vae.load_state_dict({k: v.float() for k, v in parts["vae"].items()}, strict=True)
    return vae.eval()


def training_record(path: Path) -> str:
    """The ``training`` metadata of a toy world file (what trained it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("training", "{}")


def token_ids(clip, prompts: list[str]) -> dict[str, list[int]]:
    """Each distinct prompt's 77 token ids from the host's SD1 tokenizer (tokenising is the slow part: once)."""
    return {p: [int(t) for t, _w in clip.tokenize(p)["l"][0]] for p in sorted(set(prompts))}


def encode_prompts(clip, ids: list[list[int]]) -> torch.Tensor:
    """``[B, 77, width]``: the host's SD1 text encoder (clip_l) on token ids, as CLIP Text Encode runs it."""
    return encode_pooled(clip, ids)[0]


def encode_pooled(clip, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The states and the pooled vector (the end token's state) CLIP Text Encode gives the flux toy."""
    states, pooled = clip.cond_stage_model.clip_l(ids)[:2]
    return states, pooled


def model_latents(vae: torch.nn.Module, pictures: list[world.Scene], family: str) -> torch.Tensor:
    """The scenes' latents in the diffusion model's space (the host's process_latent_in of the VAE's)."""
    with torch.no_grad():
        z = torch.cat([vae.encode(images_of(pictures[i:i + 500])) for i in range(0, len(pictures), 500)])
    return z * SD1_SCALE if family == "sd15" else FLUX_FORMAT.process_in(z)


def flow_noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified flow's path (Liu et al. 2023; SD3, Esser et al. 2024, eq. 1): x_t = (1 - t) x0 + t noise."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * noise


def trainable(patcher, generator: torch.Generator) -> tuple:
    """A new float32 text model for ``patcher``'s network, both initialised from ``generator`` and trainable:
    the CLIP, the network and the text model."""
    clip = toy.build_clip(dtype=torch.float32)
    network, text = toy.diffusion_module(patcher), toy.text_module(clip)
    init_weights(network, generator)
    init_weights(text, generator)
    for p in [*network.parameters(), *text.parameters()]:
        p.requires_grad_(True)
    text.train()
    return clip, network, text


def train_flow(vae: torch.nn.Module, steps: int, batch: int, seed: int, token_weight: float) -> tuple:
    """The flux toy's DiT and text model together: the rectified-flow velocity loss at logit-normal times (SD3's
    sampling, Esser et al. 2024, section 3.1), the prompt dropped 10% of the time for classifier-free guidance, plus
    ``token_weight`` times TokenCompose's token loss on the joint attention's image-to-word maps."""
    generator = torch.Generator().manual_seed(seed)
    patcher = toy.build_dit()
    clip, dit, text = trainable(patcher, generator)
    check_single_tokens(clip)
    parameters = [*dit.parameters(), *text.parameters()]
    pool = scenes(8000, seed + 2)
    log.info("encoding %d scenes", len(pool))
    latents = model_latents(vae, pool, "flux")
    prompts = [s.prompt for s in pool]
    ids = token_ids(clip, [*prompts, ""])
    optimiser = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=0.01)
    schedule = warmup_cosine(optimiser, steps)
    hooks = JointAttentionMaps()

    def losses(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, drop, texts, x0 = drawn(pool, latents, batch, generator)
        t = torch.sigmoid(torch.randn(batch, generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        x = flow_noised(x0, t, noise)
        hooks.maps.clear()
        context, pooled = encode_pooled(clip, [ids[w] for w in texts])
        denoised = patcher.model.apply_model(x, t, c_crossattn=context, y=pooled, transformer_options=hooks.options)
        velocity = (x - denoised) / t.view(-1, 1, 1, 1)
        flow_loss = torch.nn.functional.mse_loss(velocity, noise - x0)
        return flow_loss, token_loss(hooks.maps, word_masks([pool[i] for i in index.tolist()]), ~drop)

    # The host's own training switch (its Train LoRA node sets it): differentiable rotary embeddings in Flux.
    comfy.model_management.in_training = True
    try:
        optimise(losses, steps, token_weight, parameters, optimiser, schedule, "dit", "flow")
    finally:
        comfy.model_management.in_training = False
    dit.eval()
    text.eval()
    for p in parameters:
        p.requires_grad_(False)
    return patcher, clip


def drawn(pool: list, latents: torch.Tensor, batch: int,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """A training batch: scene indices, which prompts are dropped for CFG (10%), the prompts, the latents."""
    index = torch.randint(len(pool), (batch,), generator=generator)
    drop = torch.rand(batch, generator=generator) < 0.1
    texts = ["" if d else pool[i].prompt for i, d in zip(index.tolist(), drop.tolist())]
    return index, drop, texts, latents[index]


def optimise(losses: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int, weight: float,
             parameters: list, optimiser: torch.optim.Optimizer, schedule, stage: str, name: str) -> None:
    """The stages' loop: ``losses(step)`` draws a batch and gives the model's loss and the token loss; the step
    descends on their sum with the token loss times ``weight`` (gradients clipped to norm 1)."""
    start, running = time.monotonic(), None
    for step in range(steps):
        # The host's text model adds residuals in place (GUIDE section 3).
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            main, attention = losses(step)
            loss = main + weight * attention
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
        check_finite(loss, stage, step)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        now = (float(main.detach()), float(attention.detach()))
        running = now if running is None else tuple(0.98 * r + 0.02 * n for r, n in zip(running, now))
        if step % 100 == 0 or step == steps - 1:
            log.info("%s step %d/%d %s loss %.4f token loss %.4f (%.0f s)", stage, step, steps, name, *running,
                     time.monotonic() - start)


def train_diffusion(vae: torch.nn.Module, steps: int, batch: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    patcher = toy.build_unet()
    clip, unet, text = trainable(patcher, generator)
    model = patcher.model
    pool = scenes(8000, seed + 2)
    log.info("encoding %d scenes", len(pool))
    latents = model_latents(vae, pool, "sd15")
    prompts = [s.prompt for s in pool]
    ids = token_ids(clip, [*prompts, ""])
    sigmas = model.model_sampling.sigmas.float()
    parameters = [*unet.parameters(), *text.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimiser, steps)
    start = time.monotonic()
    running = None
    for step in range(steps):
        _index, _drop, texts, x0 = drawn(pool, latents, batch, generator)
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


# The words of a scene's prompt in order ("a red circle and a blue square on a white background"), each one CLIP
# token after the start token; the content words are tied to the region they name.
PROMPT_WORDS = ("a", "colour0", "shape0", "and", "a", "colour1", "shape1", "on", "a", "background_colour", "background")
REGION_OF = {"colour0": 0, "shape0": 0, "colour1": 1, "shape1": 1, "background_colour": 2, "background": 2}
CONTENT_POSITIONS = [1 + i for i, word in enumerate(PROMPT_WORDS) if word in REGION_OF]


def regions(scene: world.Scene) -> torch.Tensor:
    """``[3, 64, 64]`` float: the left object's footprint, the right one's, and the background (everything else)."""
    things = [world.shape_mask(thing, index) for index, thing in enumerate(scene.things)]
    return torch.stack([*things, ~(things[0] | things[1])]).float()


def word_masks(batch: list[world.Scene]) -> torch.Tensor:
    """``[B, content words, 64, 64]``: each content word's region (``REGION_OF``), in ``CONTENT_POSITIONS`` order."""
    index = [REGION_OF[w] for w in PROMPT_WORDS if w in REGION_OF]
    return torch.stack([regions(s)[index] for s in batch])


def check_single_tokens(clip) -> None:
    """The token loss assumes every world word is one CLIP token (so a word's position is its place in the prompt)."""
    for word in WORLD_WORDS:
        tokens = [t for t, _w in clip.tokenize(word)["l"][0] if t not in (49406, 49407)]
        if len(tokens) != 1:
            raise ValueError(f"the world word {word!r} is {len(tokens)} CLIP tokens; the token loss needs one")


class CrossAttentionMaps:
    """Forward hooks on the UNet's cross-attention layers that keep, with their graph, each layer's attention
    probabilities over the prompt's tokens (``[B, queries, 77]``, heads averaged): what the token loss reads."""

    def __init__(self, unet: torch.nn.Module):
        self.maps: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._keep, with_kwargs=True)
                        for name, m in unet.named_modules() if name.endswith("attn2")]

    def _keep(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x, context = args[0], kwargs.get("context")
        q, k = module.to_q(x), module.to_k(context)
        b, heads = q.shape[0], module.heads
        q = q.view(b, -1, heads, module.dim_head).transpose(1, 2)
        k = k.view(b, -1, heads, module.dim_head).transpose(1, 2)
        self.maps.append(((q @ k.transpose(-1, -2)) * module.dim_head ** -0.5).softmax(-1).mean(1))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class JointAttentionMaps:
    """Through the host's attention override (``transformer_options``), each joint-attention call's image rows'
    probabilities over the prompt's ``text`` tokens (``[B, queries, text]``, heads averaged), with their graph; the
    call itself is the host's. Flux puts the text tokens first."""

    def __init__(self, text: int = 77):
        self.text = text
        self.maps: list[torch.Tensor] = []
        self.options = {"optimized_attention_override": self._keep}

    def _keep(self, func, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *args, **kwargs):
        probabilities = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        self.maps.append(probabilities[:, :, self.text:, :self.text].mean(1))
        return func(q, k, v, heads, *args, **kwargs)

    def close(self) -> None:
        self.maps.clear()


def token_loss(maps: list[torch.Tensor], masks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al. 2024, eq. 2): one minus the share of each content word's attention
    that falls inside its region, averaged over words, layers and the prompts in ``keep`` (not dropped for CFG).
    ``masks`` ``[B, words, 64, 64]`` are area-pooled to each layer's grid."""
    losses = []
    for attention in maps:
        side = math.isqrt(attention.shape[1])
        region = torch.nn.functional.adaptive_avg_pool2d(masks, side).flatten(2)  # [B, words, queries]
        word = attention[..., CONTENT_POSITIONS].transpose(1, 2)  # [B, words, queries]
        inside = (word * region).sum(-1) / word.sum(-1).clamp_min(1e-8)
        losses.append((1 - inside)[keep].mean())
    return torch.stack(losses).mean()


def trained(path: Path) -> tuple:
    """The UNet patcher, CLIP (float32, for training) and VAE of a toy world file."""
    parts, configs = toy.read_weights(path, "sd15")
    patcher = toy.build_unet(configs["unet"])
    clip = toy.build_clip(configs["text"], dtype=torch.float32)
    toy.diffusion_module(patcher).load_state_dict({k: v.float() for k, v in parts["unet"].items()})
    text = toy._expand_token_rows(parts["text"], configs["text"])
    toy.text_module(clip).load_state_dict({k: v.float() for k, v in text.items()})
    return patcher, clip, vae_of(path)


def as_stored(*modules: torch.nn.Module) -> None:
    """Round every weight through fp16, as the file stores it: the localising stage then starts from the same
    values whether it follows the diffusion stage in one run or reads that stage's file (--localise-from)."""
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.half().float())


def localise(patcher, clip, vae: torch.nn.Module, steps: int, batch: int, seed: int, weight: float,
             lr: float) -> tuple:
    """Fine-tune a trained toy world's UNet and text encoder with the eps loss plus ``weight`` times the token loss,
    so that each word's cross-attention lies on what it names, as in real checkpoints (P2P's local blend and
    Retrace's masks are judged on that; the plain eps loss left the background words' maps off the background).
    Returns the patcher, CLIP and VAE."""
    unet, text = toy.diffusion_module(patcher), toy.text_module(clip)
    check_single_tokens(clip)
    generator = torch.Generator().manual_seed(seed)
    pool = scenes(8000, seed + 2)
    latents = model_latents(vae, pool, "sd15")
    prompts = [s.prompt for s in pool]
    ids = token_ids(clip, [*prompts, ""])
    sigmas = patcher.model.model_sampling.sigmas.float()
    parameters = [*unet.parameters(), *text.parameters()]
    for p in parameters:
        p.requires_grad_(True)
    text.train()
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(optimiser, steps)
    hooks = CrossAttentionMaps(unet)

    def losses(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, drop, texts, x0 = drawn(pool, latents, batch, generator)
        sigma = sigmas[torch.randint(len(sigmas), (batch,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        x = x0 + sigma.view(-1, 1, 1, 1) * noise
        hooks.maps.clear()
        context = encode_prompts(clip, [ids[t] for t in texts])
        denoised = patcher.model.apply_model(x, sigma, c_crossattn=context)
        eps_loss = torch.nn.functional.mse_loss((x - denoised) / sigma.view(-1, 1, 1, 1), noise)
        return eps_loss, token_loss(hooks.maps, word_masks([pool[i] for i in index.tolist()]), ~drop)

    optimise(losses, steps, weight, parameters, optimiser, schedule, "localise", "eps")
    hooks.close()
    unet.eval()
    text.eval()
    for p in parameters:
        p.requires_grad_(False)
    return patcher, clip, vae


def auc(scores: torch.Tensor, inside: torch.Tensor) -> float:
    """The probability that a cell inside the region scores above one outside it (ties count half)."""
    pos, neg = scores[inside], scores[~inside]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()
    return float(greater)


def localisation(patcher, clip, vae: torch.nn.Module, count: int, seed: int, family: str = "sd15") -> dict[str, float]:
    """How well each kind of content word's cross-attention lies on what it names, on ``count`` held-out scenes
    noised to three levels: the share of the word's attention inside its region (the token loss's quantity) and
    the AUC of its map (the layers' maps resized to the latent grid and summed) against the region's cells (those
    at least half inside), per word kind. The flux toy's maps are its joint attention's image-to-word rows, on its
    grid of image tokens."""
    batch = scenes(count, seed)
    flux = family == "flux"
    hooks = JointAttentionMaps() if flux else CrossAttentionMaps(toy.diffusion_module(patcher))
    kinds = {"colour": [0, 2], "shape": [1, 3], "background": [4, 5]}  # indices into CONTENT_POSITIONS
    shares: dict[str, list[float]] = {k: [] for k in kinds}
    aucs: dict[str, list[float]] = {k: [] for k in kinds}
    ids = token_ids(clip, [s.prompt for s in batch])
    generator = torch.Generator().manual_seed(seed)
    sigmas = patcher.model.model_sampling.sigmas.float()
    with torch.no_grad():
        x0 = model_latents(vae, batch, family)
        context, pooled = encode_pooled(clip, [ids[s.prompt] for s in batch])
        masks = word_masks(batch)
        grid = tuple(x0.shape[-2:])
        if flux:
            patch = toy.diffusion_module(patcher).patch_size
            grid = (grid[0] // patch, grid[1] // patch)
        cells = torch.nn.functional.adaptive_avg_pool2d(masks, grid).flatten(2) >= 0.5
        for level in (0.2, 0.5, 0.8):
            sigma = sigmas[int(level * (len(sigmas) - 1))].expand(len(batch))
            noise = torch.randn(x0.shape, generator=generator)
            hooks.maps.clear()
            if flux:
                patcher.model.apply_model(flow_noised(x0, sigma, noise), sigma, c_crossattn=context, y=pooled,
                                          transformer_options=hooks.options)
            else:
                patcher.model.apply_model(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, c_crossattn=context)
            maps = torch.zeros(len(batch), len(CONTENT_POSITIONS), grid[0] * grid[1])
            inside = torch.zeros(len(batch), len(CONTENT_POSITIONS))
            for m in hooks.maps:
                side = math.isqrt(m.shape[1])
                word = m[..., CONTENT_POSITIONS].transpose(1, 2)  # [B, words, queries]
                region = torch.nn.functional.adaptive_avg_pool2d(masks, side).flatten(2)
                inside += (word * region).sum(-1) / word.sum(-1).clamp_min(1e-8) / len(hooks.maps)
                maps += torch.nn.functional.interpolate(word.reshape(len(batch), -1, side, side), size=grid,
                                                        mode="bilinear", align_corners=False).flatten(2)
            for kind, words in kinds.items():
                shares[kind] += inside[:, words].flatten().tolist()
                aucs[kind] += [auc(maps[b, w], cells[b, w]) for b in range(len(batch)) for w in words]
    hooks.close()
    out = {f"auc_{k}": round(sum(v) / len(v), 3) for k, v in aucs.items()}
    out.update({f"inside_{k}": round(sum(v) / len(v), 3) for k, v in shares.items()})
    return out


def checkpoint_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flux's QK norms under the checkpoint's names (``*_norm.scale``; hosts since 0.4 name them ``weight`` and map
    the checkpoint's names on loading), so the file loads on every host version."""
    return {(k.removesuffix(".weight") + ".scale" if k.endswith("_norm.weight") else k): v for k, v in state.items()}


def state_dict(patcher, clip, vae: torch.nn.Module, family: str = "sd15") -> dict[str, torch.Tensor]:
    model = toy.diffusion_module(patcher).state_dict()
    if family == "flux":
        model = checkpoint_names(model)
    out = {f"{toy.PARTS[family][0]}.{k}": v for k, v in model.items()}
    text = toy.text_module(clip).state_dict()
    rows = toy.token_rows(clip.tokenizer, WORLD_WORDS)
    table_key = next(k for k in text if k.endswith("token_embedding.weight"))
    out["text.token_rows"] = torch.tensor(rows, dtype=torch.int32)
    out[f"text.{table_key}"] = text.pop(table_key)[rows]
    out.update({f"text.{k}": v for k, v in text.items()})
    out.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in out.items()}


def save(path: Path, patcher, clip, vae: torch.nn.Module, training: dict, family: str = "sd15") -> Path:
    """Write the three parts (fp16) and their configs as one toy world file (nodes/_toy_world.py reads it). The
    flux toy's DiT config is what the host's detection does not read from the shapes (``FLUX_OVERRIDES``)."""
    model_config = toy.UNET_CONFIG if family == "sd15" else toy.FLUX_OVERRIDES
    metadata = {"format": toy.FORMAT, "family": family, f"{toy.PARTS[family][0]}_config": json.dumps(model_config),
                "text_config": json.dumps(toy.TEXT_CONFIG), "vae_config": json.dumps(toy.VAE_CONFIGS[family]),
                "training": json.dumps(training)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(patcher, clip, vae, family), str(path), metadata=metadata)
    return path


def untrained(seed: int, family: str = "sd15") -> tuple:
    """The three parts with seeded random weights (tests: the file format and the loader, not the world)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**toy.VAE_CONFIGS[family])
    patcher, clip = toy.build_unet() if family == "sd15" else toy.build_dit(), toy.build_clip()
    for module in (vae, toy.diffusion_module(patcher), toy.text_module(clip)):
        init_weights(module, generator)
    return patcher, clip, vae.eval()


def read_back(patcher, clip, vae: torch.nn.Module, count: int, seed: int, steps: int = 30, cfg: float = 5.0,
              family: str = "sd15") -> dict:
    """Generate ``count`` scenes from their prompts and read their attributes back: accuracy per attribute."""
    batch = scenes(count, seed)
    correct: dict[str, int] = {}
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    config = toy.VAE_CONFIGS[family]
    side = world.SIZE // 2 ** (len(config["ddconfig"]["ch_mult"]) - 1)
    scheduler = "normal" if family == "sd15" else "simple"
    for i, scene in enumerate(batch):
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(scene.prompt))
        latent = torch.zeros(1, config["embed_dim"], side, side)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed + i))
        with torch.no_grad():
            samples = comfy.sample.sample(patcher, noise, steps, cfg, "euler", scheduler, positive, empty, latent,
                                          disable_pbar=True, seed=seed + i)
            image = ((vae.decode(samples) + 1) / 2).clamp(0, 1)[0].movedim(0, -1)
        got, want = world.read_attributes(image), world.attributes_of(scene)
        for key in want:
            correct[key] = correct.get(key, 0) + (got[key] == want[key])
        correct["all"] = correct.get("all", 0) + (got == want)
    return {k: v / count for k, v in correct.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(toy.FAMILIES), default="sd15")
    parser.add_argument("--out", type=Path, help="default: models/toy_world/<the family's file>")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--unet-steps", type=int, default=8000)
    parser.add_argument("--dit-steps", type=int, default=4000, help="the flux toy's DiT steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--check", type=int, default=48, help="scenes generated for the read-back check")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (plumbing only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-from", type=Path, help="take the VAE from this toy world file (skips the VAE stage)")
    parser.add_argument("--localise-from", type=Path,
                        help="run only the localising stage, on this toy world file (skips the VAE and UNet stages)")
    parser.add_argument("--localise-steps", type=int, default=1500, help="the localising stage's steps (0: none)")
    parser.add_argument("--token-weight", type=float, default=0.1, help="the token loss's weight against eps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    if args.quick:
        args.vae_steps, args.unet_steps, args.dit_steps, args.localise_steps, args.check = 20, 20, 20, 5, 3
    args.out = args.out or toy.WEIGHTS_DIR / toy.FAMILIES[args.family]
    if args.family == "flux":
        return train_flux_toy(args)
    start = time.monotonic()
    training = {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "batch": args.batch, "seed": args.seed}
    if args.localise_from:
        training = json.loads(training_record(args.localise_from))
        patcher, clip, vae = trained(args.localise_from)
    else:
        vae = vae_of(args.vae_from) if args.vae_from else train_vae(args.vae_steps, 16, args.seed)
        vae_time = time.monotonic() - start
        patcher, clip = train_diffusion(vae, args.unet_steps, args.batch, args.seed)
        training.update({"seconds": round(time.monotonic() - start), "vae_seconds": round(vae_time)})
        as_stored(toy.diffusion_module(patcher), toy.text_module(clip), vae)
    if args.localise_steps:
        localising = time.monotonic()
        patcher, clip, vae = localise(patcher, clip, vae, args.localise_steps, args.batch, args.seed + 3,
                                      args.token_weight, lr=2e-4)
        training.update({"localise_steps": args.localise_steps, "token_weight": args.token_weight,
                         "localise_seconds": round(time.monotonic() - localising)})
    accuracy = read_back(patcher, clip, vae, args.check, seed=10_000)
    log.info("read-back accuracy: %s", json.dumps(accuracy))
    training["localisation"] = localisation(patcher, clip, vae, 32, seed=20_000)
    log.info("attention localisation: %s", json.dumps(training["localisation"]))
    save(args.out, patcher, clip, vae, {**training, "read_back": accuracy})
    log.info("wrote %s (%.1f MB) in %.0f s", args.out, args.out.stat().st_size / 1e6, time.monotonic() - start)
    return 0


def train_flux_toy(args: argparse.Namespace) -> int:
    """The flux toy's stages: its VAE (16 channels, 4x), then the DiT and text model with the token loss throughout,
    then the same checks as the sd15 toy's."""
    start = time.monotonic()
    vae = vae_of(args.vae_from, "flux") if args.vae_from else train_vae(args.vae_steps, 16, args.seed, "flux")
    vae_time = time.monotonic() - start
    as_stored(vae)
    patcher, clip = train_flow(vae, args.dit_steps, args.batch, args.seed, args.token_weight)
    training = {"vae_steps": args.vae_steps, "dit_steps": args.dit_steps, "batch": args.batch, "seed": args.seed,
                "token_weight": args.token_weight, "seconds": round(time.monotonic() - start),
                "vae_seconds": round(vae_time)}
    as_stored(toy.diffusion_module(patcher), toy.text_module(clip))
    accuracy = read_back(patcher, clip, vae, args.check, seed=10_000, family="flux")
    log.info("read-back accuracy: %s", json.dumps(accuracy))
    training["localisation"] = localisation(patcher, clip, vae, 32, seed=20_000, family="flux")
    log.info("attention localisation: %s", json.dumps(training["localisation"]))
    save(args.out, patcher, clip, vae, {**training, "read_back": accuracy}, "flux")
    log.info("wrote %s (%.1f MB) in %.0f s", args.out, args.out.stat().st_size / 1e6, time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
