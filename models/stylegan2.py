"""The StyleGAN2 generator (config F, and the StyleGAN2-ADA variants), in plain torch.

Written from Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (section 2.2:
weight modulation and demodulation, eq. 1-3; section 4.1 and figure 7: the 'skip' and 'resnet' generators;
appendix B: equalized learning rate) and Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data" (ADA: mixed precision in the highest resolutions with activations clamped to +-``conv_clamp``).
Parameter and buffer names follow the public checkpoints, so their ``G_ema`` tensors load with ``strict=True``.

Layout: ``mapping`` (z -> w, see ``layers.MappingNetwork``) and ``synthesis`` with blocks ``b4 ... b{R}``.
Each block holds ``conv0`` (2x upsampling, not in ``b4``), ``conv1``, ``torgb`` (every block for 'skip', the last
block otherwise) and ``skip`` (the 1x1 upsampling residual branch of 'resnet'); ``b4`` starts from ``const``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LRELU_GAIN, FullyConnectedLayer, MappingNetwork, bias_act, setup_filter, upfirdn2d, upsample2d

log = logging.getLogger(__name__)

ARCHITECTURES = ("orig", "skip", "resnet")
NOISE_MODES = ("const", "random", "none")

# Constructor arguments of the original training code that change nothing at inference.
_IGNORED_KWARGS = frozenset({
    "fp16_channels_last", "channels_last", "fused_modconv_default", "magnitude_ema_beta", "update_emas",
})
# Synthesis arguments this implementation understands (flat form), with the stylegan3-repo defaults.
_SYNTHESIS_DEFAULTS: dict[str, Any] = {
    "channel_base": 32768, "channel_max": 512, "num_fp16_res": 4, "conv_clamp": 256, "architecture": "skip",
    "resample_filter": [1, 3, 3, 1], "kernel_size": 3, "use_noise": True, "activation": "lrelu",
}
# The stylegan2-ada-pytorch code (nested ``synthesis_kwargs``) defaults to full precision and no clamping.
_ADA_DEFAULTS: dict[str, Any] = {"num_fp16_res": 0, "conv_clamp": None}


def _act_gain(activation: str) -> float:
    if activation == "lrelu":
        return LRELU_GAIN
    if activation == "linear":
        return 1.0
    raise ValueError(f"unknown activation {activation!r}; expected 'lrelu' or 'linear'")


def _fir_up_padding(kernel: int, fw: int, fh: int, up: int = 2) -> list[int]:
    """FIR padding after a stride-``up`` transposed convolution with a ``kernel`` x ``kernel`` weight.

    The transposed convolution equals zero insertion followed by a full convolution with the weight. The FIR
    low-pass after it is padded so the pair keeps the output ``up * size`` and centred, the same as zero insertion,
    low-pass, then a 'same' convolution (all three are linear and shift-invariant, so their order is free).
    """
    pad = kernel // 2
    x0 = pad + (fw + up - 1) // 2 - (kernel - 1)
    x1 = pad + (fw - up) // 2 - (kernel - up)
    y0 = pad + (fh + up - 1) // 2 - (kernel - 1)
    y1 = pad + (fh - up) // 2 - (kernel - up)
    return [x0, x1, y0, y1]


def _conv_up2(x: torch.Tensor, weight: torch.Tensor, f: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Convolution (true convolution, not correlation) of the 2x upsampled ``x``: stride-2 transposed conv + FIR.

    ``weight`` is ``[groups * out, in, k, k]``; the FIR ``f`` is applied with gain 4 so a constant stays constant.
    """
    out_total, in_per_group, kh, kw = weight.shape
    out_per_group = out_total // groups
    # conv_transpose2d wants [in, out / groups, k, k], grouped by the input channels.
    wt = weight.reshape(groups, out_per_group, in_per_group, kh, kw).transpose(1, 2)
    wt = wt.reshape(groups * in_per_group, out_per_group, kh, kw)
    x = F.conv_transpose2d(x, wt, stride=2, groups=groups)
    fh, fw = (int(f.shape[0]), int(f.shape[-1])) if f.ndim == 2 else (int(f.shape[0]), int(f.shape[0]))
    return upfirdn2d(x, f, padding=_fir_up_padding(kw, fw, fh), gain=4.0)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     up: int = 1, resample_filter: torch.Tensor | None = None,
                     fused: bool = True) -> torch.Tensor:
    """Modulated convolution, StyleGAN2 eq. 1-3: ``w'_ijk = s_i w_ijk``, then ``w''_ijk = w'_ijk / sqrt(sum w'^2)``.

    ``x`` [N, I, H, W] in the compute dtype, ``weight`` [O, I, k, k], ``styles`` [N, I]. The per-sample weights and
    the demodulation factors are formed in float32 and only the convolution runs in ``x.dtype``. ``fused`` folds
    the styles into per-sample weights and runs one grouped convolution; otherwise the activations are scaled
    before and after one shared convolution (same result, cheaper for large batches of small images).
    ``up=2`` upsamples with ``resample_filter`` (the weight is then applied as a true convolution).
    """
    batch = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    w = weight.to(torch.float32)
    s = styles.to(torch.float32)
    if x.dtype == torch.float16 and demodulate:
        # Rescale before the products so float16 cannot overflow; demodulation cancels the scale.
        w = w * (1 / math.sqrt(in_ch * kh * kw) / w.abs().amax(dim=[1, 2, 3], keepdim=True))
        s = s / s.abs().amax(dim=1, keepdim=True)
    dcoefs = None
    if demodulate:
        # sum_{i,k} (s_i w_oik)^2 without forming the [N, O, I, k, k] product.
        dcoefs = (s.square() @ w.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()  # [N, O]
    pad = kh // 2

    if fused:
        wm = w.unsqueeze(0) * s.reshape(batch, 1, in_ch, 1, 1)
        if dcoefs is not None:
            wm = wm * dcoefs.reshape(batch, out_ch, 1, 1, 1)
        wm = wm.reshape(batch * out_ch, in_ch, kh, kw).to(x.dtype)
        xg = x.reshape(1, batch * in_ch, *x.shape[2:])
        if up == 1:
            y = F.conv2d(xg, wm, padding=pad, groups=batch)
        else:
            y = _conv_up2(xg, wm, resample_filter, groups=batch)
        return y.reshape(batch, out_ch, *y.shape[2:])

    x = x * s.to(x.dtype).reshape(batch, in_ch, 1, 1)
    wx = w.to(x.dtype)
    x = F.conv2d(x, wx, padding=pad) if up == 1 else _conv_up2(x, wx, resample_filter)
    if dcoefs is not None:
        x = x * dcoefs.to(x.dtype).reshape(batch, out_ch, 1, 1)
    return x


def _as_noise(noise: torch.Tensor, batch: int, size: int, name: str) -> torch.Tensor:
    """A noise override as [1 or N, 1, H, W] (also accepts [H, W] and [1 or N, H, W])."""
    if noise.ndim == 2:
        noise = noise[None, None]
    elif noise.ndim == 3:
        noise = noise[:, None]
    if noise.ndim != 4 or noise.shape[1] != 1 or tuple(noise.shape[2:]) != (size, size) \
            or noise.shape[0] not in (1, batch):
        raise ValueError(f"noise for {name!r} has shape {tuple(noise.shape)}; expected [1 or {batch}, 1, {size}, {size}]")
    return noise


class SynthesisLayer(nn.Module):
    """One modulated 3x3 convolution (optionally 2x upsampling), per-pixel noise, bias, leaky ReLU, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: list[float] | tuple[float, ...] = (1, 3, 3, 1), conv_clamp: float | None = None):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.act_gain = _act_gain(activation)
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const", noise: torch.Tensor | None = None,
                fused_modconv: bool = True, gain: float = 1.0, name: str = "") -> torch.Tensor:
        """``x`` [N, in, R/up, R/up], ``w`` [N, w_dim] -> [N, out, R, R]; ``noise`` overrides the noise input."""
        styles = self.affine(w.to(torch.float32))
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, up=self.up,
                             resample_filter=self.resample_filter, fused=fused_modconv)
        if self.use_noise:
            if noise is not None:
                n = _as_noise(noise, x.shape[0], self.resolution, name)
            elif noise_mode == "const":
                n = self.noise_const
            elif noise_mode == "random":
                n = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
            else:
                n = None
            if n is not None:
                x = x + (n.to(torch.float32) * self.noise_strength.to(torch.float32)).to(x.dtype)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation; the style carries 1/sqrt(fan_in)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
        styles = self.affine(w.to(torch.float32)) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused_modconv)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SkipLayer(nn.Module):
    """The 'resnet' shortcut: 1x1 convolution (no bias, equalized lr) followed by 2x FIR upsampling."""

    def __init__(self, in_channels: int, out_channels: int,
                 resample_filter: list[float] | tuple[float, ...] = (1, 3, 3, 1)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight.to(torch.float32) * self.weight_gain).to(x.dtype)
        x = F.conv2d(x, w)
        return upsample2d(x, self.resample_filter, gain=gain)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network (StyleGAN2 figure 7)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip",
                 resample_filter: list[float] | tuple[float, ...] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 use_fp16: bool = False, **layer_kwargs: Any):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.img_channels, self.is_last = resolution, img_channels, is_last
        self.architecture, self.use_fp16 = architecture, use_fp16
        self.register_buffer("resample_filter", setup_filter(list(resample_filter)))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = SkipLayer(in_channels, out_channels, resample_filter=resample_filter)

    def compute_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """float32 if forced; the parameters' dtype after a whole-model cast; else float16 for fp16 blocks on CUDA."""
        if force_fp32:
            return torch.float32
        param_dtype = self.conv1.weight.dtype
        if param_dtype != torch.float32:
            return param_dtype
        if self.use_fp16 and device.type == "cuda":
            return torch.float16
        return torch.float32

    def layer_names(self) -> list[str]:
        return (["conv0"] if self.in_channels != 0 else []) + ["conv1"]

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str = "const",
                noise: dict[str, torch.Tensor] | None = None, force_fp32: bool = False,
                fused_modconv: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ws`` [N, num_conv + num_torgb, w_dim]; returns the features and the float32 image so far."""
        dtype = self.compute_dtype(ws.device, force_fp32)
        noise = noise or {}
        prefix = f"b{self.resolution}"
        w_iter = iter(ws.unbind(dim=1))

        def run(layer_name: str, inp: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
            name = f"{prefix}.{layer_name}"
            return getattr(self, layer_name)(inp, next(w_iter), noise_mode=noise_mode, noise=noise.get(name),
                                             fused_modconv=fused_modconv, gain=gain, name=name)

        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = run("conv1", x)
        else:
            x = x.to(dtype)
            if self.architecture == "resnet":
                y = self.skip(x, gain=math.sqrt(0.5))
                x = run("conv0", x)
                x = run("conv1", x, gain=math.sqrt(0.5))
                x = y + x
            else:
                x = run("conv0", x)
                x = run("conv1", x)

        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.num_torgb:
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """w+ [N, num_ws, w_dim] to an image, through blocks b4 ... b{img_resolution}."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 4, **block_kwargs: Any):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        if img_channels < 1:
            raise ValueError(f"img_channels must be >= 1, got {img_channels}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=res == img_resolution,
                                   use_fp16=res >= fp16_resolution, **block_kwargs)
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += getattr(self, f"b{img_resolution}").num_torgb

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def noise_maps(self) -> dict[str, torch.Tensor]:
        """Layer name (e.g. 'b8.conv0') -> that layer's ``noise_const`` buffer [H, W], in synthesis order."""
        out = {}
        for block in self.blocks():
            for layer_name in block.layer_names():
                layer = getattr(block, layer_name)
                if layer.use_noise:
                    out[f"b{block.resolution}.{layer_name}"] = layer.noise_const
        return out

    def style_layers(self) -> list[tuple[str, int, FullyConnectedLayer]]:
        """Every style affine as (name, index into ws, module): a torgb shares the next block's conv0 index."""
        out = []
        w_idx = 0
        for block in self.blocks():
            for i, layer_name in enumerate(block.layer_names()):
                out.append((f"b{block.resolution}.{layer_name}", w_idx + i, getattr(block, layer_name).affine))
            if block.num_torgb:
                out.append((f"b{block.resolution}.torgb", w_idx + block.num_conv, block.torgb.affine))
            w_idx += block.num_conv
        return out

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", noise: dict[str, torch.Tensor] | None = None,
                force_fp32: bool = False, fused_modconv: bool = True, update_emas: bool = False) -> torch.Tensor:
        """Render ``ws`` [N, num_ws, w_dim]; returns a float32 image [N, img_channels, R, R], about [-1, 1]."""
        del update_emas  # training only
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"unknown noise_mode {noise_mode!r}; expected one of {NOISE_MODES}")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws has shape {tuple(ws.shape)}; expected [N, {self.num_ws}, {self.w_dim}]")
        if noise:
            unknown = set(noise) - set(self.noise_maps())
            if unknown:
                raise KeyError(f"no noise input named {sorted(unknown)}; names are {list(self.noise_maps())}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for block in self.blocks():
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            x, img = block(x, img, block_ws, noise_mode=noise_mode, noise=noise, force_fp32=force_fp32,
                           fused_modconv=fused_modconv)
            w_idx += block.num_conv
        return img


def _plain(value: Any) -> Any:
    """A JSON-friendly copy: dict subclasses to dict, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Generator(nn.Module):
    """StyleGAN2 generator: ``mapping`` (z, c -> w+) and ``synthesis`` (w+ -> image).

    Accepts the stylegan3-repo constructor form (synthesis arguments flat) and the stylegan2-ada form
    (``synthesis_kwargs={...}``); ``init_kwargs`` is always the flat form with every synthesis setting resolved.
    """

    family = "stylegan2"

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict[str, Any] | None = None, **synthesis_kwargs: Any):
        super().__init__()
        nested = synthesis_kwargs.pop("synthesis_kwargs", None)
        settings = dict(_SYNTHESIS_DEFAULTS)
        if nested is not None:
            settings.update(_ADA_DEFAULTS)
            clash = set(nested) & set(synthesis_kwargs)
            if clash:
                raise TypeError(f"synthesis arguments given both nested and flat: {sorted(clash)}")
            synthesis_kwargs = {**dict(nested), **synthesis_kwargs}
        for key, value in synthesis_kwargs.items():
            if key in _SYNTHESIS_DEFAULTS:
                settings[key] = value
            elif key not in _IGNORED_KWARGS:
                log.warning("StyleGAN2 Generator: ignoring unknown argument %s=%r", key, value)
        settings["resample_filter"] = [float(v) for v in settings["resample_filter"]]
        mapping_kwargs = _plain(dict(mapping_kwargs or {}))

        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **settings)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)
        self.init_kwargs: dict[str, Any] = {
            "z_dim": z_dim, "c_dim": c_dim, "w_dim": w_dim, "img_resolution": img_resolution,
            "img_channels": img_channels, "mapping_kwargs": mapping_kwargs, **_plain(settings),
        }

    def noise_maps(self) -> dict[str, torch.Tensor]:
        """Layer name -> ``noise_const`` buffer [H, W] (see ``SynthesisNetwork.noise_maps``)."""
        return self.synthesis.noise_maps()

    def style_layers(self) -> list[tuple[str, int, FullyConnectedLayer]]:
        """(name, ws index, affine) of every style affine in synthesis order."""
        return self.synthesis.style_layers()

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const", update_emas: bool = False,
                **synthesis_kwargs: Any) -> torch.Tensor:
        """z [N, z_dim] (and c [N, c_dim] if conditional) to a float32 image [N, C, R, R]."""
        del update_emas  # training only
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, **synthesis_kwargs)
