"""Pieces both StyleGAN generations share, in plain torch (no compiled plugins).

Written from the StyleGAN2 paper (Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN": equalized learning rate, section B; mapping network, section 2) and the parameter names
the public checkpoints use, so ``load_state_dict(strict=True)`` takes their tensors as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (StyleGAN's pixel norm on z)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "linear", gain: float | None = None,
             clamp: float | None = None, dim: int = 1) -> torch.Tensor:
    """Add a per-channel bias, apply ``linear`` or ``lrelu`` (slope 0.2, gain sqrt 2), optionally clamp."""
    if b is not None:
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.to(x.dtype).reshape(shape)
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
        gain = LRELU_GAIN if gain is None else gain
    elif act != "linear":
        raise ValueError(f"unknown activation {act!r}; expected 'linear' or 'lrelu'")
    if gain is not None and gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalized learning rate: stored weights are scaled by ``lr_multiplier / sqrt(in)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float | list[float] = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        init = torch.as_tensor(bias_init, dtype=torch.float32).broadcast_to([out_features])
        self.bias = nn.Parameter(init.clone() / lr_multiplier) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype) * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(nn.Module):
    """z (and an optional class label c) to w, broadcast to ``num_ws`` rows, with truncation toward ``w_avg``.

    StyleGAN2 uses 8 layers, StyleGAN3 2; both name them ``fc{i}`` and keep the running mean ``w_avg``.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None,
                 activation: str = "lrelu", lr_multiplier: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                                          lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor | None, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            if c is None:
                raise ValueError(f"this generator is class-conditional (c_dim={self.c_dim}); pass a label c")
            parts.append(normalize_2nd_moment(self.embed(c.to(torch.float32))))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        return truncate(x, self.w_avg, truncation_psi, truncation_cutoff)


def truncate(ws: torch.Tensor, w_avg: torch.Tensor, psi: float, cutoff: int | None = None) -> torch.Tensor:
    """The truncation trick: pull rows ``[:cutoff]`` of ws toward ``w_avg`` by ``psi`` (1 = unchanged)."""
    if psi == 1:
        return ws
    w_avg = w_avg.to(ws.dtype)
    if cutoff is None:
        return w_avg.lerp(ws, psi)
    out = ws.clone()
    out[:, :cutoff] = w_avg.lerp(ws[:, :cutoff], psi)
    return out


# --- FIR resampling (reference implementation of upfirdn2d) -----------------------------------------


def setup_filter(f: list[float] | torch.Tensor, normalize: bool = True, separable: bool | None = None,
                 gain: float = 1.0) -> torch.Tensor:
    """A resampling filter as a tensor: 1-D taps become their outer product unless long enough to keep separable."""
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f * (gain ** (f.ndim / 2))


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    return int(v[0]), int(v[1])


def _padding4(padding: int | list[int] | tuple[int, ...]) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    return tuple(int(p) for p in padding)  # type: ignore[return-value]


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up: int | tuple[int, int] = 1,
              down: int | tuple[int, int] = 1, padding: int | list[int] | tuple[int, ...] = 0,
              flip_filter: bool = False, gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative crops), convolve with FIR ``f``, keep every ``down``-th sample.

    ``padding`` is ``[x0, x1, y0, y1]``. ``f`` is 2-D or 1-D (then applied separably along x and y).
    """
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    batch, channels, height, width = x.shape
    upx, upy = _pair(up)
    downx, downy = _pair(down)
    px0, px1, py0, py1 = _padding4(padding)

    if upx > 1 or upy > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
        x = x.reshape(batch, channels, height * upy, width * upx)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]

    f = f.to(device=x.device, dtype=x.dtype) * (gain ** (f.ndim / 2))
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([channels, 1] + [1] * f.ndim)
    if f.ndim == 4:
        x = F.conv2d(x, f, groups=channels)
    else:
        x = F.conv2d(x, f.unsqueeze(2), groups=channels)
        x = F.conv2d(x, f.unsqueeze(3), groups=channels)
    return x[:, :, ::downy, ::downx]


def _filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    if f is None:
        return 1, 1
    return (int(f.shape[-1]), int(f.shape[0])) if f.ndim == 2 else (int(f.shape[0]), int(f.shape[0]))


def upsample2d(x: torch.Tensor, f: torch.Tensor | None, up: int = 2, padding: int = 0,
               flip_filter: bool = False, gain: float = 1.0) -> torch.Tensor:
    """Upsample by ``up`` with FIR ``f``, keeping the image centred."""
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = _padding4(padding)
    p = [px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2, py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, flip_filter=flip_filter, gain=gain * up * up)


def downsample2d(x: torch.Tensor, f: torch.Tensor | None, down: int = 2, padding: int = 0,
                 flip_filter: bool = False, gain: float = 1.0) -> torch.Tensor:
    """Downsample by ``down`` with FIR ``f``, keeping the image centred."""
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = _padding4(padding)
    p = [px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2, py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2]
    return upfirdn2d(x, f, down=down, padding=p, flip_filter=flip_filter, gain=gain)
