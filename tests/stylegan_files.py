"""Test support: tiny StyleGAN generators and the files they come in (NVlabs .pkl, rosinality .pt, state-dict
.pt, Retrace .safetensors), plus malicious pickles that must be refused.

The NVlabs-style pickles are written by our own pickler that mimics the structure NVlabs' persistence code
produces (each network object as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``). No NVlabs code
is used or imported. While a pickle is written, fake ``torch_utils.persistence`` / ``dnnlib.util`` modules exist
in ``sys.modules`` only so that ``pickle`` can name those globals; the fake reconstruct function records the
call and raises if anything ever calls it. The malicious files are raw pickle opcodes assembled by hand: writing
them runs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import pickle
import struct
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrace.models import build_generator
from retrace.models.layers import setup_filter
from retrace.models.loader import NVLABS_CLASSES, save_generator

TINY_KWARGS: dict[str, dict[str, Any]] = {
    # Full precision and no clamping by default (num_fp16_res=0, conv_clamp=None): the same numbers on any device.
    "stylegan2": dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=16, img_channels=3,
                      mapping_kwargs={"num_layers": 2}, channel_base=256, channel_max=32,
                      num_fp16_res=0, conv_clamp=None),
    # A tiny config-T network (16 px, 7 layers of 16-32 channels) with every shape-defining argument explicit.
    "stylegan3": dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=16, img_channels=3,
                      mapping_kwargs={"num_layers": 2}, channel_base=256, channel_max=32, num_layers=6,
                      conv_kernel=3, use_radial_filters=False, num_fp16_res=0, conv_clamp=None),
}
W_AVG_SAMPLES = 1000

# Names NVlabs uses for our module classes where ours differ.
_NVLABS_NAME = {"SkipLayer": "Conv2dLayer"}

FAKE_PERSISTENCE_CALLS: list[str] = []


# --- tiny generators -------------------------------------------------------------------------------------


@torch.no_grad()
def tiny_generator(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny generator of ``family`` with every tensor drawn from ``seed`` (nonzero biases and noise strengths).

    ``mapping.w_avg`` is the mean of mapping(z) over 1000 seeded z. Eval mode, no gradients, CPU, float32.
    """
    kwargs = copy.deepcopy(TINY_KWARGS[family])
    kwargs.update(copy.deepcopy(overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = build_generator(family, kwargs)
    gen = torch.Generator().manual_seed(seed)
    for name, p in G.named_parameters():
        r = torch.randn(p.shape, generator=gen)
        if name.endswith("affine.bias"):
            p.add_(0.1 * r)  # stay near the initial 1 (SG3 input: [1, 0, 0, 0])
        elif name.endswith(".bias") or name.endswith("noise_strength"):
            p.copy_(0.1 * r)
        else:
            std = float(p.float().std()) if p.numel() > 1 else 0.0
            p.copy_(r * (std if std > 0 else 0.1))
    for name, b in G.named_buffers():
        if name.endswith("noise_const"):
            b.copy_(torch.randn(b.shape, generator=gen))
        elif name.endswith("magnitude_ema"):
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    z = torch.randn([W_AVG_SAMPLES, G.z_dim], generator=gen)
    c = None
    if G.c_dim > 0:
        c = torch.nn.functional.one_hot(torch.randint(G.c_dim, [W_AVG_SAMPLES], generator=gen), G.c_dim).float()
    G.mapping.w_avg.copy_(G.mapping(z, c)[:, 0].mean(0))
    _scale_output(G, target_std=0.5)
    return G.eval().requires_grad_(False)


@torch.no_grad()
def _scale_output(G: nn.Module, target_std: float) -> None:
    """Scale the to-RGB layers (the output is linear in them) so renders spread like real images in [-1, 1]."""
    std = float(render(G, seed=123, batch=8).std())
    for name, p in G.named_parameters():
        if ("torgb" in name and name.endswith(("torgb.weight", "torgb.bias"))) or \
                (G.family == "stylegan3" and name.startswith(f"synthesis.{G.synthesis.layer_names[-1]}.")
                 and name.endswith(("weight", "bias")) and "affine" not in name):
            p.mul_(target_std / std)


@torch.no_grad()
def render(G: nn.Module, seed: int = 1, batch: int = 2, truncation_psi: float = 1.0) -> torch.Tensor:
    """Images from seeded z with constant noise (deterministic)."""
    z = torch.randn([batch, G.z_dim], generator=torch.Generator().manual_seed(seed))
    c = torch.zeros([batch, G.c_dim]) if G.c_dim > 0 else None
    return G(z, c, truncation_psi=truncation_psi, noise_mode="const")


# --- NVlabs-style pickles --------------------------------------------------------------------------------


def _fake_reconstruct_persistent_obj(meta: Any) -> Any:
    FAKE_PERSISTENCE_CALLS.append(str(meta.get("class_name") if isinstance(meta, dict) else meta))
    raise RuntimeError("the fake torch_utils.persistence._reconstruct_persistent_obj was called: something "
                       "unpickled a test file with ordinary pickle machinery")


_fake_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_fake_reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
_fake_reconstruct_persistent_obj.__name__ = "_reconstruct_persistent_obj"


class _FakeEasyDict(dict):
    """Pickles as ``dnnlib.util.EasyDict``."""


_FakeEasyDict.__module__ = "dnnlib.util"
_FakeEasyDict.__qualname__ = "EasyDict"
_FakeEasyDict.__name__ = "EasyDict"

_FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


@contextlib.contextmanager
def _fake_nvlabs_modules() -> Iterator[None]:
    """Make ``torch_utils.persistence._reconstruct_persistent_obj`` and ``dnnlib.util.EasyDict`` nameable, briefly."""
    present = [name for name in _FAKE_MODULES if name in sys.modules]
    if present:
        raise RuntimeError(f"refusing to shadow real modules {present}")
    torch_utils, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    persistence._reconstruct_persistent_obj = _fake_reconstruct_persistent_obj
    torch_utils.persistence = persistence
    util.EasyDict = _FakeEasyDict
    dnnlib.util = util
    sys.modules.update({"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib,
                        "dnnlib.util": util})
    try:
        yield
    finally:
        for name in _FAKE_MODULES:
            sys.modules.pop(name, None)


def _module_source(payload: Path | None) -> str:
    """Text standing in for an NVlabs network module; creates ``payload`` if anyone ever executes it."""
    lines = ['"""Stand-in for an NVlabs network module (Retrace test file)."""', "import pathlib", ""]
    if payload is not None:
        lines.append(f"pathlib.Path({str(payload)!r}).write_text('module_src was executed')")
    lines += ["", "class Generator:", "    pass", ""]
    return "\n".join(lines)


def _is_plain(value: Any) -> bool:
    """Data NVlabs pickles carry in a module's state (no foreign classes)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, nn.Module, torch.dtype)):
        return True
    if isinstance(value, np.ndarray):
        return not value.dtype.hasobject
    if isinstance(value, np.generic):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain(v) for v in value)
    return False


class _NVlabsStylePickler(pickle.Pickler):
    """Pickles every ``nn.Module`` the way NVlabs' persistence does: REDUCE of the reconstruct function."""

    def __init__(self, file: Any, roots: list[nn.Module], root_kwargs: dict[str, Any], module_src: str,
                 protocol: int, state_overrides: dict[str, dict[str, Any]]) -> None:
        super().__init__(file, protocol=protocol)
        self._roots = {id(root) for root in roots}
        self._root_kwargs = root_kwargs
        self._module_src = module_src
        self._paths = {id(m): name for root in roots for name, m in root.named_modules()}
        self._overrides = state_overrides

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, nn.Module):
            return NotImplemented
        name = type(obj).__name__
        class_name = name if name in NVLABS_CLASSES else _NVLABS_NAME.get(name)
        if class_name is None:
            raise TypeError(f"no NVlabs class name for {name}; add it to _NVLABS_NAME")
        state = {k: v for k, v in vars(obj).items() if _is_plain(v)}
        if id(obj) in self._roots:
            state["_init_args"] = ()
            state["_init_kwargs"] = self._root_kwargs
        state.update(self._overrides.get(self._paths.get(id(obj), "?"), {}))
        meta = dict(type="class", version=6, module_src=self._module_src, class_name=class_name, state=state)
        return _fake_reconstruct_persistent_obj, (meta,)


def _nvlabs_init_kwargs(G: nn.Module, form: str) -> dict[str, Any]:
    kwargs = copy.deepcopy(G.init_kwargs)
    mapping = _FakeEasyDict(kwargs.pop("mapping_kwargs", {}) or {})
    top = {k: kwargs.pop(k) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")}
    if form == "flat":
        return {**top, "mapping_kwargs": mapping, **kwargs}
    if form == "nested":
        return {**top, "mapping_kwargs": mapping, "synthesis_kwargs": _FakeEasyDict(kwargs)}
    raise ValueError(f"form must be 'flat' or 'nested', got {form!r}")


def write_nvlabs_pickle(path: str | Path, G: nn.Module, form: str = "flat", source_payload: Path | None = None,
                        protocol: int = 4, state_overrides: dict[str, dict[str, Any]] | None = None,
                        include_ema: bool = True) -> Path:
    """An NVlabs-structured network pickle: ``dict(G, D, G_ema, augment_pipe, training_set_kwargs)``.

    ``form`` picks the Generator's ``_init_kwargs`` layout ('flat' as in stylegan3, 'nested' as in
    stylegan2-ada-pytorch). ``module_src`` would create ``source_payload`` if it were ever executed.
    ``state_overrides`` maps a module path ('' = the Generator, 'synthesis', ...) to attributes to overwrite in
    its pickled state (to make inconsistent files). ``include_ema=False`` leaves out G_ema.
    """
    path = Path(path)
    G = copy.deepcopy(G).cpu().float().eval().requires_grad_(False)
    G_train = copy.deepcopy(G)
    with _fake_nvlabs_modules():
        root_kwargs = _nvlabs_init_kwargs(G, form)
        data: dict[str, Any] = dict(G=G_train, D=None, augment_pipe=None)
        if include_ema:
            data["G_ema"] = G
        data["training_set_kwargs"] = dict(class_name="training.dataset.ImageFolderDataset", path="tiny.zip",
                                           use_labels=False, max_size=None, xflip=False,
                                           resolution=G.img_resolution, random_seed=0)
        buf = io.BytesIO()
        _NVlabsStylePickler(buf, [G, G_train], root_kwargs, _module_source(source_payload), protocol,
                            state_overrides or {}).dump(data)
    path.write_bytes(buf.getvalue())
    return path


# --- rosinality, state dicts, safetensors ----------------------------------------------------------------


def rosinality_state_dict(G: nn.Module) -> dict[str, torch.Tensor]:
    """The rosinality/stylegan2-pytorch names of a StyleGAN2 'skip' generator (inverse of the loader's table)."""
    kw = G.init_kwargs
    if G.family != "stylegan2" or kw.get("architecture", "skip") != "skip" or G.c_dim or G.z_dim != G.w_dim:
        raise ValueError("rosinality checkpoints exist only for unconditional StyleGAN2 'skip' with z_dim == w_dim")
    sd = {k: v.detach().clone() for k, v in G.state_dict().items()}
    kernel = setup_filter([1, 3, 3, 1]) * 4
    ros: dict[str, torch.Tensor] = {}
    n_mlp = kw["mapping_kwargs"]["num_layers"]
    for i in range(n_mlp):
        ros[f"style.{i + 1}.weight"] = sd[f"mapping.fc{i}.weight"]
        ros[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.bias"]
    ros["input.input"] = sd["synthesis.b4.const"][None]

    def conv(dst: str, src: str, noise: str, up: bool) -> None:
        ros[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        ros[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        ros[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        if up:
            ros[f"{dst}.conv.blur.kernel"] = kernel.clone()
        ros[f"{dst}.noise.weight"] = sd[f"{src}.noise_strength"].reshape(1)
        ros[f"{dst}.activate.bias"] = sd[f"{src}.bias"]
        ros[noise] = sd[f"{src}.noise_const"][None, None]

    def torgb(dst: str, src: str, up: bool) -> None:
        if up:
            ros[f"{dst}.upsample.kernel"] = kernel.clone()
        ros[f"{dst}.conv.weight"] = sd[f"{src}.weight"][None]
        ros[f"{dst}.conv.modulation.weight"] = sd[f"{src}.affine.weight"]
        ros[f"{dst}.conv.modulation.bias"] = sd[f"{src}.affine.bias"]
        ros[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(1, -1, 1, 1)

    conv("conv1", "synthesis.b4.conv1", "noises.noise_0", up=False)
    torgb("to_rgb1", "synthesis.b4.torgb", up=False)
    res, k = 8, 1
    while res <= G.img_resolution:
        conv(f"convs.{2 * k - 2}", f"synthesis.b{res}.conv0", f"noises.noise_{2 * k - 1}", up=True)
        conv(f"convs.{2 * k - 1}", f"synthesis.b{res}.conv1", f"noises.noise_{2 * k}", up=False)
        torgb(f"to_rgbs.{k - 1}", f"synthesis.b{res}.torgb", up=True)
        res, k = res * 2, k + 1
    return ros


def write_rosinality_pt(path: str | Path, G: nn.Module, with_args: bool = True,
                        with_latent_avg: bool = True) -> Path:
    """A rosinality checkpoint ``{"g_ema", "latent_avg"?, "args"?}`` (``args`` an argparse.Namespace)."""
    path = Path(path)
    ckpt: dict[str, Any] = {"g_ema": rosinality_state_dict(G)}
    if with_latent_avg:
        ckpt["latent_avg"] = G.mapping.w_avg.detach().clone()
    if with_args:
        ckpt["args"] = argparse.Namespace(size=G.img_resolution, latent=G.w_dim,
                                          n_mlp=G.init_kwargs["mapping_kwargs"]["num_layers"], channel_multiplier=2,
                                          batch=4, iter=800000, r1=10, path_regularize=2, mixing=0.9)
    torch.save(ckpt, path)
    return path


def write_psp_pt(path: str | Path, G: nn.Module) -> Path:
    """A pSp/e4e-style checkpoint: ``{"state_dict": {"encoder.*", "decoder.*"}, "opts", "latent_avg"}``."""
    path = Path(path)
    state = {f"decoder.{k}": v for k, v in rosinality_state_dict(G).items()}
    state["encoder.conv.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save({"state_dict": state, "opts": {"stylegan_size": G.img_resolution, "encoder_type": "tiny"},
                "latent_avg": G.mapping.w_avg.detach().clone()[None].repeat(G.num_ws, 1)}, path)
    return path


def write_state_dict_pt(path: str | Path, G: nn.Module, with_init_kwargs: bool = False) -> Path:
    """``torch.save(G.state_dict())``; with ``with_init_kwargs`` as ``{"state_dict", "init_kwargs"}``."""
    path = Path(path)
    sd = {k: v.detach().clone() for k, v in G.state_dict().items()}
    torch.save({"state_dict": sd, "init_kwargs": copy.deepcopy(G.init_kwargs)} if with_init_kwargs else sd, path)
    return path


def write_safetensors(path: str | Path, G: nn.Module) -> Path:
    """A Retrace ``.safetensors`` (``models.loader.save_generator``)."""
    return save_generator(path, G)


# --- malicious pickles (raw opcodes; nothing runs while writing them) -------------------------------------


def _op_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _op_bytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b


def _op_int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_call(module: str, name: str, *args: bytes) -> bytes:
    return _op_global(module, name) + b"(" + b"".join(args) + b"tR"


def _op_dict(items: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(_op_str(k) + v for k, v in items.items()) + b"u"


def _op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _op_list(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


_NONE, _FALSE, _EMPTY = b"N", b"\x89", b"}"


def _stream(body: bytes) -> bytes:
    return b"\x80\x03" + body + b"."


def _empty_ordered_dict() -> bytes:
    return _op_call("collections", "OrderedDict")


def _persistent(class_name: str, state: bytes, module_src: str = "", version: int = 6, kind: str = "class") -> bytes:
    meta = _op_dict({"type": _op_str(kind), "version": _op_int(version), "module_src": _op_str(module_src),
                     "class_name": _op_str(class_name), "state": state})
    return _op_call("torch_utils.persistence", "_reconstruct_persistent_obj", meta)


def write_malicious_pickles(directory: str | Path, marker: Path) -> dict[str, Path]:
    """Files that would create ``marker`` (or run a program) if unpickled by ordinary means.

    Keys: reduce_os_system, builtins_exec, builtins_eval, subprocess_popen, unknown_persistent_class,
    smuggled_in_state, smuggled_in_storage, torch_zip_os_system, tensorflow_tuple.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    m = str(marker)
    touch = f"touch '{m}'"
    py_touch = f"__import__('pathlib').Path({m!r}).write_text('pwned')"
    out: dict[str, Path] = {}

    def put(name: str, data: bytes, suffix: str = ".pkl") -> None:
        out[name] = directory / f"{name}{suffix}"
        out[name].write_bytes(data)

    # (a) the classic: REDUCE os.system (written as posix.system, what pickle records on Linux and macOS).
    put("reduce_os_system", _stream(_op_call("posix", "system", _op_str(touch))))
    # (b) builtins.exec / builtins.eval of code that creates the marker, inside an NVlabs-looking dict.
    put("builtins_exec", _stream(_op_dict({"G_ema": _op_call("builtins", "exec", _op_str(py_touch))})))
    put("builtins_eval", _stream(_op_dict({"G_ema": _op_call("builtins", "eval", _op_str(py_touch))})))
    # (c) subprocess.Popen(['touch', marker]).
    put("subprocess_popen", _stream(_op_call("subprocess", "Popen", _op_list(_op_str("touch"), _op_str(m)))))
    # (d) an NVlabs persistent object of a class nobody knows, whose embedded source creates the marker.
    src = f"import pathlib\npathlib.Path({m!r}).write_text('pwned')\n\nclass EvilNet:\n    pass\n"
    put("unknown_persistent_class", _stream(_op_dict({
        "G": _NONE, "D": _NONE, "G_ema": _persistent("EvilNet", _EMPTY, src), "augment_pipe": _NONE})))
    # (e) a well-formed Generator record whose parameter is a "tensor" rebuilt from os.system's result.
    fake_tensor = _op_call("torch._utils", "_rebuild_tensor_v2", _op_call("posix", "system", _op_str(touch)),
                           _op_int(0), _op_tuple(_op_int(1)), _op_tuple(_op_int(1)), _FALSE, _empty_ordered_dict())
    state = _op_dict({"training": _FALSE, "_parameters": _op_dict({"weight": fake_tensor}),
                      "_buffers": _empty_ordered_dict(), "_modules": _empty_ordered_dict()})
    put("smuggled_in_state", _stream(_op_dict({"G_ema": _persistent("Generator", state)})))
    # (e') the same, one level deeper: the storage's nested torch blob is itself a pickle calling os.system.
    blob = b"\x80\x02" + _op_call("posix", "system", _op_str(touch)) + b"."
    storage_tensor = _op_call("torch._utils", "_rebuild_tensor_v2",
                              _op_call("torch.storage", "_load_from_bytes", _op_bytes(blob)),
                              _op_int(0), _op_tuple(_op_int(1)), _op_tuple(_op_int(1)), _FALSE,
                              _empty_ordered_dict())
    state = _op_dict({"_parameters": _op_dict({"weight": storage_tensor}), "_buffers": _EMPTY, "_modules": _EMPTY})
    put("smuggled_in_storage", _stream(_op_dict({"G_ema": _persistent("Generator", state)})))
    # (e'') a torch.save zip archive (what rosinality .pt files are) whose data.pkl calls os.system.
    buf = io.BytesIO()
    torch.save({"g_ema": {}}, buf)
    zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = b"\x80\x02" + _op_dict({"g_ema": _op_call("posix", "system", _op_str(touch))}) + b"."
            zout.writestr(info, data)
    put("torch_zip_os_system", zbuf.getvalue(), suffix=".pt")
    # (f) a TensorFlow-era pickle: a tuple (G, D, Gs) of dnnlib.tflib Networks, whose state carries build code.
    network = (_op_global("dnnlib.tflib.network", "Network") + b")\x81"
               + _op_dict({"version": _op_int(4), "name": _op_str("G_synthesis"),
                           "build_module_src": _op_str(src), "build_func_name": _op_str("G_main")}) + b"b")
    put("tensorflow_tuple", _stream(_op_tuple(network, network, network)))
    return out
