"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", eq. 1)
on a VGG16 or AlexNet trunk that the user supplies as a file. Nothing is downloaded.

The trunks use torchvision's key names (``features.{i}.weight``), so torchvision's own
``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth`` load as they are (read with ``weights_only``). The
per-channel "lin" weights of LPIPS are optional; without them every channel counts once (the paper's
uncalibrated baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("retrace.perceptual")

# (in, out, kernel, stride, padding) per conv, and the layer index (torchvision numbering) after which a tap is taken.
_VGG16_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
                (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
_VGG16_TAPS = (3, 8, 15, 22, 29)
_ALEXNET_CONVS = [(3, 64, 11, 4, 2), "M", (64, 192, 5, 1, 2), "M", (192, 384, 3, 1, 1), (384, 256, 3, 1, 1),
                  (256, 256, 3, 1, 1)]
_ALEXNET_TAPS = (1, 4, 7, 9, 11)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
BACKBONES = ("vgg16", "alexnet")
MIN_SIZE = 64


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    for spec in _VGG16_CONVS:
        if spec == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(spec[0], spec[1], 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def _alexnet_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    for spec in _ALEXNET_CONVS:
        if spec == "M":
            layers.append(nn.MaxPool2d(3, 2))
        else:
            cin, cout, k, s, p = spec
            layers += [nn.Conv2d(cin, cout, k, stride=s, padding=p), nn.ReLU()]
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS distance between images in [-1, 1]; returns one value per image."""

    def __init__(self, backbone: str = "vgg16"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {backbone!r}; expected one of {BACKBONES}")
        self.backbone = backbone
        self.features = _vgg16_features() if backbone == "vgg16" else _alexnet_features()
        self.taps = _VGG16_TAPS if backbone == "vgg16" else _ALEXNET_TAPS
        channels = [self.features[i - 1].out_channels for i in self.taps]
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(1, c, 1, 1)) for c in channels])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def taps_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for idx, layer in enumerate(self.features):
            x = layer(x)
            if idx in self.taps:
                out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
                if len(out) == len(self.taps):
                    break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if min(a.shape[-2:]) < MIN_SIZE:
            # The trunks pool five times; smaller images would vanish before the last tap.
            a = F.interpolate(a, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
        total = a.new_zeros(a.shape[0])
        for fa, fb, lin in zip(self.taps_of(a), self.taps_of(b), self.lins):
            total = total + ((fa - fb).square() * lin.to(fa.dtype)).sum(dim=1).mean(dim=(1, 2))
        return total


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path.name}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def backbone_of(state: dict[str, torch.Tensor]) -> str:
    """'vgg16' or 'alexnet', from the first conv's kernel size (3 for VGG, 11 for AlexNet)."""
    first = state.get("features.0.weight")
    if first is None:
        raise ValueError("not a VGG16 or AlexNet trunk: no 'features.0.weight' (torchvision's key names are expected)")
    return "alexnet" if first.shape[-1] == 11 else "vgg16"


# LPIPS' own lin-weight files are named after the trunk they calibrate.
LIN_FILE_STEMS = {"vgg16": "vgg", "alexnet": "alex"}


def is_lin_file(name: str | Path) -> bool:
    """Whether a file name is one of LPIPS' lin-weight files (``vgg.pth``, ``alex.pth``), not a trunk."""
    return Path(name).stem in LIN_FILE_STEMS.values()


def load_lpips(backbone_path: str | Path, lin_path: str | Path | None = None,
               lin_candidates: Iterable[str | Path] = ()) -> LPIPS:
    """An LPIPS module from a torchvision VGG16/AlexNet file and, optionally, LPIPS' lin-weight file.

    The lin file is LPIPS' own ``{vgg,alex}.pth`` (keys ``lin{k}.model.1.weight``); a file that holds both the
    trunk and ``lin{k}`` keys also works as the only argument. Without either, the first of ``lin_candidates``
    named for this trunk (``vgg.*`` for VGG16, ``alex.*`` for AlexNet) is used, so the lin file can simply lie
    beside the trunk.
    """
    backbone_path = Path(backbone_path)
    state = _read_state(backbone_path)
    model = LPIPS(backbone_of(state))
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        model.features.load_state_dict(features, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{backbone_path.name} does not match torchvision's {model.backbone} layout: {err}") from None
    lins = {k: v for k, v in state.items() if k.startswith("lin")}
    if lin_path is None and not lins:
        stem = LIN_FILE_STEMS[model.backbone]
        lin_path = next((Path(p) for p in lin_candidates if Path(p).stem == stem), None)
    if lin_path is not None:
        log.info("LPIPS %s with the lin weights of %s", model.backbone, Path(lin_path).name)
        lins = _read_state(Path(lin_path))
    if lins:
        for k, lin in enumerate(model.lins):
            weight = lins.get(f"lin{k}.model.1.weight", lins.get(f"lin{k}.weight"))
            if weight is None or weight.numel() != lin.numel():
                raise ValueError(f"LPIPS lin weights: missing or mis-shaped 'lin{k}.model.1.weight' "
                                 f"(need {lin.numel()} channels for {model.backbone})")
            lin.data.copy_(weight.reshape(lin.shape))
    else:
        log.info("LPIPS %s without lin weights: every channel counts once", model.backbone)
    return model.eval()
