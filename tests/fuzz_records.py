"""Seeded fuzzing of the files Retrace reads: inversion, null-text, GAN-latent and direction records and StyleGAN
generator files, each mutated as a damaged download or a hostile author would (flipped bytes, truncation, an edited
safetensors header, edited metadata, edited constructor arguments) and loaded.

Run as a script it prints one JSON line: the cases, how each ended, the crashes (any exception that is not a
refusal) and the rise of the process's peak memory over the run. ``tests/test_fuzz_records.py`` runs it in a
process of its own so the peak is this run's alone.

    python tests/fuzz_records.py SEED RECORD_CASES GENERATOR_CASES
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from paths import ensure_package  # noqa: E402

ensure_package()

from retrace.editing.directions import Direction, load_direction, save_direction  # noqa: E402
from retrace.inversion.gan_latent import GanLatent, load_gan_latent, save_gan_latent  # noqa: E402
from retrace.inversion.record import Inversion, NullText  # noqa: E402
from retrace.models.loader import read_generator_file  # noqa: E402

# A value a hand-edited field may hold: wrong types, non-finite and huge numbers, nested structures.
ODD_VALUES: list[Any] = [None, True, -1, 0, 2**31, 2**62, 10**30, -(10**9), 1.5, float("nan"), float("inf"), "",
                         "x" * 300, "\x00", [], [1, 2], [-4, 0], {}, {"a": 1}, [[1]], "NaN", "1e309"]


def memory_mib(pid: int | str = "self", field: str = "VmHWM") -> float:
    """A process's VmHWM (peak resident memory since start or the last reset) or VmRSS, in MiB; NaN where /proc
    is absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


# --- the seeds: one valid file of each kind -----------------------------------------------------------------


def record_seeds(folder: Path) -> dict[str, tuple[Path, Callable[[Path], Any]]]:
    g = torch.Generator().manual_seed(0)
    sigmas = torch.linspace(0.03, 14.6, 4)
    files = {
        "inversion": (folder / "inversion.safetensors", lambda p: Inversion.load(str(p))),
        "null_text": (folder / "null_text.safetensors", lambda p: NullText.load(str(p))),
        "gan_latent": (folder / "gan_latent.safetensors", load_gan_latent),
        "direction": (folder / "direction.safetensors", load_direction),
    }
    Inversion(trajectory=torch.randn(4, 1, 4, 8, 8, generator=g), sigmas=sigmas, family="eps", model_name="SD15",
              method="euler", guidance=1.0).save(str(files["inversion"][0]))
    NullText(embeddings=torch.randn(3, 1, 77, 32, generator=g), sigmas=sigmas, family="eps", model_name="SD15",
             latent_shape=(1, 4, 8, 8), guidance=7.5).save(str(files["null_text"][0]))
    save_gan_latent(files["gan_latent"][0], GanLatent(ws=torch.randn(1, 4, 8, generator=g), space="w+",
                                                      model_id="x", family="stylegan2"))
    save_direction(files["direction"][0], Direction(vectors=torch.randn(2, 8, generator=g), space="w",
                                                    method="sefa", model_id="x"))
    return files


def generator_seeds(folder: Path) -> list[Path]:
    from stylegan_files import tiny_generator, write_nvlabs_pickle, write_rosinality_pt, write_safetensors

    sg2, sg3 = tiny_generator("stylegan2", seed=0), tiny_generator("stylegan3", seed=0)
    return [write_safetensors(folder / "sg2.safetensors", sg2), write_safetensors(folder / "sg3.safetensors", sg3),
            write_rosinality_pt(folder / "sg2_rosinality.pt", sg2),
            write_nvlabs_pickle(folder / "sg2_nvlabs.pkl", sg2, source_payload=folder / "payload_ran")]


# --- mutations ---------------------------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes] | None:
    if len(data) < 8:
        return None
    length = struct.unpack("<Q", data[:8])[0]
    try:
        return json.loads(data[8:8 + length]), data[8 + length:]
    except (ValueError, UnicodeDecodeError):
        return None


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_metadata_value(rng: random.Random, value: str) -> str:
    """Edit one metadata string: another odd value, or, where it is JSON, one of its fields changed."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return json.dumps(rng.choice(ODD_VALUES)) if rng.random() < 0.5 else rng.choice(["", "\x00", "{", "x" * 500])
    if isinstance(parsed, dict) and parsed and rng.random() < 0.8:
        key = rng.choice(sorted(parsed))
        target = parsed
        while isinstance(target[key], dict) and target[key] and rng.random() < 0.5:  # into nested kwargs
            target = target[key]
            key = rng.choice(sorted(target))
        target[key] = rng.choice(ODD_VALUES + [8192, 16384, 4096 * 16])
        return json.dumps(parsed)
    return json.dumps(rng.choice(ODD_VALUES))


def mutate_header(rng: random.Random, header: dict) -> None:
    """Edit one entry of a safetensors header: a tensor's dtype, shape or offsets, or a metadata field."""
    metadata = header.get("__metadata__", {})
    tensors = [k for k in header if k != "__metadata__"]
    if metadata and (not tensors or rng.random() < 0.5):
        key = rng.choice(sorted(metadata))
        if rng.random() < 0.15:
            del metadata[key]
        else:
            metadata[key] = mutate_metadata_value(rng, metadata[key])
        return
    entry = header[rng.choice(tensors)]
    field = rng.choice(["dtype", "shape", "data_offsets", "drop"])
    if field == "dtype":
        entry["dtype"] = rng.choice(["F16", "I64", "U8", "BOOL", "F64", "Q9", ""])
    elif field == "shape":
        entry["shape"] = rng.choice([[], [0], [1 << 20, 1 << 20], [-1], [3, 3, 3, 3, 3, 3, 3, 3]] +
                                    [[rng.randint(0, 64) for _ in range(rng.randint(1, 4))]])
    elif field == "data_offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + 4096], [0, 1 << 40], [start, start]])
    else:
        header.pop(rng.choice(tensors))


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One mutation of a file's bytes, and its name."""
    parts = split_safetensors(data)
    kinds = ["flip", "truncate", "splice"] + (["header", "header", "header"] if parts else [])
    kind = rng.choice(kinds)
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "splice":  # a run of random bytes over the file (the header's length field included, sometimes)
        start = rng.randrange(len(data))
        return kind, data[:start] + rng.randbytes(rng.randint(1, 64)) + data[start + 64:]
    header, body = parts
    for _ in range(rng.randint(1, 3)):
        mutate_header(rng, header)
    return kind, join_safetensors(header, body)


# --- the run -------------------------------------------------------------------------------------------------


def attempt(load: Callable[[Path], Any], path: Path) -> tuple[str, str]:
    """('loaded' | 'refused' | 'crash', detail): a refusal is a ValueError that names the file."""
    try:
        load(path)
    except ValueError as exc:  # UnsupportedFileError and UnsafeFileError are ValueErrors
        message = str(exc)
        if path.name not in message:
            return "crash", f"refusal without the file's name: {type(exc).__name__}: {message[:300]}"
        return "refused", message[:300]
    except Exception as exc:  # noqa: BLE001 (a crash is what the fuzzer is looking for)
        return "crash", f"{type(exc).__name__}: {exc}"[:300] + " | " + traceback.format_exc(limit=-2)[-600:]
    return "loaded", ""


def run(seed: int, record_cases: int, generator_cases: int) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    crashes: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = record_seeds(folder)
        generators = generator_seeds(folder)
        for path in generators:  # warm up: imports, meta-device support, the first builds
            read_generator_file(path)
        for path, load in records.values():
            load(path)
        before = memory_mib()
        t0 = time.monotonic()
        plan = [("record", rng.choice(sorted(records))) for _ in range(record_cases)]
        plan += [("generator", rng.randrange(len(generators))) for _ in range(generator_cases)]
        for case, (group, which) in enumerate(plan):
            source, load = records[which] if group == "record" else (generators[which], read_generator_file)
            mutation, data = mutate(rng, source.read_bytes())
            path = folder / f"case{case}{source.suffix}"
            path.write_bytes(data)
            outcome, detail = attempt(load, path)
            outcomes[f"{group}:{outcome}"] += 1
            if outcome == "crash":
                crashes.append({"case": str(case), "file": source.name, "mutation": mutation, "error": detail})
            path.unlink()
        seconds = time.monotonic() - t0
        rise = memory_mib() - before
    return {"seed": seed, "cases": len(plan), "outcomes": dict(outcomes), "crashes": crashes[:20],
            "crash_count": len(crashes), "peak_rise_mib": rise, "seconds": seconds}


if __name__ == "__main__":
    torch.set_num_threads(1)
    seed, record_cases, generator_cases = (int(v) for v in sys.argv[1:4])
    sys.stdout.write(json.dumps(run(seed, record_cases, generator_cases)) + "\n")
