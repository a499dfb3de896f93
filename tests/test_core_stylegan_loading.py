"""Safe StyleGAN generator loading: every format gives the same tensors, and no file can run code.

Tiny generators of both families are written as NVlabs pickles (flat and nested constructor arguments),
rosinality / pSp checkpoints, torch.save state dicts and Retrace safetensors; each must load to exactly the
same tensors, constructor arguments and images. Malicious pickles must be refused with a message naming what
they asked for, and must leave no trace.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import pickletools
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from paths import ROOT
from retrace.models import convert
from retrace.models.loader import (NVLABS_TRAINING_DEFAULTS, GeneratorFile, UnsafeFileError, UnsupportedFileError,
                                   convert_to_safetensors, estimate_w_avg, load_generator, read_generator_file,
                                   save_generator)
from stylegan_files import (FAKE_PERSISTENCE_CALLS, _op_call, _op_dict, _op_str, _persistent, _stream, render, rosinality_state_dict, tiny_generator,
                            write_malicious_pickles,
                            write_nvlabs_pickle, write_psp_pt, write_rosinality_pt, write_safetensors,
                            write_state_dict_pt)

pytestmark = pytest.mark.core


@functools.lru_cache(maxsize=None)
def _tiny(family: str, overrides: tuple[tuple[str, Any], ...] = ()) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny generator and its reference image, built once per configuration."""
    G = tiny_generator(family, **dict(overrides))
    return G, render(G, batch=1)


NVLABS_DEFAULTS = tuple(NVLABS_TRAINING_DEFAULTS.items())  # what a bare NVlabs state dict is assumed to use

# (family, how the file is written, generator overrides the format implies, expected source_format)
CASES = [
    ("stylegan2", "pkl-flat", (), "nvlabs-pkl"),
    ("stylegan2", "pkl-nested-protocol2", (), "nvlabs-pkl"),
    ("stylegan3", "pkl-flat", (), "nvlabs-pkl"),
    ("stylegan2", "rosinality", (), "rosinality-pt"),
    ("stylegan2", "rosinality-bare", (), "rosinality-pt"),
    ("stylegan2", "psp", (), "rosinality-pt"),
    ("stylegan2", "state-dict", NVLABS_DEFAULTS, "nvlabs-state-dict-pt"),
    ("stylegan3", "state-dict", NVLABS_DEFAULTS, "nvlabs-state-dict-pt"),
    ("stylegan2", "state-dict+kwargs", (), "nvlabs-state-dict-pt"),
    ("stylegan3", "state-dict+kwargs", (), "nvlabs-state-dict-pt"),
    ("stylegan2", "safetensors", (), "retrace-safetensors"),
    ("stylegan3", "safetensors", (), "retrace-safetensors"),
    # Conditional 'resnet' StyleGAN2 (label embedding, Conv2dLayer skips) and a config-R StyleGAN3 (1x1 convs,
    # radial filters), from a pickle and from bare state dicts whose settings are inferred from shapes.
    ("stylegan2", "pkl-flat", (("architecture", "resnet"), ("c_dim", 3)), "nvlabs-pkl"),
    ("stylegan2", "state-dict", (*NVLABS_DEFAULTS, ("architecture", "resnet"), ("c_dim", 3)), "nvlabs-state-dict-pt"),
    ("stylegan3", "state-dict", (*NVLABS_DEFAULTS, ("conv_kernel", 1), ("use_radial_filters", True)),
     "nvlabs-state-dict-pt"),
]
CASE_IDS = [f"{family}-{kind}" + ("-" + "-".join(str(v) for k, v in ov if k not in NVLABS_TRAINING_DEFAULTS)
                                  if any(k not in NVLABS_TRAINING_DEFAULTS for k, _ in ov) else "")
            for family, kind, ov, _ in CASES]


def _write(kind: str, directory: Path, G: torch.nn.Module, payload: Path) -> Path:
    if kind == "pkl-flat":
        return write_nvlabs_pickle(directory / "G.pkl", G, form="flat", source_payload=payload)
    if kind == "pkl-nested-protocol2":
        return write_nvlabs_pickle(directory / "G.pkl", G, form="nested", source_payload=payload, protocol=2)
    if kind == "rosinality":
        return write_rosinality_pt(directory / "G.pt", G, with_args=True)
    if kind == "rosinality-bare":
        return write_rosinality_pt(directory / "G.pt", G, with_args=False, with_latent_avg=False)
    if kind == "psp":
        return write_psp_pt(directory / "psp.pt", G)
    if kind == "state-dict":
        return write_state_dict_pt(directory / "G.pt", G)
    if kind == "state-dict+kwargs":
        return write_state_dict_pt(directory / "G.pt", G, with_init_kwargs=True)
    if kind == "safetensors":
        return write_safetensors(directory / "G.safetensors", G)
    raise ValueError(kind)


def _assert_same_generator(gf: GeneratorFile, G: torch.nn.Module, w_avg_estimated: bool = False) -> None:
    assert gf.family == G.family
    assert gf.init_kwargs == G.init_kwargs
    json.dumps(gf.init_kwargs)
    reference = G.state_dict()
    assert list(gf.state_dict) == list(reference)
    for key, tensor in reference.items():
        if w_avg_estimated and key == "mapping.w_avg":
            continue
        assert gf.state_dict[key].dtype == tensor.dtype, key
        assert torch.equal(gf.state_dict[key], tensor), key


@pytest.mark.parametrize("family,kind,overrides,source_format", CASES, ids=CASE_IDS)
def test_every_format_loads_the_same_generator(tmp_path: Path, family: str, kind: str,
                                               overrides: tuple[tuple[str, Any], ...], source_format: str) -> None:
    G, image = _tiny(family, overrides)
    payload = tmp_path / "payload_was_executed"
    path = _write(kind, tmp_path, G, payload)

    gf = read_generator_file(path)
    assert gf.source_format == source_format
    assert gf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_same_generator(gf, G, w_avg_estimated=kind == "rosinality-bare")
    if kind == "rosinality-bare":
        # No latent_avg: w_avg is the mean of mapping(z) over 10,000 seeded z, close to the 1000-z original.
        nl = G.init_kwargs["mapping_kwargs"]["num_layers"]
        expected = estimate_w_avg(G.state_dict(), G.z_dim, G.w_dim, nl)
        assert torch.equal(gf.state_dict["mapping.w_avg"], expected)
        with torch.no_grad():
            ws = G.mapping(torch.randn([1000, G.z_dim], generator=torch.Generator().manual_seed(3)))[:, 0]
        sigma = ws.std(0)
        assert ((expected - G.mapping.w_avg).abs() <= 6 * sigma / 1000 ** 0.5 + 1e-6).all()

    built = gf.build()
    assert not built.training and not any(p.requires_grad for p in built.parameters())
    assert torch.equal(render(built, batch=1), image)
    assert not payload.exists(), "the pickled module source was executed"
    assert not FAKE_PERSISTENCE_CALLS
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules

    # Converting keeps everything, and records where it came from.
    out = convert_to_safetensors(path, tmp_path / "converted.safetensors")
    again = read_generator_file(out)
    assert again.source_format == "retrace-safetensors"
    _assert_same_generator(again, G, w_avg_estimated=kind == "rosinality-bare")
    assert torch.equal(again.state_dict["mapping.w_avg"], gf.state_dict["mapping.w_avg"])
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["retrace.format"] == "stylegan-generator" and meta["retrace.family"] == family
    assert json.loads(meta["retrace.init_kwargs"]) == G.init_kwargs
    assert meta["retrace.source_sha256"] == gf.sha256


def test_tiny_generators_are_deterministic_and_nontrivial() -> None:
    for family in ("stylegan2", "stylegan3"):
        G, image = _tiny(family)
        again = tiny_generator(family)
        assert all(torch.equal(a, b) for a, b in zip(G.state_dict().values(), again.state_dict().values()))
        assert torch.isfinite(image).all() and image.std() > 0.02, (family, float(image.std()))
        biases = [p for n, p in G.named_parameters() if n.endswith(".bias") and "affine" not in n]
        assert all(b.abs().sum() > 0 for b in biases)
        other = tiny_generator(family, seed=1)
        assert not torch.equal(other.mapping.fc0.weight, G.mapping.fc0.weight)


def test_load_generator_and_g_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    G, image = _tiny("stylegan2")
    path = write_nvlabs_pickle(tmp_path / "no_ema.pkl", G, include_ema=False)
    with caplog.at_level(logging.WARNING):
        built = load_generator(path)
    assert "no G_ema" in caplog.text
    assert torch.equal(render(built, batch=1), image)


# --- malicious files -------------------------------------------------------------------------------------

MALICIOUS = {
    "reduce_os_system": (UnsafeFileError, ["`posix.system`", "os.system", "shell command"]),
    "builtins_exec": (UnsafeFileError, ["`builtins.exec`", "runs Python code"]),
    "builtins_eval": (UnsafeFileError, ["`builtins.eval`", "runs Python code"]),
    "subprocess_popen": (UnsafeFileError, ["`subprocess.Popen`", "starts a program"]),
    "unknown_persistent_class": (UnsupportedFileError, ["`EvilNet`", "never runs code"]),
    "smuggled_in_state": (UnsafeFileError, ["`posix.system`"]),
    "smuggled_in_storage": (UnsafeFileError, ["`posix.system`", "tensor storage"]),
    "torch_zip_os_system": (UnsafeFileError, ["`posix.system`", "torch.save zip archive"]),
    "tensorflow_tuple": (UnsupportedFileError, ["dnnlib.tflib.network.Network", "TensorFlow", "does not read"]),
}


@pytest.fixture(scope="module")
def malicious(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    directory = tmp_path_factory.mktemp("malicious")
    marker = directory / "MARKER_pwned"
    files = write_malicious_pickles(directory / "files", marker)
    assert set(files) == set(MALICIOUS)
    return files, marker


def _globals_in(path: Path) -> set[str]:
    """The globals a pickle names (read with pickletools: nothing is executed)."""
    data = path.read_bytes()
    if data.startswith(b"PK"):
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_malicious_file_is_refused(tmp_path: Path, malicious: tuple[dict[str, Path], Path], name: str) -> None:
    files, marker = malicious
    path = files[name]
    error, fragments = MALICIOUS[name]
    assert _globals_in(path), "the test file should really ask for globals"
    with pytest.raises(error) as info:
        read_generator_file(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not marker.exists(), "a malicious payload ran"
    assert not FAKE_PERSISTENCE_CALLS
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    dst = tmp_path / "out.safetensors"
    assert convert.main([str(path), str(dst)]) == 2
    assert not dst.exists() and not marker.exists()


def test_cli_exits_2_on_a_malicious_file(tmp_path: Path, malicious: tuple[dict[str, Path], Path]) -> None:
    files, marker = malicious
    dst = tmp_path / "x.safetensors"
    proc = subprocess.run([sys.executable, "-m", "models.convert", str(files["reduce_os_system"]), str(dst)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "posix.system" in proc.stderr and "Traceback" not in proc.stderr
    assert not dst.exists() and not marker.exists()


# --- refusals of broken or inconsistent files ------------------------------------------------------------


def test_convert_never_overwrites(tmp_path: Path) -> None:
    G, _ = _tiny("stylegan2")
    src = write_state_dict_pt(tmp_path / "g.pt", G, with_init_kwargs=True)
    dst = tmp_path / "g.safetensors"
    dst.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_to_safetensors(src)
    with pytest.raises(FileExistsError):
        save_generator(dst, G)
    assert convert.main([str(src)]) == 2
    assert dst.read_bytes() == b"the user's own file"
    assert convert.main([str(src), str(tmp_path / "new.safetensors")]) == 0
    assert read_generator_file(tmp_path / "new.safetensors").init_kwargs == G.init_kwargs
    assert convert.main([str(src), "--overwrite"]) == 0
    assert read_generator_file(dst).source_format == "retrace-safetensors"


def test_safetensors_without_retrace_metadata_is_refused(tmp_path: Path) -> None:
    G, _ = _tiny("stylegan2")
    sd = {k: v.contiguous() for k, v in G.state_dict().items()}
    bare = tmp_path / "bare.safetensors"
    save_file(sd, str(bare))
    with pytest.raises(UnsupportedFileError, match="without Retrace generator metadata") as info:
        read_generator_file(bare)
    assert "python -m models.convert" in str(info.value) and "bare.safetensors" in str(info.value)
    foreign = tmp_path / "foreign.safetensors"
    save_file(sd, str(foreign), metadata={"format": "pt"})
    with pytest.raises(UnsupportedFileError, match="metadata keys: format"):
        read_generator_file(foreign)


def _damaged(kind: str, tmp_path: Path) -> Path:
    G, _ = _tiny("stylegan2")
    if kind == "empty":
        path = tmp_path / "empty.pkl"
        path.write_bytes(b"")
        return path
    if kind == "garbage":
        path = tmp_path / "garbage.pt"
        path.write_bytes(bytes(range(7, 250)) * 4)
        return path
    if kind == "pickle-garbage":
        path = tmp_path / "bad.pkl"
        path.write_bytes(b"\x80\x04\xff\xfe\xfd" * 10)
        return path
    if kind == "safetensors-bad-json":
        path = write_safetensors(tmp_path / "g.safetensors", G)
        data = bytearray(path.read_bytes())
        data[9:14] = b"#####"
        path.write_bytes(bytes(data))
        return path
    source = {"truncated-pkl": lambda p: write_nvlabs_pickle(p / "g.pkl", G),
              "truncated-pt": lambda p: write_rosinality_pt(p / "g.pt", G),
              "truncated-safetensors": lambda p: write_safetensors(p / "g.safetensors", G)}[kind](tmp_path)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    return source


@pytest.mark.parametrize("kind,fragment", [
    ("empty", "empty (0 bytes)"),
    ("garbage", "unrecognised content"),
    ("pickle-garbage", "corrupted or truncated"),
    ("truncated-pkl", "corrupted or truncated"),
    ("truncated-pt", "corrupted or truncated"),
    ("truncated-safetensors", "truncated safetensors"),
    ("safetensors-bad-json", "corrupted or truncated"),
])
def test_damaged_file_is_refused_clearly(tmp_path: Path, kind: str, fragment: str) -> None:
    path = _damaged(kind, tmp_path)
    with pytest.raises(UnsupportedFileError) as info:
        read_generator_file(path)
    assert fragment in str(info.value) and path.name in str(info.value)


@pytest.mark.parametrize("family,where,attr,delta", [
    ("stylegan2", "", "num_ws", 1),
    ("stylegan2", "synthesis", "img_resolution", 16),
    ("stylegan3", "mapping", "num_ws", -1),
])
def test_pickled_attributes_that_disagree_are_refused(tmp_path: Path, family: str, where: str, attr: str,
                                                      delta: int) -> None:
    G, _ = _tiny(family)
    module = G.get_submodule(where) if where else G
    bad = {where: {attr: getattr(module, attr) + delta}}
    path = write_nvlabs_pickle(tmp_path / "bad.pkl", G, state_overrides=bad)
    with pytest.raises(UnsupportedFileError, match="disagree") as info:
        read_generator_file(path)
    assert f"{where + '.' if where else ''}{attr}: pickled {getattr(module, attr) + delta}" in str(info.value)


def test_inconsistent_checkpoints_are_refused(tmp_path: Path) -> None:
    G, _ = _tiny("stylegan2")
    # rosinality training arguments that contradict the tensors.
    path = tmp_path / "ros.pt"
    args = argparse.Namespace(size=32, latent=G.w_dim, n_mlp=2, channel_multiplier=2)
    torch.save({"g_ema": rosinality_state_dict(G), "latent_avg": G.mapping.w_avg.clone(), "args": args}, path)
    with pytest.raises(UnsupportedFileError, match="args.size=32 but the tensors say 16"):
        read_generator_file(path)
    # A state dict missing a tensor its constructor arguments need.
    sd = {k: v for k, v in G.state_dict().items() if k != "synthesis.b8.conv1.affine.bias"}
    torch.save({"state_dict": sd, "init_kwargs": G.init_kwargs}, tmp_path / "short.pt")
    with pytest.raises(UnsupportedFileError, match=r"missing 1 \(e.g. \['synthesis.b8.conv1.affine.bias'\]\)"):
        read_generator_file(tmp_path / "short.pt")
    # A dict with no generator in it.
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UnsupportedFileError, match="no StyleGAN generator"):
        read_generator_file(tmp_path / "other.pt")


@pytest.mark.parametrize("body,error,fragment", [
    (_op_dict({"G_ema": _persistent("Generator", b"}", version=5)}), UnsupportedFileError, "version=5"),
    (_op_dict({"G_ema": _persistent("Generator", b"}", kind="function")}), UnsupportedFileError, "type='function'"),
    (_op_dict({"G_ema": _op_str("x") + b"Q"}), UnsafeFileError, "external persistent object 'x'"),
    (_op_call("numpy", "dtype", _op_str("O8"), b"\x89", b"\x88"), UnsafeFileError, "NumPy array of Python objects"),
    (_op_call("torch", "load", _op_str("/etc/passwd")), UnsafeFileError, "`torch.load`"),
    (_op_call("_codecs", "encode", _op_str("x"), _op_str("rot13")), UnsupportedFileError, "_codecs.encode"),
], ids=["version", "type", "persistent-id", "object-dtype", "torch-load", "codecs"])
def test_other_pickle_tricks_are_refused(tmp_path: Path, body: bytes, error: type, fragment: str) -> None:
    path = tmp_path / "trick.pkl"
    path.write_bytes(_stream(body))
    with pytest.raises(error, match=re.escape(fragment)):
        read_generator_file(path)


def test_numpy_attributes_as_nvlabs_pickles_them(tmp_path: Path) -> None:
    # NVlabs StyleGAN3 layers keep sizes as [w, h] arrays and rates as NumPy floats.
    G, image = _tiny("stylegan3")
    name = G.synthesis.layer_names[0]
    layer = getattr(G.synthesis, name)
    like_nvlabs = {f"synthesis.{name}": {"in_size": np.broadcast_to(np.asarray(layer.in_size), [2]),
                                         "in_cutoff": np.float64(layer.in_cutoff)}}
    path = write_nvlabs_pickle(tmp_path / "np.pkl", G, state_overrides=like_nvlabs, protocol=2)
    assert torch.equal(render(load_generator(path), batch=1), image)
    wrong = {f"synthesis.{name}": {"out_size": np.asarray([layer.out_size, layer.out_size + 4])}}
    path = write_nvlabs_pickle(tmp_path / "np_wrong.pkl", G, state_overrides=wrong)
    with pytest.raises(UnsupportedFileError, match=f"synthesis.{name}.out_size: pickled"):
        read_generator_file(path)


def test_pickles_need_a_torch_whose_weights_only_loading_is_safe() -> None:
    from retrace.models.loader import _require_safe_torch

    _require_safe_torch("2.6.0+cu124")
    _require_safe_torch("2.15.0")
    with pytest.raises(UnsupportedFileError, match=r"needs torch >= 2.6 \(this is torch 2.5.1; .*CVE-2025-32434"):
        _require_safe_torch("2.5.1")
