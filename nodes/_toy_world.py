"""The toy world's models in the host's own classes. Two families:

- ``sd15``: an SD1.5-family UNet (``comfy.supported_models.SD15``, eps), a small CLIP text model behind the host's
  real SD1 tokenizer (a host ``CLIP`` object), and a small ``AutoencoderKL`` (a host ``VAE``, 8x: 8 x 8 x 4 latents);
- ``flux``: a rectified-flow DiT in the host's Flux class (``FluxSchnell``'s layout: no guidance input, so real
  classifier-free guidance), its config found by the host's own detection from the weights' shapes; its own text
  model of the same kind (the sequence to ``txt_in``, the end token's state as the pooled vector), and a VAE with
  16 latent channels at 4x (16 x 16 x 16 latents, 8 x 8 image tokens after the DiT's 2 x 2 patches).

``scripts/train_toy_world.py`` trains them; ``models/toy_world/`` ships the weights (fp16); the Retrace Load Toy
World node builds them with :func:`load`. One weights file per family holds every part under a prefix (``unet.`` or
``dit.``, ``text.``, ``vae.``) and its configs in the metadata; the text encoder's token table keeps only the rows
of the world's words (the rest are zero).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = ROOT / "models" / "toy_world"
FAMILIES = {"sd15": "sd15_toy.safetensors", "flux": "flux_toy.safetensors"}
# Each family's parts, the diffusion model's first.
PARTS = {"sd15": ("unet", "text", "vae"), "flux": ("dit", "text", "vae")}
FORMAT = "retrace-toy-world-1"
# What a weights file may claim before anything is built (a tiny world: far below these).
MAX_CHANNELS = 512
MAX_LAYERS = 8

TEXT_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "vocab_size": 49408, "max_position_embeddings": 77,
    "projection_dim": 32, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
}
UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 8, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": 32, "num_heads": -1, "num_head_channels": 16, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
VAE_CONFIG: dict[str, Any] = {
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "embed_dim": 4,
}


# The flux toy's DiT, given as the tensor shapes the host's detection reads (Flux.1's layout, hidden 128): 2 x 2
# patches of 16 channels, the toy text model's 32-wide states to txt_in and its pooled vector to vector_in, two
# double-stream and two single-stream blocks, no guidance input (FluxSchnell: real CFG).
FLUX_HIDDEN = 128
FLUX_LAYOUT: dict[str, tuple[int, ...]] = {
    "img_in.weight": (FLUX_HIDDEN, 64), "txt_in.weight": (FLUX_HIDDEN, TEXT_CONFIG["hidden_size"]),
    "vector_in.in_layer.weight": (FLUX_HIDDEN, TEXT_CONFIG["hidden_size"]),
    "double_blocks.0.img_attn.norm.key_norm.scale": (32,), "double_blocks.1.img_attn.norm.key_norm.scale": (32,),
    "single_blocks.0.linear1.weight": (7 * FLUX_HIDDEN, FLUX_HIDDEN),
    "single_blocks.1.linear1.weight": (7 * FLUX_HIDDEN, FLUX_HIDDEN), "final_layer.linear.weight": (64, FLUX_HIDDEN),
}
# What detection fixes for Flux.1 rather than reads (24 heads of 128): 4 heads of 32 here, the rotary axes to match.
FLUX_OVERRIDES: dict[str, Any] = {"axes_dim": [8, 12, 12], "num_heads": 4}
FLUX_VAE_CONFIG: dict[str, Any] = {
    "ddconfig": {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "embed_dim": 16,
}
VAE_CONFIGS = {"sd15": VAE_CONFIG, "flux": FLUX_VAE_CONFIG}


class ToyTextModel(comfy.sd1_clip.SDClipModel):
    """The host's CLIP text model at the toy world's size."""

    def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None, model_options: dict = {},  # noqa: B006
                 config: dict | None = None):
        super().__init__(device=device, dtype=dtype, model_options=model_options,
                         textmodel_json_config=dict(config or TEXT_CONFIG), return_projected_pooled=False)


def text_encoder_class(config: dict) -> type:
    class ToyTextEncoder(comfy.sd1_clip.SD1ClipModel):
        """SD1's text encoder wrapper (clip_l) around the toy text model."""

        def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None,
                     model_options: dict = {}, **kwargs: Any):  # noqa: B006 (the host's signature)
            def model(**options: Any) -> ToyTextModel:
                return ToyTextModel(config=config, **options)
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=model, **kwargs)
    return ToyTextEncoder


def build_unet(config: dict | None = None, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The host's SD15 model with the toy UNet config, in a ModelPatcher on the host's devices."""
    model_config = comfy.supported_models.SD15(dict(config or UNET_CONFIG))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_dit(shapes: dict[str, Any] | None = None, overrides: dict | None = None,
              dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The host's Flux model for the flux toy, its config from the host's detection on ``shapes`` (a state dict, or
    FLUX_LAYOUT's shapes as meta tensors), in a ModelPatcher on the host's devices."""
    import comfy.model_detection

    if shapes is None:
        shapes = {k: torch.empty(shape, device="meta") for k, shape in FLUX_LAYOUT.items()}
    model_config = comfy.model_detection.model_config_from_unet(shapes, "")
    if model_config is None or type(model_config).__name__ != "FluxSchnell":
        raise ValueError(f"Retrace Load Toy World: the host reads the flux toy's weights as "
                         f"{type(model_config).__name__}, not FluxSchnell; the file is not one Retrace's training "
                         f"script wrote.")
    config = {**model_config.unet_config, **dict(overrides or FLUX_OVERRIDES)}
    heads, axes = config.get("num_heads"), config.get("axes_dim")
    if not (isinstance(heads, int) and heads > 0 and isinstance(axes, list) and all(isinstance(a, int) for a in axes)
            and heads * sum(axes) == config["hidden_size"]):
        raise ValueError(f"Retrace Load Toy World: the flux toy's heads ({heads}) and rotary axes ({axes}) do not "
                         f"divide its hidden size {config['hidden_size']}; the file is not one Retrace's training "
                         f"script wrote.")
    model_config.unet_config.update(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_clip(config: dict | None = None, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """A host CLIP around the toy text model; ``dtype`` None: the host's text-encoder dtype (fp16 even on CPU, which
    is right for inference and wrong for training: Adam's state underflows in fp16)."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                    text_encoder_class(dict(config or TEXT_CONFIG)))
    return comfy.sd.CLIP(target, embedding_directory=None, model_options={} if dtype is None else {"dtype": dtype})


def build_vae(state: dict[str, torch.Tensor], config: dict | None = None) -> comfy.sd.VAE:
    """A host VAE around the toy AutoencoderKL. The host's VAE takes a config as 4 latent channels at 8x; the
    toy's own channels and scale (the flux toy's 16 at 4x) are set on the object from its config."""
    config = dict(config or VAE_CONFIG)
    vae = comfy.sd.VAE(sd=state, config={"params": config})
    vae.latent_channels = config["embed_dim"]
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(config["ddconfig"]["ch_mult"]) - 1)
    return vae


def diffusion_module(patcher: comfy.model_patcher.ModelPatcher) -> torch.nn.Module:
    return patcher.model.diffusion_model


def text_module(clip: comfy.sd.CLIP) -> torch.nn.Module:
    return clip.cond_stage_model.clip_l.transformer


def token_rows(tokenizer: comfy.sd1_clip.SD1Tokenizer, words: list[str]) -> list[int]:
    """The token ids of ``words`` and of the tokenizer's start, end and pad tokens."""
    ids = {49406, 49407}
    for word in words:
        for token, _weight in tokenizer.tokenize_with_weights(word)["l"][0]:
            ids.add(int(token))
    return sorted(ids)


def check_config(name: str, config: dict) -> None:
    """Refuse a file whose configs would build something far beyond the toy world, before anything is built."""
    widths = [v for k, v in _flatten(config) if isinstance(v, int) and not isinstance(v, bool)
              and k.split(".")[-1] in ("hidden_size", "intermediate_size", "model_channels", "context_dim", "ch",
                                        "z_channels", "embed_dim", "num_attention_heads", "projection_dim")]
    layers = [v for k, v in _flatten(config) if isinstance(v, int) and k.split(".")[-1] == "num_hidden_layers"]
    if any(w < 1 or w > MAX_CHANNELS * 4 for w in widths) or any(n < 1 or n > MAX_LAYERS for n in layers):
        raise ValueError(f"the toy world file's {name} config asks for sizes outside a toy world's (widths up to "
                         f"{MAX_CHANNELS * 4}, up to {MAX_LAYERS} layers): {json.dumps(config)[:300]}. The file is "
                         f"not one Retrace's training script wrote; run scripts/train_toy_world.py again.")


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{prefix}{k}.")]
    if isinstance(value, list):
        return [item for v in value for item in _flatten(v, prefix)]
    return [(prefix.rstrip("."), value)]


def read_weights(path: Path, family: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """The parts' state dicts (fp16 as stored) and configs of a toy world file, checked before anything is built:
    format, family, config sizes, no NaN or infinity. Raises ValueError naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError(f"Retrace Load Toy World: no weights for family {family!r} at {path}. The pack ships "
                         f"models/toy_world/{FAMILIES.get(family, '?')}; run scripts/train_toy_world.py to make it.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("family") != family:
                raise ValueError(f"Retrace Load Toy World: {path.name} is not a toy world {family} file (format "
                                 f"{metadata.get('format')!r}, family {metadata.get('family')!r}; expected {FORMAT!r}, "
                                 f"{family!r}).")
            configs = {part: json.loads(metadata[f"{part}_config"]) for part in PARTS[family]}
            for part, config in configs.items():
                check_config(part, config)
            parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS[family]}
            for key in f.keys():
                part, _, name = key.partition(".")
                if part not in parts:
                    raise ValueError(f"Retrace Load Toy World: {path.name} holds an unknown tensor {key!r}.")
                parts[part][name] = f.get_tensor(key)
    except (SafetensorError, json.JSONDecodeError, KeyError, OSError) as error:
        raise ValueError(f"Retrace Load Toy World: {path.name} cannot be read as a toy world file ({error}); "
                         f"restore it from the repository or run scripts/train_toy_world.py again.") from error
    bad = [f"{part}.{name}" for part, tensors in parts.items() for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"Retrace Load Toy World: {path.name} holds NaN or infinite weights ({', '.join(bad[:3])}); "
                         f"restore it from the repository.")
    return parts, configs


def _expand_token_rows(text: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    rows = text.pop("token_rows").long()
    key = next(k for k in text if k.endswith("token_embedding.weight"))
    stored = text[key]
    if rows.numel() != stored.shape[0] or int(rows.max()) >= config["vocab_size"] or int(rows.min()) < 0:
        raise ValueError(f"Retrace Load Toy World: the text encoder's {rows.numel()} token rows do not match its "
                         f"{stored.shape[0]} stored embeddings within a vocabulary of {config['vocab_size']}.")
    table = stored.new_zeros(config["vocab_size"], stored.shape[1])
    table[rows] = stored
    return {**text, key: table}


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], part: str, name: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"Retrace Load Toy World: {name}'s {part} does not fit its config: {len(missing)} tensors "
                         f"missing, {len(unexpected)} unexpected, {len(shapes)} of another shape (e.g. "
                         f"{(missing or unexpected or shapes)[0]!r}).")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load(family: str, path: Path | None = None) -> tuple[Any, comfy.sd.CLIP, comfy.sd.VAE]:
    """MODEL, CLIP and VAE of a toy world family from its weights file (float32 in memory)."""
    if family not in FAMILIES:
        raise ValueError(f"Retrace Load Toy World: the toy world has no {family!r} family; it has {sorted(FAMILIES)}.")
    path = path or WEIGHTS_DIR / FAMILIES[family]
    parts, configs = read_weights(path, family)
    if family == "flux":
        patcher = build_dit(parts["dit"], configs["dit"])
        dit = patcher.model.model_config.process_unet_state_dict(dict(parts["dit"]))
        _load_strict(diffusion_module(patcher), dit, "DiT", path.name)
    else:
        patcher = build_unet(configs["unet"])
        _load_strict(diffusion_module(patcher), parts["unet"], "UNet", path.name)
    clip = build_clip(configs["text"])
    _load_strict(text_module(clip), _expand_token_rows(parts["text"], configs["text"]), "text encoder", path.name)
    vae_state = {k: v.float() for k, v in parts["vae"].items()}
    vae = build_vae(vae_state, configs["vae"])
    _load_strict(vae.first_stage_model, vae_state, "VAE", path.name)  # the host's VAE loads leniently
    return patcher, clip, vae
