"""StyleGAN3 generator (configs T and R) in plain torch.

Written from "Alias-Free Generative Adversarial Networks" (Karras et al. 2021): Fourier-feature input
(section 3.2), modulated convolution with an input magnitude EMA, filtered leaky ReLU (section 3.2,
Figure 4: upsample, nonlinearity, low-pass, downsample), and the layer schedule of Appendix F (geometric
progression of cutoffs and stopbands, critically sampled last layers). Filters are Kaiser-windowed sincs,
separable for config T and radially symmetric (jinc) for config R (Appendix C.1, F). Parameter and buffer
names follow the public ``G_ema`` checkpoints so ``load_state_dict(strict=True)`` takes them as they are;
loaded models use the filters stored in the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import FullyConnectedLayer, MappingNetwork, upfirdn2d

log = logging.getLogger(__name__)

# Constructor arguments that only matter for training; accepted and ignored.
_TRAINING_ONLY = frozenset({"magnitude_ema_beta", "fused_modconv_default"})
_SYNTHESIS_KEYS = frozenset({
    "channel_base", "channel_max", "num_layers", "num_critical", "first_cutoff", "first_stopband",
    "last_stopband_rel", "margin_size", "output_scale", "num_fp16_res", "conv_kernel", "filter_size",
    "lrelu_upsampling", "use_radial_filters", "conv_clamp",
})


# --- Filter design (Appendix C.1: Kaiser-windowed sinc / jinc low-pass filters) -------------------------


def _kaiser_beta(numtaps: int, width: float) -> float:
    """Kaiser window shape for ``numtaps`` taps and a transition width relative to Nyquist (Kaiser's formulas)."""
    atten = 2.285 * (numtaps - 1) * math.pi * width + 7.95
    if atten > 50:
        return 0.1102 * (atten - 8.7)
    if atten > 21:
        return 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21)
    return 0.0


def design_lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float,
                          radial: bool = False) -> torch.Tensor | None:
    """Low-pass FIR with ``numtaps`` taps, cutoff ``cutoff`` and transition ``width`` at sampling rate ``fs``.

    Separable: a 1-D windowed sinc normalised to unit DC gain. Radial: a 2-D windowed jinc
    ``J1(2 pi f_c r) / (pi r)`` with the outer product of the 1-D window, normalised to unit sum.
    ``None`` (identity) for one tap. Computed in float64 with numpy/torch only (no scipy).
    """
    if numtaps < 1:
        raise ValueError(f"numtaps must be >= 1, got {numtaps}")
    if numtaps == 1:
        return None
    nyquist = fs / 2
    window = np.kaiser(numtaps, _kaiser_beta(numtaps, width / nyquist))
    if not radial:
        c = cutoff / nyquist
        t = np.arange(numtaps) - (numtaps - 1) / 2
        h = c * np.sinc(c * t) * window
        return torch.as_tensor(h / h.sum(), dtype=torch.float32)
    coords = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
    r = np.hypot(*np.meshgrid(coords, coords))
    arg = torch.as_tensor(2 * math.pi * cutoff * r, dtype=torch.float64, device="cpu")
    j1 = torch.special.bessel_j1(arg).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(r > 0, j1 / (math.pi * np.where(r > 0, r, 1.0)), cutoff)  # limit at r=0 is f_c
    h = h * np.outer(window, window)
    return torch.as_tensor(h / h.sum(), dtype=torch.float32)


# --- Layer schedule (Appendix F) -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """Everything that fixes one synthesis layer's shape and filters."""

    name: str
    is_torgb: bool
    is_critically_sampled: bool
    use_fp16: bool
    in_channels: int
    out_channels: int
    in_size: int
    out_size: int
    in_sampling_rate: int
    out_sampling_rate: int
    tmp_sampling_rate: int
    in_cutoff: float
    out_cutoff: float
    in_half_width: float
    out_half_width: float
    conv_kernel: int
    up_factor: int
    up_taps: int
    down_factor: int
    down_taps: int
    down_radial: bool
    padding: tuple[int, int, int, int]


@dataclass(frozen=True)
class InputSpec:
    """The Fourier-feature input: channels, size, sampling rate and bandwidth."""

    channels: int
    size: int
    sampling_rate: float
    bandwidth: float


def synthesis_schedule(img_resolution: int, img_channels: int, channel_base: int = 32768, channel_max: int = 512,
                       num_layers: int = 14, num_critical: int = 2, first_cutoff: float = 2,
                       first_stopband: float = 2 ** 2.1, last_stopband_rel: float = 2 ** 0.3, margin_size: int = 10,
                       num_fp16_res: int = 4, conv_kernel: int = 3, filter_size: int = 6, lrelu_upsampling: int = 2,
                       use_radial_filters: bool = False) -> tuple[InputSpec, list[LayerSpec]]:
    """The per-layer cutoffs, stopbands, sampling rates, sizes and channels of Appendix F, without tensors.

    Cutoff f_c and minimum stopband f_t grow geometrically from the first layer to the last non-critical one
    and then stay at the image's Nyquist rate; the sampling rate is the smallest power of two >= 2 f_t (at most
    the image resolution); each layer keeps ``margin_size`` extra pixels per side except the last two.
    """
    last_cutoff = img_resolution / 2
    last_stopband = last_cutoff * last_stopband_rel
    exponents = np.minimum(np.arange(num_layers + 1) / (num_layers - num_critical), 1)
    cutoffs = first_cutoff * (last_cutoff / first_cutoff) ** exponents
    stopbands = first_stopband * (last_stopband / first_stopband) ** exponents
    rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, img_resolution))))
    half_widths = np.maximum(stopbands, rates / 2) - cutoffs
    sizes = rates + margin_size * 2
    sizes[-2:] = img_resolution
    channels = np.rint(np.minimum((channel_base / 2) / cutoffs, channel_max))
    channels[-1] = img_channels

    inp = InputSpec(channels=int(channels[0]), size=int(sizes[0]), sampling_rate=float(rates[0]),
                    bandwidth=float(cutoffs[0]))
    specs = []
    for idx in range(num_layers + 1):
        prev = max(idx - 1, 0)
        is_torgb = idx == num_layers
        critical = idx >= num_layers - num_critical
        in_rate, out_rate = int(rates[prev]), int(rates[idx])
        tmp_rate = max(in_rate, out_rate) * (1 if is_torgb else lrelu_upsampling)
        up = int(np.rint(tmp_rate / in_rate))
        down = int(np.rint(tmp_rate / out_rate))
        if in_rate * up != tmp_rate or out_rate * down != tmp_rate:
            raise ValueError(f"layer {idx}: sampling rates {in_rate} -> {out_rate} are not integer ratios of {tmp_rate}")
        up_taps = filter_size * up if up > 1 and not is_torgb else 1
        down_taps = filter_size * down if down > 1 and not is_torgb else 1
        kernel = 1 if is_torgb else conv_kernel
        in_size, out_size = int(sizes[prev]), int(sizes[idx])
        # Appendix C.3: pad so that the output samples sit where the symmetric interpretation puts them.
        pad_total = (out_size - 1) * down + 1 - (in_size + kernel - 1) * up + up_taps + down_taps - 2
        pad_lo = (pad_total + up) // 2
        pad_hi = pad_total - pad_lo
        out_channels = int(channels[idx])
        specs.append(LayerSpec(
            name=f"L{idx}_{out_size}_{out_channels}", is_torgb=is_torgb, is_critically_sampled=critical,
            use_fp16=bool(rates[idx] * (2 ** num_fp16_res) > img_resolution),
            in_channels=int(channels[prev]), out_channels=out_channels, in_size=in_size, out_size=out_size,
            in_sampling_rate=in_rate, out_sampling_rate=out_rate, tmp_sampling_rate=tmp_rate,
            in_cutoff=float(cutoffs[prev]), out_cutoff=float(cutoffs[idx]),
            in_half_width=float(half_widths[prev]), out_half_width=float(half_widths[idx]),
            conv_kernel=kernel, up_factor=up, up_taps=up_taps, down_factor=down, down_taps=down_taps,
            down_radial=bool(use_radial_filters and not critical),
            padding=(pad_lo, pad_hi, pad_lo, pad_hi)))
    return inp, specs


# --- Building blocks -------------------------------------------------------------------------------------


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int = 0, input_gain: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2's modulated convolution (Eq. 1-3 of Karras et al. 2020) with an optional input gain.

    Weight and styles are first scaled to unit RMS (per sample), which demodulation undoes, so the math
    stays in range in half precision. The modulation runs in float32; the convolution in ``x.dtype``.
    """
    batch, in_channels = styles.shape
    out_channels, _, kh, kw = weight.shape
    w = weight.to(torch.float32)
    s = styles.to(torch.float32)
    if demodulate:
        w = w * w.square().mean(dim=[1, 2, 3], keepdim=True).rsqrt()
        s = s * s.square().mean(dim=1, keepdim=True).rsqrt()
    w = w.unsqueeze(0) * s[:, None, :, None, None]  # [B, O, I, k, k]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    if input_gain is not None:  # [], [I] or [B, I]: scales the input channels
        gain = input_gain.to(torch.float32)
        if gain.ndim > 0:
            gain = gain.expand(batch, in_channels)[:, None, :, None, None]
        w = w * gain
    x = x.reshape(1, batch * in_channels, *x.shape[2:])
    x = F.conv2d(x, w.reshape(batch * out_channels, in_channels, kh, kw).to(x.dtype), padding=padding, groups=batch)
    return x.reshape(batch, out_channels, *x.shape[2:])


def _fir_downsample(x: torch.Tensor, f: torch.Tensor | None, down: int) -> torch.Tensor:
    """Convolve with FIR ``f`` (1-D separable or 2-D), no padding, keeping every ``down``-th sample.

    Same result as ``upfirdn2d(x, f, down=down)`` but only the kept samples are computed (strided conv).
    """
    if f is None:
        return x[:, :, ::down, ::down] if down > 1 else x
    channels = x.shape[1]
    f = f.to(device=x.device, dtype=x.dtype).flip(list(range(f.ndim)))
    if f.ndim == 2:
        return F.conv2d(x, f[None, None].expand(channels, 1, *f.shape), stride=down, groups=channels)
    taps = f.shape[0]
    x = F.conv2d(x, f.reshape(1, 1, 1, taps).expand(channels, 1, 1, taps), stride=(1, down), groups=channels)
    return F.conv2d(x, f.reshape(1, 1, taps, 1).expand(channels, 1, taps, 1), stride=(down, 1), groups=channels)


def filtered_lrelu(x: torch.Tensor, fu: torch.Tensor | None, fd: torch.Tensor | None, b: torch.Tensor | None,
                   up: int = 1, down: int = 1, padding: tuple[int, int, int, int] = (0, 0, 0, 0),
                   gain: float = math.sqrt(2), slope: float = 0.2, clamp: float | None = None) -> torch.Tensor:
    """The alias-free nonlinearity of section 3.2 / Figure 4, as a plain-torch reference.

    Add bias; upsample by ``up`` (zero insertion, ``padding`` = [x0, x1, y0, y1] on the upsampled grid) and
    low-pass with ``fu``; leaky ReLU times ``gain``; clamp to +-``clamp``; low-pass with ``fd`` and keep every
    ``down``-th sample.
    """
    if b is not None:
        x = x + b.to(x.dtype).reshape(1, -1, 1, 1)
    if fu is None and up == 1:
        x = F.pad(x, list(padding))
    else:
        x = upfirdn2d(x, fu, up=up, padding=list(padding), gain=up ** 2)
    if slope != 1:
        x = F.leaky_relu(x, slope)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return _fir_downsample(x, fd, down)


class SynthesisInput(nn.Module):
    """Fourier features (section 3.2): sinusoids of fixed random frequencies, rotated and translated by ``w``.

    ``affine`` maps w to (r_c, r_s, t_x, t_y); ``transform`` is a user-settable inverse transform (3x3,
    identity by default) applied after the learned one. ``weight`` mixes the features (1x1, equalized lr).
    """

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float):
        super().__init__()
        self.w_dim = w_dim
        self.channels = channels
        self.size = int(size)
        self.sampling_rate = float(sampling_rate)
        self.bandwidth = float(bandwidth)
        # Random directions; radii shrink as |g| * exp(-|g|^2 / 4) and are scaled to the bandwidth.
        g = torch.randn([channels, 2])
        radius = g.norm(dim=1, keepdim=True)
        freqs = g / (radius * (radius.square() / 4).exp()) * bandwidth
        phases = torch.rand([channels]) - 0.5
        self.weight = nn.Parameter(torch.randn([channels, channels]))
        self.affine = FullyConnectedLayer(w_dim, 4, bias_init=[1.0, 0.0, 0.0, 0.0])
        with torch.no_grad():
            self.affine.weight.zero_()
        self.register_buffer("transform", torch.eye(3))
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", phases)

    @torch.no_grad()
    def set_transform(self, angle: float = 0.0, translate: tuple[float, float] = (0.0, 0.0)) -> None:
        """Rotate the output by ``angle`` degrees and shift it by ``translate`` (in image units, 1 = width)."""
        a = math.radians(angle)
        m = torch.tensor([[math.cos(a), math.sin(a), translate[0]],
                          [-math.sin(a), math.cos(a), translate[1]],
                          [0.0, 0.0, 1.0]], dtype=torch.float64)
        self.transform.copy_(torch.linalg.inv(m).to(self.transform.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """[B, w_dim] -> [B, channels, size, size] float32."""
        w = w.to(torch.float32)
        batch = w.shape[0]
        t = self.affine(w)
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        eye = torch.eye(3, device=w.device, dtype=torch.float32)
        rot = eye.repeat(batch, 1, 1)  # inverse rotation of the image: [[c, -s], [s, c]]
        rot[:, 0, 0] = t[:, 0]
        rot[:, 0, 1] = -t[:, 1]
        rot[:, 1, 0] = t[:, 1]
        rot[:, 1, 1] = t[:, 0]
        shift = eye.repeat(batch, 1, 1)  # inverse translation of the image
        shift[:, 0, 2] = -t[:, 2]
        shift[:, 1, 2] = -t[:, 3]
        m = rot @ shift @ self.transform.to(torch.float32).unsqueeze(0)

        freqs = self.freqs.to(torch.float32).unsqueeze(0)  # [1, C, 2]
        phases = self.phases.to(torch.float32).unsqueeze(0) + (freqs @ m[:, :2, 2:]).squeeze(2)  # [B, C]
        freqs = freqs @ m[:, :2, :2]  # [B, C, 2]
        # Fade out frequencies the user transform pushed past the band limit.
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)

        # Pixel centres in units of the sampling grid, centred on the image.
        coords = (torch.arange(self.size, device=w.device, dtype=torch.float32) + 0.5 - self.size / 2) \
            / self.sampling_rate
        x = coords.reshape(1, 1, -1, 1) * freqs[:, None, None, :, 0] \
            + coords.reshape(1, -1, 1, 1) * freqs[:, None, None, :, 1]  # [B, H, W, C]
        x = torch.sin((x + phases[:, None, None, :]) * (2 * math.pi)) * amplitudes[:, None, None, :]
        x = x @ (self.weight.to(torch.float32) / math.sqrt(self.channels)).t()
        return x.permute(0, 3, 1, 2)


class SynthesisLayer(nn.Module):
    """Modulated conv + filtered leaky ReLU (section 3.2).

    The last layer (``is_torgb``) is a 1x1 conv without demodulation, styles scaled by 1/sqrt(fan-in), and a
    linear activation without resampling. ``input_gain = magnitude_ema ** -0.5`` normalises the input.
    """

    def __init__(self, w_dim: int, spec: LayerSpec, conv_clamp: float | None = 256):
        super().__init__()
        self.spec = spec
        self.w_dim = w_dim
        for key in ("is_torgb", "is_critically_sampled", "use_fp16", "in_channels", "out_channels", "in_size",
                    "out_size", "in_sampling_rate", "out_sampling_rate", "tmp_sampling_rate", "in_cutoff",
                    "out_cutoff", "in_half_width", "out_half_width", "conv_kernel", "up_factor", "up_taps",
                    "down_factor", "down_taps", "down_radial"):
            setattr(self, key, getattr(spec, key))
        self.padding = list(spec.padding)
        self.conv_clamp = conv_clamp

        self.affine = FullyConnectedLayer(w_dim, spec.in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([spec.out_channels, spec.in_channels, spec.conv_kernel,
                                                spec.conv_kernel]))
        self.bias = nn.Parameter(torch.zeros([spec.out_channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))
        up = design_lowpass_filter(spec.up_taps, spec.in_cutoff, spec.in_half_width * 2, spec.tmp_sampling_rate)
        down = design_lowpass_filter(spec.down_taps, spec.out_cutoff, spec.out_half_width * 2,
                                     spec.tmp_sampling_rate, radial=spec.down_radial)
        # Registering None keeps the key out of the state_dict, as in the checkpoints.
        self.register_buffer("up_filter", up)
        self.register_buffer("down_filter", down)

    def forward(self, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x [B, in_channels, in_size, in_size], w [B, w_dim] -> [B, out_channels, out_size, out_size] in ``dtype``."""
        styles = self.affine(w.to(torch.float32))
        if self.is_torgb:
            styles = styles * (1 / math.sqrt(self.in_channels * self.conv_kernel ** 2))
        x = modulated_conv2d(x.to(dtype), self.weight, styles, demodulate=not self.is_torgb,
                             padding=self.conv_kernel - 1, input_gain=self.magnitude_ema.to(torch.float32).rsqrt())
        return filtered_lrelu(x, self.up_filter, self.down_filter, self.bias, up=self.up_factor,
                              down=self.down_factor, padding=tuple(self.padding),
                              gain=1.0 if self.is_torgb else math.sqrt(2), slope=1.0 if self.is_torgb else 0.2,
                              clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}x{self.in_size}@{self.in_sampling_rate}, "
                f"out={self.out_channels}x{self.out_size}@{self.out_sampling_rate}, up={self.up_factor}, "
                f"down={self.down_factor}, torgb={self.is_torgb}, fp16={self.use_fp16}")


class SynthesisNetwork(nn.Module):
    """Fourier input + ``num_layers`` + 1 synthesis layers; ws[0] drives the input, ws[1..] the layers."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_layers: int = 14, num_critical: int = 2, first_cutoff: float = 2,
                 first_stopband: float = 2 ** 2.1, last_stopband_rel: float = 2 ** 0.3, margin_size: int = 10,
                 output_scale: float = 0.25, num_fp16_res: int = 4, conv_kernel: int = 3, filter_size: int = 6,
                 lrelu_upsampling: int = 2, use_radial_filters: bool = False, conv_clamp: float | None = 256):
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_layers = num_layers
        self.num_ws = num_layers + 2
        self.margin_size = margin_size
        self.output_scale = output_scale
        self.num_fp16_res = num_fp16_res
        inp, specs = synthesis_schedule(
            img_resolution, img_channels, channel_base=channel_base, channel_max=channel_max, num_layers=num_layers,
            num_critical=num_critical, first_cutoff=first_cutoff, first_stopband=first_stopband,
            last_stopband_rel=last_stopband_rel, margin_size=margin_size, num_fp16_res=num_fp16_res,
            conv_kernel=conv_kernel, filter_size=filter_size, lrelu_upsampling=lrelu_upsampling,
            use_radial_filters=use_radial_filters)
        self.input = SynthesisInput(w_dim, inp.channels, inp.size, inp.sampling_rate, inp.bandwidth)
        self.layer_names: list[str] = []
        for spec in specs:
            setattr(self, spec.name, SynthesisLayer(w_dim, spec, conv_clamp=conv_clamp))
            self.layer_names.append(spec.name)

    def layers(self) -> list[SynthesisLayer]:
        return [getattr(self, name) for name in self.layer_names]

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", noise: dict[str, torch.Tensor] | None = None,
                force_fp32: bool = False) -> torch.Tensor:
        """ws [B, num_ws, w_dim] -> image [B, img_channels, R, R] float32.

        StyleGAN3 has no noise inputs: ``noise_mode`` is accepted and ignored, ``noise`` must be empty.
        Precision: a float32 model runs its top ``num_fp16_res`` resolutions in float16 on CUDA (unless
        ``force_fp32``); a model cast to float16/bfloat16 runs every layer in that dtype. Style and weight
        modulation always run in float32.
        """
        if noise_mode not in ("const", "random", "none"):
            raise ValueError(f"noise_mode must be 'const', 'random' or 'none', got {noise_mode!r}")
        if noise:
            raise ValueError(f"StyleGAN3 has no noise inputs; got noise for {sorted(noise)}")
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        ws = ws.to(torch.float32)
        model_dtype = self.input.weight.dtype
        x = self.input(ws[:, 0])
        for idx, layer in enumerate(self.layers()):
            if force_fp32:
                dtype = torch.float32
            elif model_dtype != torch.float32:
                dtype = model_dtype
            else:
                dtype = torch.float16 if layer.use_fp16 and x.device.type == "cuda" else torch.float32
            x = layer(x, ws[:, idx + 1], dtype=dtype)
        if self.output_scale != 1:
            x = x * self.output_scale
        return x.to(torch.float32)


# --- Generator -------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-serialisable copy (numpy scalars to Python numbers, tuples to lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Generator(nn.Module):
    """StyleGAN3 generator: mapping (2 layers by default) + alias-free synthesis network.

    Accepts the flat constructor form of the stylegan3 repository and the nested ``synthesis_kwargs={...}``
    form; ``init_kwargs`` is always the flat form.
    """

    family = "stylegan3"

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict[str, Any] | None = None, **synthesis_kwargs: Any):
        super().__init__()
        flat = dict(synthesis_kwargs)
        nested = flat.pop("synthesis_kwargs", None)
        if nested:
            clash = set(nested) & set(flat)
            if clash:
                raise TypeError(f"synthesis arguments given twice (flat and nested): {sorted(clash)}")
            flat.update(nested)
        unknown = set(flat) - _SYNTHESIS_KEYS - _TRAINING_ONLY
        if unknown:
            raise TypeError(f"unknown StyleGAN3 synthesis arguments: {sorted(unknown)}")
        ignored = set(flat) & _TRAINING_ONLY
        if ignored:
            log.debug("ignoring training-only arguments %s", sorted(ignored))
        mapping_kwargs = dict(mapping_kwargs or {})

        self.z_dim, self.c_dim, self.w_dim = int(z_dim), int(c_dim), int(w_dim)
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.init_kwargs: dict[str, Any] = _plain({
            "z_dim": self.z_dim, "c_dim": self.c_dim, "w_dim": self.w_dim, "img_resolution": self.img_resolution,
            "img_channels": self.img_channels, "mapping_kwargs": mapping_kwargs, **flat})
        json.dumps(self.init_kwargs)  # fail early if a value cannot be stored

        self.synthesis = SynthesisNetwork(w_dim=self.w_dim, img_resolution=self.img_resolution,
                                          img_channels=self.img_channels,
                                          **{k: v for k, v in flat.items() if k in _SYNTHESIS_KEYS})
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=self.z_dim, c_dim=self.c_dim, w_dim=self.w_dim, num_ws=self.num_ws,
                                      **{"num_layers": 2, "w_avg_beta": 0.998, **mapping_kwargs})

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const", **synthesis_kwargs: Any) -> torch.Tensor:
        """z [B, z_dim] (and label c) -> image [B, C, R, R] float32 in about [-1, 1]."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, **synthesis_kwargs)

    def noise_maps(self) -> dict[str, torch.Tensor]:
        """StyleGAN3 has no per-layer noise: always empty."""
        return {}

    def style_layers(self) -> list[tuple[str, int, FullyConnectedLayer]]:
        """(layer name, ws index, style affine) for L0..L{n}; ws[0] (the input transform) is not a style."""
        return [(name, idx + 1, getattr(self.synthesis, name).affine)
                for idx, name in enumerate(self.synthesis.layer_names)]
