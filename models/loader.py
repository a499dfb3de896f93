"""Safe readers for StyleGAN generator files: tensors and constructor arguments only, never code.

Formats, told apart by content (the extension is only a hint):

- NVlabs network pickles (``.pkl`` from stylegan2-ada-pytorch and stylegan3). Their networks pickle through
  ``torch_utils.persistence``, which stores the Python source of the network module and ``exec``s it on load.
  Here a ``pickle.Unpickler`` with an allowlist in ``find_class`` turns each persistent object into an inert
  record (class name, state, source kept as text and never run) and refuses every other global.
- rosinality ``.pt`` checkpoints (StyleGAN2; also pSp/e4e ``decoder.*``), renamed to NVlabs parameter names.
- NVlabs state dicts saved with ``torch.save`` (the usual form of StyleGAN3 ``.pt`` files).
- Retrace ``.safetensors``: tensors plus JSON metadata (family, constructor arguments, source hash).

Every generator is rebuilt with our own clean-room code (``models.build_generator``) and loaded ``strict=True``.

Before anything is allocated, a file is held to a size budget: constructor arguments within what published
generators use, names and shapes compared with a generator built on the ``meta`` device, a generator no larger than
the values the file holds, no tensor claiming more values than its storage, and torch.save zip entries stored
uncompressed within the file's size. A hostile file costs a few MB and a few milliseconds.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import copy
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import build_generator
from .layers import MappingNetwork, setup_filter

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("nvlabs-pkl", "rosinality-pt", "nvlabs-state-dict-pt", "retrace-safetensors")
RETRACE_FORMAT = "stylegan-generator"
META_FORMAT = "retrace.format"
META_FAMILY = "retrace.family"
META_INIT_KWARGS = "retrace.init_kwargs"
META_SOURCE_SHA256 = "retrace.source_sha256"

# Every class that NVlabs decorates with ``persistence.persistent_class`` (stylegan2-ada-pytorch networks.py and
# augment.py; stylegan3 networks_stylegan2.py, networks_stylegan3.py and augment.py).
NVLABS_CLASSES = frozenset({
    "Generator", "MappingNetwork", "SynthesisNetwork", "SynthesisBlock", "SynthesisLayer", "SynthesisInput",
    "ToRGBLayer", "FullyConnectedLayer", "Conv2dLayer", "Discriminator", "DiscriminatorBlock",
    "DiscriminatorEpilogue", "MinibatchStdLayer", "AugmentPipe",
})
PERSISTENCE_VERSION = 6

# Settings a file without constructor arguments cannot carry; the NVlabs training configurations use these
# (stylegan2-ada-pytorch and stylegan3 ``train.py``: mixed precision in the top 4 resolutions, clamp 256).
NVLABS_TRAINING_DEFAULTS: dict[str, Any] = {"num_fp16_res": 4, "conv_clamp": 256}
# The stylegan2-ada-pytorch constructors (nested ``synthesis_kwargs``) default to full precision, no clamping.
ADA_CONSTRUCTOR_DEFAULTS: dict[str, Any] = {"num_fp16_res": 0, "conv_clamp": None}
# rosinality's generator has neither mixed precision nor clamping.
ROSINALITY_SETTINGS: dict[str, Any] = {"num_fp16_res": 0, "conv_clamp": None, "architecture": "skip"}

W_AVG_SAMPLES = 10_000
W_AVG_SEED = 0x5EED

_LEGACY_TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_TORCH_MAGIC = pickle.dumps(_LEGACY_TORCH_MAGIC_NUMBER, protocol=2)  # how a non-zip torch.save starts
_MAX_SAFETENSORS_HEADER = 100_000_000

# The largest settings Retrace builds. Every published StyleGAN2, StyleGAN2-ADA, StyleGAN3 and rosinality generator
# is far inside them (z_dim = w_dim = 512, at most 1024 px, channel_max 512 or 1024, 8 mapping layers, 1000 classes):
# a file beyond them is damaged or not a StyleGAN generator, and building what it asks for could take gigabytes.
_MAX_FEATURES = 4096
_ARG_BOUNDS: dict[str, tuple[int, int, str]] = {  # argument: (smallest, largest, what it is)
    "z_dim": (0, _MAX_FEATURES, "the latent size, 512 in published generators"),
    "c_dim": (0, 32768, "the number of class labels, at most 1000 in published generators"),
    "w_dim": (1, _MAX_FEATURES, "the style size, 512 in published generators"),
    "img_resolution": (4, 4096, "the image size in pixels, at most 1024 in published generators"),
    "img_channels": (1, 64, "the image channels, 3 for RGB"),
    "channel_base": (1, 1 << 30, "the channel schedule's numerator, 16384 to 65536 in published generators"),
    "channel_max": (1, _MAX_FEATURES, "the most channels of a layer, 512 or 1024 in published generators"),
    "num_fp16_res": (0, 32, "the resolutions run in half precision"),
}
_MAPPING_BOUNDS: dict[str, tuple[int, int, str]] = {
    "num_layers": (1, 32, "the mapping network's layers, 2 or 8 in published generators"),
    "embed_features": (1, _MAX_FEATURES, "the label embedding size, 512 in published generators"),
    "layer_features": (1, _MAX_FEATURES, "the mapping layers' width, 512 in published generators"),
}
_FAMILY_BOUNDS: dict[str, dict[str, tuple[int, int, str]]] = {
    "stylegan2": {"kernel_size": (1, 15, "the convolution kernel, 3 in published generators")},
    "stylegan3": {
        "num_layers": (2, 64, "the synthesis layers, 14 in published generators"),
        "num_critical": (0, 63, "the critically sampled last layers, 2 in published generators"),
        "margin_size": (0, 256, "the extra pixels around each layer, 10 in published generators"),
        "conv_kernel": (1, 15, "the convolution kernel, 1 or 3 in published generators"),
        "filter_size": (1, 64, "the low-pass filter taps per upsampling step, 6 in published generators"),
        "lrelu_upsampling": (1, 8, "the upsampling around the nonlinearity, 2 in published generators"),
    },
}
_SG3_REAL_ARGS = ("first_cutoff", "first_stopband", "last_stopband_rel")
_MAX_FILTER_TAPS = 256  # StyleGAN3 filters; published generators use at most 24
_MAX_RESAMPLE_TAPS = 16  # StyleGAN2 resample_filter; published generators use [1, 3, 3, 1]
# How many values a file's settings may ask for beyond the values it holds (derived buffers such as the identity
# transform that some StyleGAN3 state dicts leave out), and its tensors beyond one value per byte they store.
_BUDGET_SLACK = 1 << 16

_FIX_UNSAFE = ("Retrace reads only tensors and constructor arguments and never runs code from a file. Do not use "
               "this file; get the generator from its original publisher (an NVlabs .pkl, a rosinality .pt or a "
               "Retrace .safetensors). Once you have a file Retrace accepts, `python -m models.convert FILE` turns "
               "it into a .safetensors that never needs pickle again.")
_FIX_EXPORT = ("If you trust this file and its code, load it with its publisher's own code in an isolated "
               "environment, save `G_ema.state_dict()` together with its constructor arguments "
               "(`torch.save({'state_dict': G_ema.state_dict(), 'init_kwargs': dict(G_ema.init_kwargs)}, 'G.pt')`) "
               "and convert that with `python -m models.convert G.pt`.")


class UnsafeFileError(ValueError):
    """The file asks to run code (a blocked pickle global, a persistent id); nothing from it was executed."""


class UnsupportedFileError(ValueError):
    """The file is not a generator Retrace can read (unknown format, corrupted, or an unknown architecture)."""


@dataclass(frozen=True, eq=False)
class GeneratorFile:
    """What a generator file holds: the family, flat constructor arguments and the exact NVlabs-named state dict."""

    family: str
    init_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    source_format: str
    sha256: str

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        """The generator with these tensors (strict load), in eval mode, without gradients, on ``device``."""
        model = build_generator(self.family, copy.deepcopy(self.init_kwargs))
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise UnsupportedFileError(f"the tensors do not fit a {self.family} generator built from "
                                       f"{self.init_kwargs}: {exc}") from None
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --- public API ------------------------------------------------------------------------------------------


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content identity of a generator: the same tensors give the same hash whatever file format held them,
    so latents and directions made with a .pkl still fit its converted .safetensors."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_generator_file(path: str | os.PathLike) -> GeneratorFile:
    """Read a generator file of any supported format without running code from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return _read(path)
    except (UnsafeFileError, UnsupportedFileError) as exc:
        message = str(exc)
        if isinstance(exc, UnsupportedFileError):
            message = f"Retrace cannot read this file: {message}"
        raise type(exc)(f"{path}: {message}") from None


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Read ``path`` safely and build its generator on ``device`` (eval mode, no gradients)."""
    return read_generator_file(path).build(device=device)


def save_generator(path: str | os.PathLike, module_or_generator_file: nn.Module | GeneratorFile,
                   source_sha256: str | None = None, overwrite: bool = False) -> Path:
    """Write a Retrace ``.safetensors`` (tensors + family, init_kwargs and source hash as metadata).

    Refuses to replace an existing file unless ``overwrite=True``. A ``GeneratorFile`` records its own
    ``sha256`` as the source hash unless ``source_sha256`` is given.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; Retrace does not replace files. Choose another name or pass "
                              f"overwrite=True (--overwrite on the command line).")
    item = module_or_generator_file
    if isinstance(item, GeneratorFile):
        family, init_kwargs, state = item.family, item.init_kwargs, item.state_dict
        source_sha256 = item.sha256 if source_sha256 is None else source_sha256
    elif isinstance(item, nn.Module):
        family = getattr(item, "family", None)
        init_kwargs = getattr(item, "init_kwargs", None)
        if family is None or init_kwargs is None:
            raise TypeError(f"{type(item).__name__} has no `family`/`init_kwargs`; build it with "
                            f"models.build_generator")
        state = item.state_dict()
    else:
        raise TypeError(f"expected a generator module or a GeneratorFile, got {type(item).__name__}")
    if path.suffix != ".safetensors":
        log.warning("writing a Retrace safetensors file to %s (suffix is not .safetensors)", path)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    metadata = {
        META_FORMAT: RETRACE_FORMAT,
        META_FAMILY: str(family),
        META_INIT_KWARGS: json.dumps(_plain_kwargs(init_kwargs), sort_keys=True),
        META_SOURCE_SHA256: source_sha256 or "",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} appeared while writing; Retrace does not replace files")
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    log.info("wrote %s (%s, %d tensors)", path, family, len(tensors))
    return path


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike | None = None,
                           overwrite: bool = False) -> Path:
    """Convert any supported generator file to a Retrace ``.safetensors`` (default: ``src`` with that suffix)."""
    src = Path(src)
    dst = src.with_suffix(".safetensors") if dst is None else Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise FileExistsError(f"{dst} is the source file itself; give a different destination")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; Retrace does not replace files. Choose another name or pass "
                              f"--overwrite.")
    generator_file = read_generator_file(src)
    out = save_generator(dst, generator_file, source_sha256=generator_file.sha256, overwrite=overwrite)
    log.info("converted %s (%s, %s, sha256 %s) to %s", src, generator_file.source_format, generator_file.family,
             generator_file.sha256[:16], out)
    return out


# --- format detection ------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


MIN_TORCH = (2, 6)


def _require_safe_torch(version: str = torch.__version__) -> None:
    """Tensors inside pickles and torch files are read with ``torch.load(weights_only=True)``, which older torch
    releases let a crafted file escape (CVE-2025-32434, fixed in 2.6)."""
    release = tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:2])
    if release < MIN_TORCH:
        raise UnsupportedFileError(
            f"reading pickles and torch files safely needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (this is torch "
            f"{version}; older weights_only loading can be escaped by a crafted file, CVE-2025-32434). Update torch, "
            "or use a Retrace .safetensors file, which needs no pickle.")


def _read(path: Path) -> GeneratorFile:
    size = path.stat().st_size
    if size == 0:
        raise UnsupportedFileError("the file is empty (0 bytes); it is not a generator. Download it again.")
    with open(path, "rb") as f:
        head = f.read(16)
    sha = _sha256(path)
    suffix = path.suffix.lower()
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= _MAX_SAFETENSORS_HEADER:
        return _read_safetensors(path, size, sha)
    _require_safe_torch()
    if head.startswith(b"PK\x03\x04"):
        return _read_torch(path, sha, "a torch.save zip archive")
    if head.startswith(_LEGACY_TORCH_MAGIC[:12]):
        return _read_torch(path, sha, "a legacy (non-zip) torch.save file")
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return _read_pickle(path, sha)
    if suffix in (".pkl", ".pickle") and head[:1] in (b"(", b"}", b"]", b"c"):
        return _read_pickle(path, sha)  # protocol 0/1 pickle; the safe unpickler decides
    hint = {".pkl": "an NVlabs pickle", ".pt": "a torch file", ".pth": "a torch file",
            ".safetensors": "a safetensors file"}.get(suffix)
    expected = f" The name suggests {hint}, but the content is not one." if hint else ""
    raise UnsupportedFileError(
        f"unrecognised content (first bytes {head[:8].hex(' ')}).{expected} Retrace reads NVlabs .pkl, rosinality "
        f".pt, torch.save state dicts and Retrace .safetensors; the file may be corrupted or of another kind.")


# --- Retrace safetensors ---------------------------------------------------------------------------------


def _read_safetensors(path: Path, size: int, sha: str) -> GeneratorFile:
    """Metadata and the header's shapes are checked against a meta-device generator before any tensor is read."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise UnsupportedFileError(f"truncated safetensors file: its header says {header_len} bytes but the file has "
                                   f"{size - 8} after the length field. Download or convert it again.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            family, init_kwargs = _retrace_metadata(path, metadata)
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            model = _check_tensors(family, init_kwargs, shapes)
            tensors = {key: f.get_tensor(key) for key in shapes}
    except (UnsafeFileError, UnsupportedFileError):
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError on bad input
        raise UnsupportedFileError(f"corrupted or truncated safetensors file ({exc}). Download or convert it "
                                   f"again.") from None
    return _finish(family, init_kwargs, tensors, "retrace-safetensors", sha, model=model)


def _retrace_metadata(path: Path, metadata: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The family and constructor arguments a Retrace safetensors file records."""
    if metadata.get(META_FORMAT) != RETRACE_FORMAT:
        found = ", ".join(sorted(metadata)) or "none"
        raise UnsupportedFileError(
            f"a safetensors file without Retrace generator metadata (metadata keys: {found}), so its architecture is "
            f"unknown. Convert the original .pkl or .pt with `python -m models.convert SRC` instead; Retrace writes "
            f"'{META_FORMAT}': '{RETRACE_FORMAT}', '{META_FAMILY}' and '{META_INIT_KWARGS}'.")
    family = metadata.get(META_FAMILY, "")
    try:
        init_kwargs = json.loads(metadata.get(META_INIT_KWARGS, ""))
    except json.JSONDecodeError as exc:
        raise UnsupportedFileError(f"the '{META_INIT_KWARGS}' metadata is not valid JSON ({exc}); convert the "
                                   f"original file again.") from None
    if not isinstance(init_kwargs, dict):
        raise UnsupportedFileError(f"the '{META_INIT_KWARGS}' metadata is not a JSON object")
    source = metadata.get(META_SOURCE_SHA256)
    if source:
        log.info("%s: Retrace safetensors converted from a file with sha256 %s", path, source)
    return family, init_kwargs


# --- torch.save files (rosinality and NVlabs state dicts) ------------------------------------------------


def _read_torch(path: Path, sha: str, what: str) -> GeneratorFile:
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            _check_zip_entries(path, os.fstat(f.fileno()).st_size)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise _unsafe_from_torch(exc, what) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError on damaged archives
        raise UnsupportedFileError(f"torch cannot read it ({what}): corrupted or truncated ({exc}). Download it "
                                   f"again.") from None
    _check_stored_values(obj, what)
    return _from_container(obj, sha, origin=what)


def _check_zip_entries(path: Path, size: int) -> None:
    """Before torch reads a zip archive: torch.save stores every entry uncompressed, so a compressed entry, or
    entries that declare more bytes than the file has, would make torch inflate far more than the file holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, ValueError, EOFError) as exc:
        raise UnsupportedFileError(f"torch cannot read it (a torch.save zip archive): corrupted or truncated ({exc}). "
                                   f"Download it again.") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            method = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                      zipfile.ZIP_LZMA: "lzma"}.get(entry.compress_type, f"method {entry.compress_type}")
            raise UnsupportedFileError(
                f"its zip entry '{entry.filename}' is compressed ({method}: {entry.compress_size} bytes that declare "
                f"{entry.file_size} bytes unpacked); torch.save never compresses, so the archive was repacked or "
                f"crafted, and unpacking it could take far more memory than the file's {size} bytes. Get the original "
                f"file from its publisher.")
    declared = sum(entry.file_size for entry in entries)
    if declared > size:
        largest = max(entries, key=lambda entry: entry.file_size)
        raise UnsupportedFileError(
            f"its zip entries declare {declared} bytes in all (the largest, '{largest.filename}', {largest.file_size} "
            f"bytes), more than the file's {size} bytes: the archive is damaged or crafted. Download it again.")


def _check_stored_values(obj: Any, what: str) -> None:
    """Refuse tensors off the CPU and tensors that claim more values than the file stores bytes (overlapping or
    zero strides): a few bytes could otherwise ask for gigabytes once the tensors are cast or copied."""
    values, stored = 0, {}
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if item.device.type != "cpu":
                raise UnsupportedFileError(f"{what} holding a tensor on the {item.device.type!r} device, with no "
                                           f"values stored in the file; it is not a generator's weights")
            values += item.numel()
            storage = item.untyped_storage()
            stored[storage.data_ptr()] = max(stored.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, _PersistentStub):
            stack.append(item.state)
    held = sum(stored.values())
    if values > held + _BUDGET_SLACK:
        raise UnsupportedFileError(f"{what} whose tensors claim {values:,} values but store only {held:,} bytes "
                                   f"(tensors with overlapping strides): the file is damaged or crafted. Get the "
                                   f"original file from its publisher.")


def _unsafe_from_torch(exc: Exception, what: str) -> Exception:
    """Turn torch's weights-only refusal into an UnsafeFileError that names the blocked global."""
    text = str(exc)
    match = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", text)
    if match:
        full = match.group(1)
        module, _, name = full.rpartition(".")
        return UnsafeFileError(f"refused to load {what}: it asks to call `{full}`{_describe_global(module, name)}. "
                               f"That is not a tensor or a constructor argument; nothing from the file was run. "
                               f"{_FIX_UNSAFE}")
    detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|$)", text, re.S)
    reason = detail.group(1) if detail else text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return UnsupportedFileError(f"{what} that torch's weights-only reader cannot read ({reason[:200]}). "
                                f"{_FIX_EXPORT}")


def _from_container(obj: Any, sha: str, origin: str) -> GeneratorFile:
    """A generator from a loaded dict: rosinality checkpoint, pSp/e4e checkpoint, or NVlabs state dict."""
    if not isinstance(obj, dict):
        raise UnsupportedFileError(f"{origin} holding a {type(obj).__name__}, not a dict of generator weights")
    ros = _find_rosinality(obj)
    if ros is not None:
        state, latent_avg, args = ros
        family, init_kwargs, nv_state = _rosinality_to_nvlabs(state, latent_avg, args)
        return _finish(family, init_kwargs, nv_state, "rosinality-pt", sha)
    found = _find_nvlabs_state(obj)
    if found is None:
        keys = ", ".join(repr(k) for k in list(obj)[:12])
        raise UnsupportedFileError(
            f"{origin} with no StyleGAN generator in it (top-level keys: {keys}). Retrace reads rosinality "
            f"checkpoints ('g_ema'), pSp/e4e checkpoints ('state_dict' with 'decoder.*') and NVlabs generator state "
            f"dicts ('mapping.fc0.weight', 'synthesis.*').")
    state, init_kwargs = found
    family = _detect_family(state)
    if family == "stylegan3" and "synthesis.input.transform" not in state:
        # A user-set inverse transform of the Fourier input; some exported state dicts leave it out.
        log.info("no 'synthesis.input.transform' in the state dict; using the identity")
        state["synthesis.input.transform"] = torch.eye(3)
    if init_kwargs is not None:
        init_kwargs = _flatten_init_kwargs((), init_kwargs)
    elif family == "stylegan2":
        init_kwargs = _infer_stylegan2_kwargs(state)
    else:
        init_kwargs = _infer_stylegan3_kwargs(state)
    return _finish(family, init_kwargs, state, "nvlabs-state-dict-pt", sha)


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    return None


def _find_rosinality(obj: dict) -> tuple[dict[str, torch.Tensor], Any, Any] | None:
    def is_ros(d: dict | None) -> bool:
        return d is not None and "input.input" in d and "conv1.conv.weight" in d

    latent_avg = obj.get("latent_avg")
    args = obj.get("args")
    for key in ("g_ema", "g"):
        d = _tensor_dict(obj.get(key))
        if is_ros(d):
            if key == "g":
                log.warning("rosinality checkpoint without 'g_ema'; using the training generator 'g'")
            return d, latent_avg, args
    d = _tensor_dict(obj.get("state_dict"))
    if d is not None:
        decoder = {k[len("decoder."):]: v for k, v in d.items() if k.startswith("decoder.")}
        if is_ros(decoder):
            log.info("pSp/e4e checkpoint: using its 'decoder.*' generator")
            return decoder, latent_avg, None
    d = _tensor_dict(obj)
    if is_ros(d):
        return d, latent_avg, args
    return None


_NV_PREFIXES = ("", "G_ema.", "g_ema.", "decoder.", "generator.", "G.", "module.")


def _find_nvlabs_state(obj: dict) -> tuple[dict[str, torch.Tensor], dict | None] | None:
    kwargs = None
    for key in ("init_kwargs", "G_kwargs", "kwargs", "generator_kwargs"):
        if isinstance(obj.get(key), dict):
            kwargs = obj[key]
            break
    candidates: list[Any] = [obj] + [obj.get(k) for k in ("G_ema", "g_ema", "state_dict", "generator", "G", "model")]
    for cand in candidates:
        d = _tensor_dict(cand)
        if d is None:
            continue
        for prefix in _NV_PREFIXES:
            if f"{prefix}mapping.w_avg" in d or f"{prefix}mapping.fc0.weight" in d:
                state = {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
                if prefix:
                    log.info("NVlabs state dict under the prefix %r", prefix)
                return state, kwargs
    return None


# --- NVlabs pickles --------------------------------------------------------------------------------------


class _EasyDictStub(dict):
    """Stands in for ``dnnlib.util.EasyDict``: plain data, no attribute magic."""


@dataclass
class _PersistentStub:
    """An NVlabs persistent object, recorded and never instantiated: its ``module_src`` is text, never run."""

    class_name: str
    module_src: str
    state: dict


_DANGER = {
    "system": "runs a shell command", "popen": "runs a shell command", "spawnv": "starts a program",
    "execv": "replaces the process with a program", "execve": "replaces the process with a program",
    "remove": "deletes files", "unlink": "deletes files", "rmdir": "deletes folders",
    "exec": "runs Python code", "eval": "runs Python code", "compile": "compiles Python code",
    "__import__": "imports any module", "getattr": "reaches any attribute", "setattr": "changes any attribute",
    "open": "opens files", "breakpoint": "starts a debugger",
}
_DANGER_MODULES = {
    "subprocess": "starts a program", "importlib": "imports any module", "runpy": "runs Python code",
    "code": "runs Python code", "socket": "opens network connections", "urllib": "opens network connections",
    "http": "opens network connections", "shutil": "changes files", "pty": "starts a shell",
    "pickle": "unpickles more data, which can run code", "_pickle": "unpickles more data, which can run code",
    "marshal": "loads Python bytecode", "ctypes": "calls native code", "webbrowser": "opens a browser",
}


def _describe_global(module: str, name: str) -> str:
    """A few words on what a blocked global would do, for the error message (empty when unknown)."""
    root = module.split(".")[0]
    what = _DANGER_MODULES.get(root)
    if what is None and root in ("os", "posix", "nt", "builtins", "__builtin__"):
        what = _DANGER.get(name, "reaches into the operating system" if root in ("os", "posix", "nt") else None)
    alias = f"os.{name}" if root in ("posix", "nt") else ""
    parts = [p for p in (alias, f"which {what}" if what else "") if p]
    return f" ({', '.join(parts)})" if parts else ""


def _refuse_global(module: str, name: str) -> UnsafeFileError:
    return UnsafeFileError(f"refused to load: the pickle asks to call `{module}.{name}`"
                           f"{_describe_global(module, name)}. That is not a tensor or a constructor argument; "
                           f"nothing from the file was run. {_FIX_UNSAFE}")


def _tensorflow_refusal(module: str, name: str) -> UnsupportedFileError:
    return UnsupportedFileError(
        f"it is a TensorFlow-era StyleGAN/StyleGAN2 network pickle (it holds `{module}.{name}` objects: a tuple of "
        f"dnnlib.tflib Networks G, D, Gs whose state carries TensorFlow build code). Retrace does not read "
        f"TensorFlow pickles yet. Convert it to a PyTorch file first, in an isolated environment: NVlabs "
        f"stylegan2-ada-pytorch `python legacy.py --source=FILE.pkl --dest=FILE_pytorch.pkl`, or rosinality "
        f"`convert_weight.py`, then load or convert the result.")


def _np_core(sub: str) -> Any:
    core = getattr(np, "_core", None) or np.core
    return getattr(core, sub)


class _SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` with an allowlist: tensors, containers, NumPy data and inert NVlabs records only."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        multiarray = _np_core("multiarray")
        numeric = _np_core("numeric")
        self._allowed: dict[tuple[str, str], Any] = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _record_persistent_obj,
            ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set, ("__builtin__", "set"): set,
            ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
            ("_codecs", "encode"): _codecs_encode,
            ("dnnlib.util", "EasyDict"): _EasyDictStub, ("dnnlib", "EasyDict"): _EasyDictStub,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _np_dtype,
            ("torch", "Size"): torch.Size, ("torch", "device"): _torch_device,
        }
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            self._allowed[(mod, "_reconstruct")] = _np_reconstruct(multiarray._reconstruct)
            self._allowed[(mod, "scalar")] = _np_scalar(multiarray.scalar)
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            if hasattr(numeric, "_frombuffer"):
                self._allowed[(mod, "_frombuffer")] = _np_frombuffer(numeric._frombuffer)

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("dnnlib.tflib"):
            raise _tensorflow_refusal(module, name)
        raise _refuse_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        text = repr(pid)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise UnsafeFileError(f"refused to load: the pickle refers to an external persistent object {text}; NVlabs "
                              f"network pickles never do. {_FIX_UNSAFE}")


def _record_persistent_obj(meta: Any) -> _PersistentStub:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: records, never executes."""
    if not isinstance(meta, dict):
        raise UnsupportedFileError(f"the pickle holds an NVlabs persistent object whose description is a {type(meta).__name__}")
    class_name = meta.get("class_name")
    obj_type, version = meta.get("type"), meta.get("version")
    module_src = meta.get("module_src")
    lines = module_src.count("\n") + 1 if isinstance(module_src, str) else 0
    if obj_type != "class" or version != PERSISTENCE_VERSION:
        raise UnsupportedFileError(
            f"an NVlabs persistent object of type={obj_type!r}, version={version!r} (class {class_name!r}); Retrace "
            f"reads type='class', version={PERSISTENCE_VERSION} (stylegan2-ada-pytorch, stylegan3). Its embedded "
            f"source ({lines} lines) was not run. {_FIX_EXPORT}")
    if class_name not in NVLABS_CLASSES:
        raise UnsupportedFileError(
            f"the pickle defines a network class `{class_name}` that is not one of NVlabs' StyleGAN2/3 classes. "
            f"NVlabs' loader would create it by running the Python source embedded in the file ({lines} lines); "
            f"Retrace never runs code from a file and has no clean-room version of `{class_name}`, so it cannot "
            f"load it. If you did not expect custom code here, do not use this file. {_FIX_EXPORT}")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise UnsupportedFileError(f"the state of the NVlabs `{class_name}` object is a {type(state).__name__}, "
                                   f"not a dict")
    return _PersistentStub(class_name=class_name, module_src=module_src if isinstance(module_src, str) else "",
                           state=dict(state))


def _load_storage_from_bytes(data: Any) -> Any:
    """``torch.storage._load_from_bytes``: a nested legacy torch.save blob, read weights-only onto the CPU."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsupportedFileError(f"the pickle holds a tensor storage given as {type(data).__name__} instead of bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise _unsafe_from_torch(exc, "a tensor storage inside the pickle") from None
    except Exception as exc:
        raise UnsupportedFileError(f"a tensor storage inside the pickle is damaged ({exc})") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsupportedFileError(f"the pickle holds a tensor storage blob that holds a {type(storage).__name__}")
    return storage


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` with its arguments checked; hooks and metadata must be empty."""
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsupportedFileError(f"the pickle holds a tensor whose storage is a {type(storage).__name__}")
    if not (isinstance(storage_offset, int) and _is_int_tuple(size) and _is_int_tuple(stride)):
        raise UnsupportedFileError("the pickle holds a tensor with a malformed offset, size or stride")
    if backward_hooks:
        raise UnsupportedFileError("the pickle holds a tensor with backward hooks")
    if storage_offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise UnsupportedFileError(f"the pickle holds a tensor with a negative offset, size or stride "
                                   f"({storage_offset}, {tuple(size)}, {tuple(stride)})")
    needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
    available = storage._size() if isinstance(storage, torch.storage.TypedStorage) else storage.nbytes()  # elements
    if needed > available:
        raise UnsupportedFileError(f"the pickle holds a tensor of size {tuple(size)} (stride {tuple(stride)}, offset "
                                   f"{storage_offset}) that needs {needed} elements of a storage of {available}: "
                                   f"the file is damaged or crafted")
    try:
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False,
                                               collections.OrderedDict())
    except RuntimeError as exc:
        raise UnsupportedFileError(f"the pickle holds a tensor that does not fit its storage ({exc})") from None


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter``: the plain tensor is all we need."""
    if not isinstance(data, torch.Tensor):
        raise UnsupportedFileError(f"the pickle holds a parameter whose data is a {type(data).__name__}")
    if backward_hooks:
        raise UnsupportedFileError("the pickle holds a parameter with backward hooks")
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                                  state: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter_with_state``; the extra Python attributes are dropped."""
    if state:
        log.debug("dropping extra parameter attributes %s", list(state) if isinstance(state, dict) else state)
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it: latin-1 text to bytes only."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise UnsupportedFileError(f"the pickle makes an unexpected use of _codecs.encode ({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin-1")


def _np_dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(obj, str):
        raise UnsupportedFileError(f"the pickle holds a NumPy dtype described by a {type(obj).__name__}")
    dt = np.dtype(obj, bool(align), bool(copy))
    if dt.hasobject:
        raise UnsafeFileError(f"refused to load: the pickle holds a NumPy array of Python objects (dtype {obj!r}), "
                              f"which unpickles arbitrary objects. {_FIX_UNSAFE}")
    return dt


def _check_np_dtype(dt: Any) -> None:
    if not isinstance(dt, np.dtype):
        raise UnsupportedFileError(f"the pickle holds a NumPy value with a dtype of type {type(dt).__name__}")
    if dt.hasobject:
        raise UnsafeFileError(f"refused to load: the pickle holds NumPy Python objects. {_FIX_UNSAFE}")


def _np_reconstruct(func: Any) -> Any:
    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not np.ndarray or not _is_int_tuple(shape) or not isinstance(dtype, (bytes, str)):
            raise UnsupportedFileError("the pickle holds an unexpected NumPy array reconstruction")
        return func(subtype, shape, dtype)
    return reconstruct


def _np_scalar(func: Any) -> Any:
    def scalar(dtype: Any, data: Any = None) -> Any:
        _check_np_dtype(dtype)
        if not isinstance(data, (bytes, bytearray)):
            raise UnsupportedFileError("the pickle holds a NumPy scalar without raw bytes")
        return func(dtype, data)
    return scalar


def _np_frombuffer(func: Any) -> Any:
    def frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        _check_np_dtype(dtype)
        if not _is_int_tuple(shape) or order not in ("C", "F"):
            raise UnsupportedFileError("the pickle holds an unexpected NumPy buffer")
        return func(buf, dtype, shape, order)
    return frombuffer


def _torch_device(spec: Any, index: Any = None) -> torch.device:
    if not isinstance(spec, str) or not (index is None or isinstance(index, int)):
        raise UnsupportedFileError("the pickle holds an unexpected torch.device")
    return torch.device(spec) if index is None else torch.device(spec, index)


def _read_pickle(path: Path, sha: str) -> GeneratorFile:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f).load()
    except (UnsafeFileError, UnsupportedFileError):
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... on damaged data
        raise UnsupportedFileError(f"the pickle cannot be read: corrupted or truncated ({type(exc).__name__}: "
                                   f"{exc}). Download it again.") from None
    if isinstance(obj, int) and obj == _LEGACY_TORCH_MAGIC_NUMBER:
        return _read_torch(path, sha, "a legacy (non-zip) torch.save file")  # saved with a newer pickle protocol
    if isinstance(obj, _PersistentStub):
        obj = {"G_ema": obj}
    if isinstance(obj, tuple):
        raise UnsupportedFileError(f"the pickle holds a tuple of {len(obj)} items, not an NVlabs network dict "
                                   f"(TensorFlow-era pickles are tuples (G, D, Gs); Retrace does not read those).")
    if not isinstance(obj, dict):
        raise UnsupportedFileError(f"the pickle holds a {type(obj).__name__}, not an NVlabs network dict")
    _check_stored_values(obj, "a pickle")
    generator = obj.get("G_ema")
    if not isinstance(generator, _PersistentStub):
        generator = obj.get("G")
        if isinstance(generator, _PersistentStub):
            log.warning("%s has no G_ema; using the training generator G (its images are usually worse)", path)
    if not isinstance(generator, _PersistentStub):
        return _from_container(obj, sha, origin="a pickle")
    if generator.class_name != "Generator":
        raise UnsupportedFileError(f"the pickle's G_ema is a `{generator.class_name}`, not a `Generator`")
    state = _stub_state_dict(generator)
    family = _detect_family(state)
    init_args = generator.state.get("_init_args", ())
    init_kwargs = generator.state.get("_init_kwargs")
    if isinstance(init_kwargs, dict):
        kwargs = _flatten_init_kwargs(init_args, init_kwargs)
    else:
        log.warning("%s: the pickled Generator has no _init_kwargs; inferring its settings from tensor shapes", path)
        kwargs = _infer_stylegan2_kwargs(state) if family == "stylegan2" else _infer_stylegan3_kwargs(state)
    return _finish(family, kwargs, state, "nvlabs-pkl", sha, pickled=generator)


def _stub_state_dict(stub: _PersistentStub, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict()`` the module would have: parameters, persistent buffers, then submodules."""
    state = stub.state
    out: dict[str, torch.Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise UnsupportedFileError(f"`{prefix or 'G_ema'}` has a malformed {group}")
        for name, tensor in entries.items():
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise UnsupportedFileError(f"`{prefix}{name}` is a {type(tensor).__name__}, not a tensor")
            out[f"{prefix}{name}"] = tensor.detach()
    modules = state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise UnsupportedFileError(f"`{prefix or 'G_ema'}` has malformed submodules")
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(child, _PersistentStub):
            raise UnsupportedFileError(f"the submodule `{prefix}{name}` is a {type(child).__name__}, not an NVlabs "
                                       f"network object")
        out.update(_stub_state_dict(child, f"{prefix}{name}."))
    return out


# --- constructor arguments -------------------------------------------------------------------------------


def _plain_kwargs(value: Any, where: str = "init_kwargs") -> Any:
    """A JSON-safe copy: dicts (EasyDict too) to dict, tuples to lists, NumPy scalars/arrays to Python."""
    if isinstance(value, dict):
        return {str(k): _plain_kwargs(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_kwargs(v, where) for v in value]
    if isinstance(value, np.ndarray):
        return _plain_kwargs(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsupportedFileError(f"the constructor argument {where} is of type {type(value).__name__}; Retrace "
                               f"accepts only numbers, strings, lists and dicts there")


_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")


def _flatten_init_kwargs(init_args: Any, init_kwargs: dict) -> dict[str, Any]:
    """NVlabs ``_init_args``/``_init_kwargs`` (stylegan3 flat or ada nested form) to the flat form."""
    kwargs = _plain_kwargs(dict(init_kwargs))
    args = list(init_args) if isinstance(init_args, (list, tuple)) else []
    if len(args) > len(_POSITIONAL):
        raise UnsupportedFileError(f"the Generator was built with {len(args)} positional arguments")
    for name, value in zip(_POSITIONAL, args):
        kwargs.setdefault(name, _plain_kwargs(value))
    nested = kwargs.pop("synthesis_kwargs", None)
    if nested is not None:
        if not isinstance(nested, dict):
            raise UnsupportedFileError("synthesis_kwargs is not a dict")
        clash = set(nested) & set(kwargs)
        if clash:
            raise UnsupportedFileError(f"synthesis arguments given both nested and flat: {sorted(clash)}")
        kwargs.update({**ADA_CONSTRUCTOR_DEFAULTS, **nested})
    missing = [k for k in _POSITIONAL[:5] if k not in kwargs]
    if missing:
        raise UnsupportedFileError(f"the Generator's constructor arguments lack {missing}")
    kwargs["mapping_kwargs"] = dict(kwargs.get("mapping_kwargs") or {})
    return kwargs


def _detect_family(state: dict[str, torch.Tensor]) -> str:
    if "synthesis.input.affine.weight" in state:
        return "stylegan3"
    if "synthesis.b4.const" in state:
        return "stylegan2"
    sample = ", ".join(list(state)[:6])
    raise UnsupportedFileError(f"tensors of an unknown generator (no 'synthesis.b4.const' for StyleGAN2, no "
                               f"'synthesis.input.affine.weight' for StyleGAN3; first keys: {sample})")


def _mapping_kwargs(state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """z_dim, c_dim, w_dim and ``mapping_kwargs`` from the mapping tensors."""
    n = 0
    while f"mapping.fc{n}.weight" in state:
        n += 1
    if n == 0:
        raise UnsupportedFileError("no mapping network tensors ('mapping.fc0.weight')")
    w_dim = int(state[f"mapping.fc{n - 1}.weight"].shape[0])
    embed = state.get("mapping.embed.weight")
    c_dim = int(embed.shape[1]) if embed is not None else 0
    embed_features = int(embed.shape[0]) if embed is not None else 0
    z_dim = int(state["mapping.fc0.weight"].shape[1]) - embed_features
    mapping: dict[str, Any] = {"num_layers": n}
    if embed is not None and embed_features != w_dim:
        mapping["embed_features"] = embed_features
    if n > 1 and int(state["mapping.fc0.weight"].shape[0]) != w_dim:
        mapping["layer_features"] = int(state["mapping.fc0.weight"].shape[0])
    return {"z_dim": z_dim, "c_dim": c_dim, "w_dim": w_dim}, mapping


def _powers_of_two(lo: float, hi: float) -> list[int]:
    out, v = [], 1
    while v <= hi:
        if v >= lo:
            out.append(v)
        v *= 2
    return out


def _nvlabs_first(candidates: list[int]) -> list[int]:
    """NVlabs' default channel_base (32768) first when it is a candidate: saturated networks fit several."""
    return sorted(candidates, key=lambda v: v != 32768)


def _fit_channel_base(channels: dict[int, int]) -> tuple[int, int] | None:
    """(channel_base, channel_max) with ``min(channel_base // res, channel_max) == channels[res]`` for every block."""
    top = max(channels.values())
    for cmax in dict.fromkeys([512, 1024, top]):
        if cmax < top:
            continue
        lo, hi = 1, 1 << 30
        for res, ch in channels.items():
            if ch == cmax:
                lo = max(lo, cmax * res)
            else:
                lo, hi = max(lo, ch * res), min(hi, ch * res + res - 1)
        if lo > hi:
            continue
        for base in [*_nvlabs_first(_powers_of_two(lo, hi)), lo]:
            if all(min(base // res, cmax) == ch for res, ch in channels.items()):
                return base, cmax
    return None


def _infer_stylegan2_kwargs(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """StyleGAN2 constructor arguments from tensor shapes (blocks, channels, architecture)."""
    top, mapping = _mapping_kwargs(state)
    resolutions = sorted({int(m.group(1)) for k in state if (m := re.match(r"synthesis\.b(\d+)\.", k))})
    if not resolutions or resolutions[0] != 4 or resolutions != [4 * 2 ** i for i in range(len(resolutions))]:
        raise UnsupportedFileError(f"StyleGAN2 blocks at resolutions {resolutions}; expected 4, 8, 16, ...")
    res = resolutions[-1]
    channels = {4: int(state["synthesis.b4.const"].shape[0])}
    for r in resolutions[1:]:
        key = f"synthesis.b{r}.conv1.weight"
        if key not in state:
            raise UnsupportedFileError(f"StyleGAN2 block b{r} has no '{key}'")
        channels[r] = int(state[key].shape[0])
    rgb = state.get(f"synthesis.b{res}.torgb.weight")
    if rgb is None:
        raise UnsupportedFileError(f"StyleGAN2 generator without 'synthesis.b{res}.torgb.weight'")
    if any(k.endswith(".skip.weight") for k in state):
        architecture = "resnet"
    elif res > 4 and "synthesis.b4.torgb.weight" not in state:
        architecture = "orig"
    else:
        architecture = "skip"
    fitted = _fit_channel_base(channels)
    if fitted is None:
        raise UnsupportedFileError(f"no channel_base/channel_max reproduces the block channels {channels}. "
                                   f"{_FIX_EXPORT}")
    f = state.get("synthesis.b4.resample_filter")
    if f is not None and (f.shape != (4, 4) or not torch.allclose(f.float(), setup_filter([1, 3, 3, 1]))):
        raise UnsupportedFileError(f"a resampling filter other than [1, 3, 3, 1]. {_FIX_EXPORT}")
    kwargs = {**top, "img_resolution": res, "img_channels": int(rgb.shape[0]), "mapping_kwargs": mapping,
              "channel_base": fitted[0], "channel_max": fitted[1], "architecture": architecture,
              "kernel_size": int(state["synthesis.b4.conv1.weight"].shape[-1]),
              "use_noise": "synthesis.b4.conv1.noise_strength" in state, **NVLABS_TRAINING_DEFAULTS}
    log.info("StyleGAN2 settings inferred from tensor shapes: %s (num_fp16_res and conv_clamp are not stored in a "
             "state dict; assuming the NVlabs training values)", kwargs)
    return kwargs


SG3_DEFAULTS: dict[str, Any] = {"num_critical": 2, "first_cutoff": 2, "first_stopband": 2 ** 2.1,
                                "last_stopband_rel": 2 ** 0.3, "margin_size": 10}


def stylegan3_layer_plan(img_resolution: int, img_channels: int, channel_base: float, channel_max: int,
                         num_layers: int = 14, num_critical: int = 2, first_cutoff: float = 2,
                         first_stopband: float = 2 ** 2.1, last_stopband_rel: float = 2 ** 0.3,
                         margin_size: int = 10) -> tuple[list[tuple[int, int]], list[float]]:
    """(output size, channels) of StyleGAN3 layers L0..L{num_layers}, and each layer's cutoff.

    Karras et al. 2021 ("Alias-Free GAN", appendix F): along the layers, the cutoff f_c and the minimum
    stopband f_t move geometrically from their first values to the image's Nyquist rate (reached
    ``num_critical`` layers before the end); a layer samples at the smallest power of two >= 2 f_t (at most the
    image resolution) and carries ``margin_size`` extra pixels per side, except the last two; channels are
    ``channel_base / (2 f_c)`` capped at ``channel_max``, and the last layer outputs the image channels.
    """
    nyquist = img_resolution / 2
    plan: list[tuple[int, int]] = []
    cutoffs: list[float] = []
    for idx in range(num_layers + 1):
        t = min(idx / (num_layers - num_critical), 1.0)
        cutoff = first_cutoff * (nyquist / first_cutoff) ** t
        stopband = first_stopband * (nyquist * last_stopband_rel / first_stopband) ** t
        rate = 2.0 ** math.ceil(math.log2(min(2 * stopband, img_resolution)))
        size = img_resolution if idx >= num_layers - 1 else int(rate) + 2 * margin_size
        channels = img_channels if idx == num_layers else int(round(min(channel_base / 2 / cutoff, channel_max)))
        plan.append((size, channels))
        cutoffs.append(cutoff)
    return plan, cutoffs


def _infer_stylegan3_kwargs(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """StyleGAN3 constructor arguments from layer names ``L{i}_{size}_{channels}`` and tensor shapes."""
    top, mapping = _mapping_kwargs(state)
    layers: dict[int, tuple[int, int]] = {}
    for key in state:
        m = re.match(r"synthesis\.L(\d+)_(\d+)_(\d+)\.weight$", key)
        if m:
            layers[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    if not layers or sorted(layers) != list(range(len(layers))) or len(layers) < 4:
        raise UnsupportedFileError(f"StyleGAN3 layers numbered {sorted(layers)}; expected L0, L1, ... (at least 4)")
    plan = [layers[i] for i in range(len(layers))]
    num_layers = len(plan) - 1
    img_resolution, img_channels = plan[-1]
    names = [f"L{i}_{s}_{c}" for i, (s, c) in enumerate(plan)]
    conv_kernel = int(state[f"synthesis.{names[0]}.weight"].shape[-1])
    radial = any(state[f"synthesis.{n}.down_filter"].ndim == 2 for n in names
                 if f"synthesis.{n}.down_filter" in state)
    top_ch = max(c for _, c in plan[:-1])
    _, cutoffs = stylegan3_layer_plan(img_resolution, img_channels, 1.0, 1, num_layers)
    found = None
    for cmax in dict.fromkeys([512, 1024, top_ch]):
        if cmax < top_ch:
            continue
        lo, hi = 1.0, float(1 << 30)
        for (_, ch), cut in zip(plan[:-1], cutoffs[:-1]):
            if ch == cmax:
                lo = max(lo, 2 * cut * (cmax - 0.5))
            else:
                lo, hi = max(lo, 2 * cut * (ch - 0.5)), min(hi, 2 * cut * (ch + 0.5))
        if lo > hi:
            continue
        thousands = [k * 1024 for k in range(math.ceil(lo / 1024), math.floor(hi / 1024) + 1)][:4]
        for base in [*_nvlabs_first(_powers_of_two(lo, hi)), *thousands, math.ceil(lo), math.floor(hi)]:
            if stylegan3_layer_plan(img_resolution, img_channels, base, cmax, num_layers)[0] == plan:
                found = (base, cmax)
                break
        if found:
            break
    if found is None:
        raise UnsupportedFileError(f"the StyleGAN3 layer names {names} do not follow the NVlabs layer schedule for "
                                   f"any channel_base/channel_max (with the default cutoffs and margin). {_FIX_EXPORT}")
    kwargs = {**top, "img_resolution": img_resolution, "img_channels": img_channels, "mapping_kwargs": mapping,
              "channel_base": found[0], "channel_max": found[1], "num_layers": num_layers,
              "conv_kernel": conv_kernel, "use_radial_filters": radial, **NVLABS_TRAINING_DEFAULTS}
    log.info("StyleGAN3 settings inferred from layer names and shapes: %s (num_fp16_res and conv_clamp are not "
             "stored in a state dict; assuming the NVlabs training values)", kwargs)
    return kwargs


# --- rosinality ------------------------------------------------------------------------------------------


def _rosinality_to_nvlabs(ros: dict[str, torch.Tensor], latent_avg: Any,
                          args: Any) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """rosinality/stylegan2-pytorch names to NVlabs names (table in the reference notes, section 2)."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in ros:
            raise UnsupportedFileError(f"rosinality checkpoint without '{key}'")
        used.add(key)
        return ros[key].detach()

    n_mlp = 0
    while f"style.{n_mlp + 1}.weight" in ros:
        n_mlp += 1
    if n_mlp == 0:
        raise UnsupportedFileError("rosinality checkpoint without mapping layers 'style.1.weight'")
    style_dim = int(ros["style.1.weight"].shape[1])
    n_convs = 0
    while f"convs.{n_convs}.conv.weight" in ros:
        n_convs += 1
    if n_convs % 2:
        raise UnsupportedFileError(f"rosinality checkpoint with an odd number of convs ({n_convs})")
    n_up = n_convs // 2
    resolutions = [4 * 2 ** k for k in range(n_up + 1)]
    img_resolution = resolutions[-1]
    img_channels = int(ros["to_rgb1.conv.weight"].shape[1])
    filt = setup_filter([1, 3, 3, 1])

    nv: dict[str, torch.Tensor] = {}
    for i in range(n_mlp):
        nv[f"mapping.fc{i}.weight"] = take(f"style.{i + 1}.weight")
        nv[f"mapping.fc{i}.bias"] = take(f"style.{i + 1}.bias")

    def conv(dst: str, src: str, noise: str) -> None:
        weight = take(f"{src}.conv.weight")
        if weight.ndim != 5 or weight.shape[0] != 1:
            raise UnsupportedFileError(f"rosinality '{src}.conv.weight' has shape {tuple(weight.shape)}")
        nv[f"{dst}.weight"] = weight[0]
        nv[f"{dst}.noise_strength"] = take(f"{src}.noise.weight").reshape([])
        nv[f"{dst}.bias"] = take(f"{src}.activate.bias")
        nv[f"{dst}.resample_filter"] = filt.clone()
        nv[f"{dst}.noise_const"] = take(noise)[0, 0]
        nv[f"{dst}.affine.weight"] = take(f"{src}.conv.modulation.weight")
        nv[f"{dst}.affine.bias"] = take(f"{src}.conv.modulation.bias")
        blur = f"{src}.conv.blur.kernel"
        if blur in ros:
            check_kernel(blur)

    def torgb(dst: str, src: str) -> None:
        weight = take(f"{src}.conv.weight")
        nv[f"{dst}.weight"] = weight[0]
        nv[f"{dst}.bias"] = take(f"{src}.bias").reshape(-1)
        nv[f"{dst}.affine.weight"] = take(f"{src}.conv.modulation.weight")
        nv[f"{dst}.affine.bias"] = take(f"{src}.conv.modulation.bias")
        if f"{src}.upsample.kernel" in ros:
            check_kernel(f"{src}.upsample.kernel")

    def check_kernel(key: str) -> None:
        kernel = take(key)
        if kernel.shape != (4, 4) or not torch.allclose(kernel.float(), filt * 4, atol=1e-6):
            raise UnsupportedFileError(f"rosinality '{key}' is not the [1, 3, 3, 1] blur kernel; Retrace supports "
                                       f"only that one")

    const = take("input.input")
    nv["synthesis.b4.const"] = const[0]
    nv["synthesis.b4.resample_filter"] = filt.clone()
    conv("synthesis.b4.conv1", "conv1", "noises.noise_0")
    torgb("synthesis.b4.torgb", "to_rgb1")
    channels = {4: int(const.shape[1])}
    for k, res in enumerate(resolutions[1:], start=1):
        nv[f"synthesis.b{res}.resample_filter"] = filt.clone()
        conv(f"synthesis.b{res}.conv0", f"convs.{2 * k - 2}", f"noises.noise_{2 * k - 1}")
        conv(f"synthesis.b{res}.conv1", f"convs.{2 * k - 1}", f"noises.noise_{2 * k}")
        torgb(f"synthesis.b{res}.torgb", f"to_rgbs.{k - 1}")
        channels[res] = int(nv[f"synthesis.b{res}.conv1.weight"].shape[0])
    leftover = sorted(set(ros) - used)
    if leftover:
        raise UnsupportedFileError(f"rosinality checkpoint with tensors Retrace cannot place: {leftover[:8]} (a "
                                   f"modified architecture?)")
    fitted = _fit_channel_base(channels)
    if fitted is None:
        raise UnsupportedFileError(f"no channel_base/channel_max reproduces the rosinality channels {channels}")
    init_kwargs = {"z_dim": style_dim, "c_dim": 0, "w_dim": style_dim, "img_resolution": img_resolution,
                   "img_channels": img_channels, "mapping_kwargs": {"num_layers": n_mlp},
                   "channel_base": fitted[0], "channel_max": fitted[1], **ROSINALITY_SETTINGS}
    _check_rosinality_args(args, init_kwargs, channels)
    if latent_avg is not None:
        if not isinstance(latent_avg, torch.Tensor) or latent_avg.shape[-1] != style_dim:
            raise UnsupportedFileError(f"'latent_avg' is not a [{style_dim}] tensor")
        rows = latent_avg.detach().float().reshape(-1, style_dim)
        w_avg = rows[0]
        if not torch.equal(rows, rows[:1].expand_as(rows)):
            log.warning("latent_avg has %d different rows; using their mean as w_avg", rows.shape[0])
            w_avg = rows.mean(0)
    else:
        w_avg = estimate_w_avg(nv, style_dim, style_dim, n_mlp)
        log.info("rosinality checkpoint without latent_avg: w_avg = mean of mapping(z) over %d z (seed %#x)",
                 W_AVG_SAMPLES, W_AVG_SEED)
    nv["mapping.w_avg"] = w_avg.clone()
    return "stylegan2", init_kwargs, nv


def _check_rosinality_args(args: Any, init_kwargs: dict[str, Any], channels: dict[int, int]) -> None:
    if args is None:
        return
    if not isinstance(args, argparse.Namespace):
        log.warning("ignoring rosinality 'args' of type %s", type(args).__name__)
        return
    expected = {"size": init_kwargs["img_resolution"], "latent": init_kwargs["w_dim"],
                "n_mlp": init_kwargs["mapping_kwargs"]["num_layers"]}
    wrong = {k: (getattr(args, k), v) for k, v in expected.items() if getattr(args, k, v) != v}
    if wrong:
        detail = ", ".join(f"args.{k}={a!r} but the tensors say {b!r}" for k, (a, b) in wrong.items())
        raise UnsupportedFileError(f"the rosinality checkpoint's training arguments disagree with its tensors: "
                                   f"{detail}")
    cm = getattr(args, "channel_multiplier", None)
    if cm is not None:
        standard = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm,
                    1024: 16 * cm}
        if any(standard.get(r) != c for r, c in channels.items()):
            log.info("rosinality channels %s are not the channel_multiplier=%s layout; the tensors decide",
                     channels, cm)


@torch.no_grad()
def estimate_w_avg(state: dict[str, torch.Tensor], z_dim: int, w_dim: int, num_layers: int,
                   samples: int = W_AVG_SAMPLES, seed: int = W_AVG_SEED) -> torch.Tensor:
    """Mean of mapping(z) over ``samples`` z ~ N(0, I) from a fixed seed (StyleGAN's w_avg, without labels)."""
    mapping = MappingNetwork(z_dim=z_dim, c_dim=0, w_dim=w_dim, num_ws=1, num_layers=num_layers)
    mapping.load_state_dict({k[len("mapping."):]: v for k, v in state.items()
                             if k.startswith("mapping.fc")} | {"w_avg": torch.zeros(w_dim)}, strict=True)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(w_dim, dtype=torch.float64)
    for start in range(0, samples, 2000):
        z = torch.randn([min(2000, samples - start), z_dim], generator=gen)
        total += mapping(z)[:, 0].double().sum(0)
    return (total / samples).float()


# --- validation ------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A constructor argument for a message: at most 40 characters (and no 4300-digit integer conversion)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'-' if value < 0 else ''}(an integer of {value.bit_length()} bits)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_number(where: str, value: Any, bounds: tuple[int, int, str]) -> None:
    lo, hi, meaning = bounds
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                        and not math.isfinite(value)):
        raise UnsupportedFileError(f"the constructor argument {where} is {_shown(value)}, not a number ({meaning}); "
                                   f"the file is damaged or not a StyleGAN generator")
    if value > hi:
        raise UnsupportedFileError(f"{where} {_shown(value)} exceeds {hi}, the largest Retrace builds ({meaning}); "
                                   f"the file is damaged or not a StyleGAN generator")
    if value < lo:
        raise UnsupportedFileError(f"{where} {_shown(value)} is below {lo}, the smallest Retrace builds ({meaning}); "
                                   f"the file is damaged or not a StyleGAN generator")


def _check_bounds(family: str, init_kwargs: dict[str, Any]) -> None:
    """Refuse constructor arguments beyond what any published generator uses, before anything is built."""
    nested = init_kwargs.get("synthesis_kwargs")
    flat = {**init_kwargs, **(nested if isinstance(nested, dict) else {})}
    missing = [k for k in _POSITIONAL[:5] if k not in flat]
    if missing:
        raise UnsupportedFileError(f"the generator's constructor arguments lack {missing}; the file is damaged or "
                                   f"not a StyleGAN generator")
    for name, bounds in {**_ARG_BOUNDS, **_FAMILY_BOUNDS[family]}.items():
        _check_number(name, flat.get(name), bounds)
    mapping = flat.get("mapping_kwargs") or {}
    if not isinstance(mapping, dict):
        raise UnsupportedFileError(f"the constructor argument mapping_kwargs is a {type(mapping).__name__}, not a dict")
    for name, bounds in _MAPPING_BOUNDS.items():
        _check_number(f"mapping_kwargs.{name}", mapping.get(name), bounds)
    if family == "stylegan2":
        taps = flat.get("resample_filter")
        if isinstance(taps, (list, tuple)) and not 1 <= len(taps) <= _MAX_RESAMPLE_TAPS:
            raise UnsupportedFileError(f"resample_filter has {len(taps)} taps; Retrace builds 1 to "
                                       f"{_MAX_RESAMPLE_TAPS} (published generators use [1, 3, 3, 1]); the file is "
                                       f"damaged or not a StyleGAN generator")
        return
    from .stylegan3 import synthesis_schedule

    for name in _SG3_REAL_ARGS:
        _check_number(name, flat.get(name), (2 ** -8, 4096, "a filter frequency setting of the layer schedule"))
    keys = ("channel_base", "channel_max", "num_layers", "num_critical", "first_cutoff", "first_stopband",
            "last_stopband_rel", "margin_size", "conv_kernel", "filter_size", "lrelu_upsampling",
            "use_radial_filters")
    try:
        with np.errstate(all="ignore"):
            _, specs = synthesis_schedule(int(flat["img_resolution"]), int(flat["img_channels"]),
                                          **{k: flat[k] for k in keys if k in flat})
    except Exception as exc:
        raise UnsupportedFileError(f"its constructor arguments {init_kwargs} do not give a StyleGAN3 layer schedule: "
                                   f"{type(exc).__name__}: {exc}") from None
    taps = max(max(spec.up_taps, spec.down_taps) for spec in specs)
    if taps > _MAX_FILTER_TAPS:
        raise UnsupportedFileError(f"its StyleGAN3 settings ask for {taps}-tap filters; Retrace builds at most "
                                   f"{_MAX_FILTER_TAPS} (published generators use 24 or fewer); the file is damaged "
                                   f"or not a StyleGAN generator")


def _build_for_check(family: str, init_kwargs: dict[str, Any]) -> nn.Module:
    """The generator ``init_kwargs`` describe, on the meta device: shapes and dtypes, no memory for values."""
    if family not in ("stylegan2", "stylegan3"):
        raise UnsupportedFileError(f"unknown generator family {family!r}")
    _check_bounds(family, init_kwargs)
    try:
        with torch.device("meta"):
            return build_generator(family, copy.deepcopy(init_kwargs))
    except ImportError:
        raise
    except Exception as exc:
        raise UnsupportedFileError(f"its constructor arguments {init_kwargs} do not build a {family} generator: "
                                   f"{type(exc).__name__}: {exc}") from None


def _check_tensors(family: str, init_kwargs: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """Compare a file's tensor names and shapes with the generator its settings describe (built on the meta
    device, after a size budget), before any tensor needs to be in memory; returns that meta generator."""
    model = _build_for_check(family, init_kwargs)
    reference = model.state_dict()
    needed = sum(t.numel() for t in reference.values())
    held = sum(math.prod(shape) for shape in shapes.values())
    if needed > held + _BUDGET_SLACK:
        raise UnsupportedFileError(
            f"its settings {init_kwargs} describe a {family} generator of {needed:,} values ({needed * 4 / 2**20:,.1f} "
            f"MiB as float32), but the file holds only {held:,} values in {len(shapes)} tensors. A file cannot hold "
            f"a generator larger than itself: it is damaged or its settings were edited.")
    missing = [k for k in reference if k not in shapes]
    unexpected = [k for k in shapes if k not in reference]
    wrong = [f"{k} {tuple(shapes[k])} vs {tuple(reference[k].shape)}" for k in reference
             if k in shapes and tuple(shapes[k]) != tuple(reference[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:4]})")
        if wrong:
            parts.append(f"wrong shapes (e.g. {wrong[:3]})")
        raise UnsupportedFileError(f"its tensors do not match a {family} generator built from its settings "
                                   f"{init_kwargs}: {'; '.join(parts)}")
    return model


def _finish(family: str, init_kwargs: dict[str, Any], state: dict[str, torch.Tensor], source_format: str,
            sha: str, pickled: _PersistentStub | None = None, model: nn.Module | None = None) -> GeneratorFile:
    """Check the tensors against the generator ``init_kwargs`` describe (``model``: already checked by
    ``_check_tensors``); cast them to its dtypes and canonicalise the arguments."""
    if model is None:
        model = _check_tensors(family, init_kwargs, {k: tuple(t.shape) for k, t in state.items()})
    reference = model.state_dict()
    tensors = {}
    for key, ref in reference.items():
        t = state[key].detach()
        if not (t.is_floating_point() or t.is_complex()) and ref.is_floating_point():
            raise UnsupportedFileError(f"'{key}' has dtype {t.dtype}, expected floating point")
        tensors[key] = t.to(device="cpu", dtype=ref.dtype) if t.dtype != ref.dtype or t.device.type != "cpu" else t
    if pickled is not None:
        _cross_check(pickled, model)
    canonical = _plain_kwargs(getattr(model, "init_kwargs", init_kwargs))
    return GeneratorFile(family=family, init_kwargs=canonical, state_dict=tensors, source_format=source_format,
                         sha256=sha)


# Attributes NVlabs pickles per module whose meaning is fixed: a disagreement means the settings are wrong.
_STRUCTURAL_ATTRS = ("z_dim", "c_dim", "w_dim", "num_ws", "img_resolution", "img_channels", "in_features",
                     "out_features", "in_channels", "out_channels", "resolution", "in_size", "out_size", "conv_kernel",
                     "is_torgb")
# Attributes that change numerics only (mixed precision, clamping): a disagreement is logged.
_NUMERIC_ATTRS = ("conv_clamp", "use_fp16")


def _comparable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        items = [_comparable(v) for v in value]
        return None if any(v is None and x is not None for v, x in zip(items, value)) else tuple(items)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None


def _same_value(a: Any, b: Any) -> bool:
    """Equal values; NVlabs keeps sizes as [w, h] arrays where ours may be one int, so a tuple may broadcast."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(_same_value, a, b))
    if isinstance(a, tuple) or isinstance(b, tuple):
        seq, one = (a, b) if isinstance(a, tuple) else (b, a)
        return len(seq) > 0 and all(_same_value(v, one) for v in seq)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _cross_check(stub: _PersistentStub, model: nn.Module) -> None:
    """Compare pickled per-module attributes (num_ws, img_resolution, ...) with the rebuilt generator."""
    disagreements: list[str] = []
    modules = dict(model.named_modules())

    def visit(node: _PersistentStub, path: str) -> None:
        module = modules.get(path)
        if module is not None:
            for attr in (*_STRUCTURAL_ATTRS, *_NUMERIC_ATTRS):
                if attr not in node.state or attr not in vars(module):
                    continue
                pickled, built = _comparable(node.state[attr]), _comparable(vars(module)[attr])
                if pickled is None or built is None or isinstance(pickled, str) != isinstance(built, str):
                    continue
                if not _same_value(pickled, built):
                    where = f"{path}.{attr}" if path else attr
                    if attr in _STRUCTURAL_ATTRS:
                        disagreements.append(f"{where}: pickled {pickled!r}, rebuilt {built!r}")
                    else:
                        log.warning("pickled %s=%r but the rebuilt generator has %r", where, pickled, built)
        for name, child in (node.state.get("_modules") or {}).items():
            if isinstance(child, _PersistentStub):
                visit(child, f"{path}.{name}" if path else name)

    visit(stub, "")
    if disagreements:
        raise UnsupportedFileError(f"the pickled network attributes disagree with the generator rebuilt from its "
                                   f"_init_kwargs: {'; '.join(disagreements[:5])}. The file was made by modified code "
                                   f"or edited. {_FIX_EXPORT}")
