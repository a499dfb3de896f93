"""Tiny host models in the real layouts, with seeded weights, for host-level tests (GUIDE section 2).

Every model is the host's own class (``comfy.supported_models.<Config>(unet_config).get_model({})``; for the
DiTs the config is the one the host's own detection builds from the layout's shapes, see ``detected_config``) with
a small ``unet_config`` in the layout the real family uses (UNet with cross-attention and ADM for SDXL,
double/single stream blocks for Flux, joint blocks for SD3), float32 on the CPU, wrapped in a
``ModelPatcher``. The host builds its layers with ``comfy.ops.disable_weight_init``, so every parameter
and buffer of the diffusion model is filled here from a seeded generator.

Conditioning and latents are handed in directly (no text encoder, no VAE): CONDITIONING lists with what
each model's ``extra_conds`` reads, and LATENT dicts in the VAE's output scale.

The host is imported only through :func:`paths.ensure_host`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from paths import ensure_host

KINDS = ("sd15", "sd2v", "sdxl", "flux", "sd3")

# Real context widths (CLIP-L 768, OpenCLIP-H 1024, CLIP-L+G 2048, T5-XXL 4096) and pooled widths
# (CLIP-G 1280 for SDXL, CLIP-L 768 for Flux, CLIP-L+G 2048 for SD3): conditioning has the real shapes.
CONTEXT_DIM = {"sd15": 768, "sd2v": 1024, "sdxl": 2048, "flux": 4096, "sd3": 4096}
POOLED_DIM = {"sdxl": 1280, "flux": 768, "sd3": 2048}
LATENT_CHANNELS = {"sd15": 4, "sd2v": 4, "sdxl": 4, "flux": 16, "sd3": 16}
CONFIG_NAME = {"sd15": "SD15", "sd2v": "SD20", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3"}
FAMILY = {"sd15": "eps", "sd2v": "v", "sdxl": "eps", "flux": "flow", "sd3": "flow"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")


def _unet(context_dim: int, linear: bool, adm: int | None) -> dict[str, Any]:
    """A two-level UNet (32 and 64 channels), one res block and one transformer per level and mid block."""
    config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": adm, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": linear,
        "context_dim": context_dim, "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    if adm is not None:
        config["num_classes"] = "sequential"
    return config


def unet_config(kind: str) -> dict[str, Any]:
    """The small ``unet_config`` for ``kind`` (a fresh dict)."""
    _check_kind(kind)
    if kind == "sd15":
        return _unet(768, False, None)
    if kind == "sd2v":
        return _unet(1024, True, None)
    if kind == "sdxl":
        # 2816 = CLIP-G pooled 1280 + six 256-wide size embeddings, as in the real SDXL.
        return _unet(2048, True, 2816)
    raise ValueError(f"{kind} is a DiT: its config comes from the host's detection (detected_config).")


# The DiTs' configs come from the host's own detection (comfy.model_detection), run on the few tensor shapes it
# reads, so every field a host version requires is filled by that host. Meta tensors: nothing is allocated.
DETECTION_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    # Flux.1-dev's layout at hidden 64: patch 2 over 16 latent channels, T5 4096 and CLIP-L 768 inputs, guidance.
    "flux": {"img_in.weight": (64, 64), "txt_in.weight": (64, 4096), "vector_in.in_layer.weight": (64, 768),
             "guidance_in.in_layer.weight": (64, 256), "double_blocks.0.img_attn.norm.key_norm.scale": (32,),
             "single_blocks.0.linear1.weight": (448, 64), "final_layer.linear.weight": (64, 64)},
    # SD3's hidden size is 64 x depth: 128 wide, depth 2, 2 heads; CLIP-L+G pooled 2048, T5 4096.
    "sd3": {"x_embedder.proj.weight": (128, 16, 2, 2), "final_layer.linear.weight": (64, 128),
            "y_embedder.mlp.0.weight": (128, 2048), "context_embedder.weight": (128, 4096),
            "pos_embed": (1, 256, 128), "joint_blocks.0.context_block.attn.qkv.weight": (384, 128),
            "joint_blocks.1.context_block.attn.qkv.weight": (384, 128)},
}
# What detection fixes rather than reads: Flux's heads (24 of 128 wide, by axes_dim) become 2 of 32 at hidden 64.
DETECTION_OVERRIDES: dict[str, dict[str, Any]] = {"flux": {"axes_dim": [8, 12, 12], "num_heads": 2}}


def detected_config(kind: str) -> Any:
    """The host's supported-model config for the tiny DiT ``kind``, as its detection builds it."""
    ensure_host()
    import comfy.model_detection

    shapes = {key: torch.empty(shape, device="meta") for key, shape in DETECTION_SHAPES[kind].items()}
    config = comfy.model_detection.model_config_from_unet(shapes, "")
    if config is None or type(config).__name__ != CONFIG_NAME[kind]:
        raise RuntimeError(f"the host detects the tiny {kind} layout as {type(config).__name__}, not "
                           f"{CONFIG_NAME[kind]}; update DETECTION_SHAPES for this host version.")
    config.unet_config.update(DETECTION_OVERRIDES.get(kind, {}))
    return config


def fill_weights(module: torch.nn.Module, seed: int) -> None:
    """Fill every floating parameter and buffer from a seeded generator, in name order.

    Matrices and kernels get ``N(0, 1/fan_in)`` (unit gain, so activations stay O(1) through the tiny
    depth); vectors (biases, embeddings) get ``N(0, 0.1^2)``. The scales of normalisation layers named
    ``*norm*`` (the transformers' LayerNorms, SpatialTransformer's GroupNorm, Flux's QK RMSNorms, every
    norm in a diffusers UNet) get the same around 1. The host UNet's ResBlock GroupNorms (``in_layers.0``,
    ``out_layers.0``, ``out.0``) keep small scales on purpose: at unit scale a random UNet's eps is so
    rough in x and sigma that no ODE round trip converges at test step counts (measured: relative
    reconstruction error 2-7 at 40 steps instead of 0.03-0.16).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            if not t.is_floating_point():
                continue
            value = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            if t.ndim >= 2 and not name.endswith("pos_embed"):
                value /= math.sqrt(max(1, t[0].numel()))
            else:
                value *= 0.1
                path, _, leaf = name.rpartition(".")
                if leaf in ("weight", "scale") and "norm" in path.rsplit(".", 1)[-1]:
                    value += 1.0
            t.copy_(value.to(t.dtype))


def build_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny host model of ``kind`` (float32 unless told) in a CPU ``ModelPatcher``; weights from ``seed``."""
    _check_kind(kind)
    ensure_host()
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    if kind in ("flux", "sd3"):
        config = detected_config(kind)
    else:
        config = getattr(comfy.supported_models, CONFIG_NAME[kind])(unet_config(kind))
        # The real configs fix heads for 320 channels; at 32 channels use 4 heads (8 wide) per level.
        config.unet_config.update({"num_heads": -1, "num_head_channels": 8})
    config.set_inference_dtype(dtype, None)
    if kind == "sd2v":
        # The 768-v checkpoints are told apart by their weights (SD20.model_type); say it directly.
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    else:
        model = config.get_model({})
    model = model.to(dtype).eval()
    fill_weights(model.diffusion_model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(kind: str, batch: int = 1, seed: int = 0, tokens: int = 77) -> list:
    """A seeded CONDITIONING ``[[cond, extras]]`` with what ``kind``'s model reads."""
    _check_kind(kind)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cond = torch.randn((batch, tokens, CONTEXT_DIM[kind]), generator=generator)
    extras: dict[str, Any] = {}
    if kind in POOLED_DIM:
        extras["pooled_output"] = torch.randn((batch, POOLED_DIM[kind]), generator=generator)
    if kind == "sdxl":
        extras.update({"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
                       "target_width": 1024, "target_height": 1024})
    if kind == "flux":
        extras["guidance"] = 3.5
    return [[cond, extras]]


def latent(kind: str, batch: int = 1, height: int = 8, width: int = 8, seed: int = 0) -> dict:
    """A seeded LATENT in the VAE's output scale: smooth, image-like structure plus a little detail.

    Built in model space (roughly unit spread) and mapped out with the latent format's own ``process_out``,
    so the host's ``process_latent_in`` gives that model-space latent back, as for an encoded photograph.
    """
    _check_kind(kind)
    ensure_host()
    import comfy.latent_formats

    fmt = getattr(comfy.latent_formats, CONFIG_NAME[kind] if kind != "sd2v" else "SD15")()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    channels = LATENT_CHANNELS[kind]
    coarse = torch.randn((batch, channels, 3, 3), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    detail = 0.3 * torch.randn((batch, channels, height, width), generator=generator)
    model_space = smooth + detail
    return {"samples": fmt.process_out(model_space).contiguous()}


def host_denoiser(model: Any, cond: list) -> Callable[..., torch.Tensor]:
    """The host's k-diffusion denoiser ``D(x, sigma) -> x0`` for one conditioning, in model space.

    Built from the model's own pieces (``extra_conds`` for the conditioning, ``apply_model`` for input
    scaling, the network and ``calculate_denoised``) without the host's sampler or guider, as an
    independent reference for what the nodes compute through ``CFGGuider`` at guidance 1.
    """
    base = model.model
    tensor, extras = cond[0]

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        params = {**extras, "cross_attn": tensor, "device": x.device, "noise": x, "prompt_type": "positive",
                  "width": extras.get("width", x.shape[3] * 8), "height": extras.get("height", x.shape[2] * 8)}
        conds = {k: v.process_cond(batch_size=x.shape[0], area=None, device=x.device).cond
                 for k, v in base.extra_conds(**params).items()}
        return base.apply_model(x, sigma, **conds)

    return denoise


_VAE_STATES: dict[int, dict[str, torch.Tensor]] = {}


def vae_state(latent_channels: int) -> dict[str, torch.Tensor]:
    """Seeded weights in the host's VAE layout: SD's AutoencoderKL (4 channels) or Flux's (16, no quant convs)."""
    if latent_channels not in _VAE_STATES:
        ensure_host()
        import comfy.ldm.models.autoencoder as ae

        from tiny_checkpoint import SD_VAE_CONFIG, seeded_values

        config = {**SD_VAE_CONFIG, "z_channels": latent_channels}
        with torch.device("meta"):
            if latent_channels == 4:
                model = ae.AutoencoderKL(ddconfig=config, embed_dim=4)
            else:
                model = ae.AutoencodingEngine(
                    regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                    encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": config},
                    decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": config})
        generator = torch.Generator().manual_seed(1000 + latent_channels)
        _VAE_STATES[latent_channels] = seeded_values(model.state_dict(), generator)
    return _VAE_STATES[latent_channels]


def build_vae(kind: str) -> Any:
    """The host's own ``comfy.sd.VAE`` (full-size layout, seeded values) for ``kind``'s latent channels."""
    ensure_host()
    import comfy.sd

    vae = comfy.sd.VAE(sd=dict(vae_state(LATENT_CHANNELS[kind])))
    if vae.latent_channels != LATENT_CHANNELS[kind]:
        raise RuntimeError(f"the host built a {vae.latent_channels}-channel VAE for {kind}")
    return vae
