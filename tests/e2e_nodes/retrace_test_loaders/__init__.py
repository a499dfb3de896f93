"""Test-only loaders for the end-to-end layer: tiny host models where the real loaders cannot load a tiny file.

Flux, SD3 and SDXL loaders fix hidden sizes and text encoders (GUIDE section 2), so their workflows run
in the tests with these nodes in place of the loaders: the same output types in the same slot order,
so only the loader nodes of a workflow change. Models come from ``tests/tiny_models.py``; the CLIP is a
stand-in that turns each prompt into seeded conditioning of the real shapes (different prompts give
different conditioning); the VAE is the host's own ``comfy.sd.VAE`` built from seeded weights in the real
layout (4 latent channels for SD1.x/SDXL, 16 for Flux/SD3).

Loaded only into the test server, through the ``custom_nodes:`` entry of a generated extra-model-paths
file; never part of the pack or of ``make serve``.
"""

from __future__ import annotations

import logging
import sys
import zlib
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[2]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402  (tests/tiny_models.py)

log = logging.getLogger("retrace.test_loaders")
KINDS = list(tiny_models.KINDS)
CATEGORY = "Retrace/testing"


def prompt_seed(text: str, seed: int) -> int:
    """A stable seed per prompt text (Python's hash() is salted per process)."""
    return (zlib.crc32(text.encode("utf-8")) + 1_000_003 * seed) % (2**31)


class TinyTextEncoder:
    """Stands in for a CLIP object: CLIPTextEncode calls tokenize() and encode_from_tokens_scheduled()."""

    def __init__(self, kind: str, seed: int = 0):
        self.kind, self.seed = kind, seed
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        """The host's CLIP-L tokenizer (its files ship with the host): real tokens for prompt alignment."""
        if self._tokenizer is None:
            import comfy.sd1_clip

            self._tokenizer = comfy.sd1_clip.SD1Tokenizer()
        return self._tokenizer

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict[str, Any]:
        if return_word_ids:  # as Retrace Prompt Pair asks: CLIP-L tokens, as many as the stand-in's 77-token context
            return self.tokenizer.tokenize_with_weights(text, return_word_ids=True)
        return {"retrace_text": text}

    def encode_from_tokens_scheduled(self, tokens: dict[str, Any], unprojected: bool = False,
                                     add_dict: dict[str, Any] | None = None, show_pbar: bool = True) -> list:
        cond = tiny_models.conditioning(self.kind, seed=prompt_seed(tokens["retrace_text"], self.seed))
        cond[0][1].update(add_dict or {})
        return cond

    def encode_from_tokens(self, tokens: dict[str, Any], return_pooled: bool = False, return_dict: bool = False):
        cond, extras = self.encode_from_tokens_scheduled(tokens)[0]
        if return_dict:
            return {"cond": cond, **extras}
        return (cond, extras.get("pooled_output")) if return_pooled else cond

    def clone(self) -> TinyTextEncoder:
        return TinyTextEncoder(self.kind, self.seed)


def _kind_inputs() -> dict[str, Any]:
    return {"kind": (KINDS, {"default": "sd15"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False})}


class RetraceTestTinyCheckpoint:
    """MODEL, CLIP, VAE: the slots of CheckpointLoaderSimple."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (host API)
        return {"required": _kind_inputs()}

    def load(self, kind: str, seed: int) -> tuple[Any, Any, Any]:
        log.info("tiny %s model, text encoder and VAE (seed %d)", kind, seed)
        return tiny_models.build_model(kind, seed), TinyTextEncoder(kind, seed), tiny_models.build_vae(kind)


class RetraceTestTinyModel:
    """MODEL: the slot of UNETLoader."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": _kind_inputs()}

    def load(self, kind: str, seed: int) -> tuple[Any]:
        return (tiny_models.build_model(kind, seed),)


class RetraceTestTinyCLIP:
    """CLIP: the slot of CLIPLoader / DualCLIPLoader / TripleCLIPLoader."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": _kind_inputs()}

    def load(self, kind: str, seed: int) -> tuple[Any]:
        return (TinyTextEncoder(kind, seed),)


class RetraceTestTinyVAE:
    """VAE: the slot of VAELoader."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"kind": (KINDS, {"default": "sd15"})}}

    def load(self, kind: str) -> tuple[Any]:
        return (tiny_models.build_vae(kind),)


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in
                       (RetraceTestTinyCheckpoint, RetraceTestTinyModel, RetraceTestTinyCLIP, RetraceTestTinyVAE)}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"Retrace Test {name.removeprefix('RetraceTest')}" for name in NODE_CLASS_MAPPINGS}
