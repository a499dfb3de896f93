"""StyleGAN generators written from the papers, and loaders that never run code from a file.

Plain torch; never imports ComfyUI. ``build_generator(family, init_kwargs)`` is the one way to make a
generator; the loaders read ``family`` and ``init_kwargs`` from the file.
"""

from __future__ import annotations

from typing import Any

from torch import nn

FAMILIES = ("stylegan2", "stylegan3")


def build_generator(family: str, init_kwargs: dict[str, Any]) -> nn.Module:
    """A generator of ``family`` ('stylegan2' or 'stylegan3') built from its constructor arguments."""
    if family == "stylegan2":
        from .stylegan2 import Generator
    elif family == "stylegan3":
        from .stylegan3 import Generator
    else:
        raise ValueError(f"unknown generator family {family!r}; expected one of {FAMILIES}")
    return Generator(**init_kwargs)
