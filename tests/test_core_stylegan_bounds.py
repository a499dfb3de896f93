"""A tiny file cannot take gigabytes: generator files are checked against a size budget before anything is allocated.

Constructor arguments are bounded, keys and shapes are compared with a generator built on the ``meta`` device, a
file's settings may not describe a generator larger than the file, torch.save zip entries must be stored as torch
writes them, and tensors may not claim more values than their storage holds. Each hostile file is refused with a
message naming the problem, and refusing it, measured in a fresh interpreter through ``/proc/self/status`` VmHWM,
raises peak memory by less than 64 MiB (the unchecked loader took 73 MiB to 2.5 GiB for these files, and asked
for 8 GiB for the z_dim = 16384 one).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from paths import ROOT
from retrace.models import build_generator
from retrace.models.loader import (META_FAMILY, META_FORMAT, META_INIT_KWARGS, META_SOURCE_SHA256, RETRACE_FORMAT,
                                   UnsupportedFileError, _build_for_check, read_generator_file)
from stylegan_files import (_op_bytes, _op_call, _op_dict, _op_int, _op_tuple, _persistent, _stream, render,
                            tiny_generator, write_nvlabs_pickle, write_safetensors, write_state_dict_pt)

pytestmark = pytest.mark.core

MAX_RISE_MIB = 64
DEFLATED_MIB = 256
HAVE_PROC = Path("/proc/self/status").exists()


@functools.lru_cache(maxsize=None)
def _tiny(family: str) -> torch.nn.Module:
    return tiny_generator(family)


def _retrace_safetensors(path: Path, family: str, init_kwargs: dict[str, Any]) -> Path:
    """A Retrace safetensors file with real metadata but only two tiny tensors."""
    tensors = {"mapping.fc0.weight": torch.zeros(2, 2), "mapping.w_avg": torch.zeros(2)}
    save_file(tensors, str(path), metadata={META_FORMAT: RETRACE_FORMAT, META_FAMILY: family,
                                            META_INIT_KWARGS: json.dumps(init_kwargs), META_SOURCE_SHA256: ""})
    return path


def _sg2(**kwargs: Any) -> dict[str, Any]:
    return {"z_dim": 512, "c_dim": 0, "w_dim": 512, "img_resolution": 16, "img_channels": 3, **kwargs}


SG3_R_1024 = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3, channel_base=65536,
                  channel_max=1024, conv_kernel=1, use_radial_filters=True)

# name: (family, init_kwargs, fragments of the refusal)
HOSTILE_SAFETENSORS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "z8192": ("stylegan2", _sg2(z_dim=8192, w_dim=8192), ["z_dim 8192 exceeds 4096", "the largest Retrace builds",
                                                          "damaged or not a StyleGAN generator"]),
    "z16384": ("stylegan2", _sg2(z_dim=16384, w_dim=16384), ["z_dim 16384 exceeds 4096"]),
    "sg2-1024": ("stylegan2", _sg2(img_resolution=1024), ["describe a stylegan2 generator of", "holds only 6 values",
                                                         "larger than itself"]),
    "sg3-r-1024": ("stylegan3", SG3_R_1024, ["describe a stylegan3 generator of", "holds only 6 values"]),
    "mapping-layers": ("stylegan2", _sg2(mapping_kwargs={"num_layers": 1000}),
                       ["mapping_kwargs.num_layers 1000 exceeds 32"]),
    "nested-channels": ("stylegan2", _sg2(synthesis_kwargs={"channel_max": 65536}), ["channel_max 65536 exceeds"]),
    "resolution": ("stylegan3", {**SG3_R_1024, "img_resolution": 1 << 16}, ["img_resolution 65536 exceeds 4096"]),
    "filter-taps": ("stylegan3", {**SG3_R_1024, "filter_size": 64, "lrelu_upsampling": 8}, ["-tap filters"]),
    "not-a-number": ("stylegan2", _sg2(c_dim="many"), ["c_dim is 'many', not a number"]),
    "negative": ("stylegan2", _sg2(img_channels=-3), ["img_channels -3 is below 1"]),
}
MEASURED = ("z8192", "z16384", "sg2-1024", "sg3-r-1024")

# Run in a fresh interpreter: read a valid file (imports, first-use caches), then the hostile one, and report how
# much the peak resident memory rose. An address-space cap keeps a loader that does allocate from taking the machine.
_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from models.loader import read_generator_file

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

read_generator_file(sys.argv[2])
before = status("VmHWM")
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
cap = (status("VmSize") << 10) + (2 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
try:
    read_generator_file(sys.argv[3])
    error = None
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"rise_mib": (status("VmHWM") - before) / 1024, "error": error}))
"""


def _refusal_in_fresh_process(valid: Path, hostile: Path) -> tuple[float, str | None]:
    """(rise of VmHWM in MiB, the refusal as 'Type: message') for reading ``hostile`` after ``valid``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), str(valid), str(hostile)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["rise_mib"], result["error"]


def _assert_refused_cheaply(valid: Path, hostile: Path, fragments: list[str]) -> None:
    if not HAVE_PROC:
        with pytest.raises(UnsupportedFileError) as info:
            read_generator_file(hostile)
        error = f"UnsupportedFileError: {info.value}"
        rise = None
    else:
        rise, error = _refusal_in_fresh_process(valid, hostile)
    assert error is not None and error.startswith("UnsupportedFileError: "), error
    for fragment in [hostile.name, *fragments]:
        assert fragment in error, (fragment, error)
    if rise is not None:
        assert rise < MAX_RISE_MIB, f"refusing {hostile.name} raised peak memory by {rise:.0f} MiB"


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("valid")
    G = _tiny("stylegan2")
    return {"safetensors": write_safetensors(directory / "G.safetensors", G),
            "pt": write_state_dict_pt(directory / "G.pt", G, with_init_kwargs=True),
            "pkl": write_nvlabs_pickle(directory / "G.pkl", G)}


# --- constructor arguments and the size budget -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_settings_are_refused(tmp_path: Path, valid_files: dict[str, Path], name: str) -> None:
    family, init_kwargs, fragments = HOSTILE_SAFETENSORS[name]
    path = _retrace_safetensors(tmp_path / f"{name}.safetensors", family, init_kwargs)
    assert path.stat().st_size < 1024
    read_generator_file(valid_files["safetensors"])  # the first meta-device build imports torch's meta kernels
    start = time.perf_counter()
    with pytest.raises(UnsupportedFileError) as info:
        read_generator_file(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    for fragment in [path.name, *fragments]:
        assert fragment in message, (fragment, message)
    assert elapsed < 1.0, f"refusing {path.name} took {elapsed:.2f} s"


@pytest.mark.skipif(not HAVE_PROC, reason="needs /proc/self/status to measure peak memory")
@pytest.mark.parametrize("name", MEASURED)
def test_hostile_safetensors_cost_little_memory(tmp_path: Path, valid_files: dict[str, Path], name: str) -> None:
    family, init_kwargs, fragments = HOSTILE_SAFETENSORS[name]
    path = _retrace_safetensors(tmp_path / f"{name}.safetensors", family, init_kwargs)
    _assert_refused_cheaply(valid_files["safetensors"], path, fragments)


@pytest.mark.parametrize("family,init_kwargs,values", [
    ("stylegan2", _sg2(img_resolution=1024), 30_000_000),  # FFHQ config F (stylegan2-ada-pytorch, stylegan3 repos)
    ("stylegan2", _sg2(img_resolution=256, c_dim=1000, mapping_kwargs={"num_layers": 2},
                       synthesis_kwargs={"channel_base": 16384}), 20_000_000),  # ADA nested form, 1000 classes
    ("stylegan2", _sg2(img_resolution=1024, mapping_kwargs={"num_layers": 8}, channel_base=32768,
                       num_fp16_res=0, conv_clamp=None, architecture="skip"), 30_000_000),  # rosinality 1024
    ("stylegan3", {**SG3_R_1024, "conv_kernel": 3, "use_radial_filters": False,
                   "channel_base": 32768, "channel_max": 512}, 20_000_000),  # config T 1024
    ("stylegan3", SG3_R_1024, 15_000_000),  # config R 1024
], ids=["sg2-ffhq-1024", "sg2-ada-conditional", "rosinality-1024", "sg3-t-1024", "sg3-r-1024"])
def test_published_configurations_pass_the_bounds_on_the_meta_device(family: str, init_kwargs: dict[str, Any],
                                                                     values: int) -> None:
    _build_for_check("stylegan2", _sg2(img_resolution=4))  # the first meta-device build imports torch's meta kernels
    start = time.perf_counter()
    model = _build_for_check(family, init_kwargs)
    assert time.perf_counter() - start < 1.0
    state = model.state_dict()
    assert {t.device.type for t in state.values()} == {"meta"}
    assert sum(t.numel() for t in state.values()) > values


# --- torch.save zip archives and tensors larger than their storage ----------------------------------------


def _deflated_archive(src: Path, dst: Path, mib: int) -> tuple[Path, str]:
    """``src`` (a torch.save zip) with its first storage entry replaced by ``mib`` MiB of deflated zeros."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        target = next(info.filename for info in zin.infolist() if info.filename.endswith("/data/0"))
        for info in zin.infolist():
            if info.filename != target:
                zout.writestr(info, zin.read(info.filename))
                continue
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            entry.compress_type = zipfile.ZIP_DEFLATED
            chunk = bytes(1 << 20)
            with zout.open(entry, "w", force_zip64=True) as f:
                for _ in range(mib):
                    f.write(chunk)
    return dst, target


def test_a_deflated_zip_entry_is_refused_before_torch_inflates_it(tmp_path: Path,
                                                                  valid_files: dict[str, Path]) -> None:
    path, entry = _deflated_archive(valid_files["pt"], tmp_path / "deflated.pt", DEFLATED_MIB)
    assert path.stat().st_size < 2 << 20
    _assert_refused_cheaply(valid_files["pt"], path, [f"'{entry}' is compressed (deflate",
                                                      f"{DEFLATED_MIB << 20} bytes unpacked",
                                                      "torch.save never compresses"])


def test_zip_entries_declaring_more_than_the_file_are_refused(tmp_path: Path, valid_files: dict[str, Path]) -> None:
    data = bytearray(valid_files["pt"].read_bytes())
    with zipfile.ZipFile(valid_files["pt"]) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    name = info.filename.encode()
    at = data.rfind(b"PK\x05\x06")  # the end of the central directory, then that entry's record in it
    at = int.from_bytes(data[at + 16:at + 20], "little")
    while data[at + 46:at + 46 + len(name)] != name:
        at = data.find(b"PK\x01\x02", at + 4)
        assert at >= 0, f"no central directory record for {info.filename}"
    assert struct.unpack_from("<I", data, at + 24)[0] == info.file_size
    struct.pack_into("<I", data, at + 24, 1 << 30)
    path = tmp_path / "declared.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFileError) as refused:
        read_generator_file(path)
    message = str(refused.value)
    assert f"the largest, '{info.filename}', {1 << 30} bytes" in message and "more than the file's" in message


def _expanded_state_dict_file(path: Path) -> Path:
    """A torch.save state dict whose every tensor has the right shape for a 1024 px StyleGAN2 but stride 0:
    a few hundred KB that claim 30 million values."""
    kwargs = _sg2(img_resolution=1024)
    with torch.device("meta"):
        reference = build_generator("stylegan2", copy.deepcopy(kwargs)).state_dict()
    state = {k: torch.zeros(()).expand(t.shape) for k, t in reference.items()}
    torch.save({"state_dict": state, "init_kwargs": kwargs}, path)
    return path


def test_tensors_that_claim_more_values_than_they_store_are_refused(tmp_path: Path,
                                                                    valid_files: dict[str, Path]) -> None:
    path = _expanded_state_dict_file(tmp_path / "expanded.pt")
    assert path.stat().st_size < 2 << 20
    _assert_refused_cheaply(valid_files["pt"], path, ["claim", "values but store only", "overlapping strides"])


def test_a_pickled_tensor_larger_than_its_storage_is_refused(tmp_path: Path) -> None:
    ops = pickletools.genops(pickle.dumps(torch.zeros(1), protocol=4))
    blob = next(arg for op, arg, _ in ops if op.name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"))
    tensor = _op_call("torch._utils", "_rebuild_tensor_v2", _op_call("torch.storage", "_load_from_bytes",
                                                                     _op_bytes(blob)),
                      _op_int(0), _op_tuple(_op_int(1 << 20)), _op_tuple(_op_int(1)), b"\x89",
                      _op_call("collections", "OrderedDict"))
    state = _op_dict({"_parameters": _op_dict({"weight": tensor}), "_buffers": b"}", "_modules": b"}"})
    path = tmp_path / "oversized.pkl"
    path.write_bytes(_stream(_op_dict({"G_ema": _persistent("Generator", state)})))
    with pytest.raises(UnsupportedFileError, match=r"size \(1048576,\).*needs 1048576 elements of a storage of 1"):
        read_generator_file(path)


# --- valid files are unchanged -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["stylegan2", "stylegan3"])
@pytest.mark.parametrize("kind", ["safetensors", "pt", "pkl"])
def test_valid_tiny_generators_still_load_and_build_identically(tmp_path: Path, family: str, kind: str) -> None:
    G = _tiny(family)
    writers = {"safetensors": lambda p: write_safetensors(p / "G.safetensors", G),
               "pt": lambda p: write_state_dict_pt(p / "G.pt", G, with_init_kwargs=True),
               "pkl": lambda p: write_nvlabs_pickle(p / "G.pkl", G)}
    gf = read_generator_file(writers[kind](tmp_path))
    assert gf.family == family and gf.init_kwargs == G.init_kwargs
    reference = G.state_dict()
    assert list(gf.state_dict) == list(reference)
    for key, tensor in reference.items():
        assert gf.state_dict[key].device.type == "cpu", key
        assert gf.state_dict[key].dtype == tensor.dtype and torch.equal(gf.state_dict[key], tensor), key
    built = gf.build()
    assert {t.device.type for t in built.state_dict().values()} == {"cpu"}
    assert torch.equal(render(built, batch=1), render(G, batch=1))

