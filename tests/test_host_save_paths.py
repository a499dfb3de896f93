"""Saves stay inside the output folder and never overwrite: a symbolic link inside output/retrace that leads out,
a dangling link in the place of the next file, a NUL character and an over-long name are refused with the prefix
named, and nothing is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

from retrace.nodes import _records  # noqa: E402

pytestmark = pytest.mark.host


class Record:
    def __init__(self) -> None:
        self.saved: list[str] = []

    def save(self, path: str) -> None:
        Path(path).write_bytes(b"x")
        self.saved.append(path)


def test_a_link_out_of_the_output_folder_is_refused(output_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    retrace = output_dir / _records.OUTPUT_SUBFOLDER
    retrace.mkdir(parents=True, exist_ok=True)
    (retrace / "linked").symlink_to(outside, target_is_directory=True)
    record = Record()
    with pytest.raises(ValueError, match="leads to .*outside the output folder"):
        _records.save_record(record, "linked/inversion")
    assert record.saved == [] and list(outside.iterdir()) == []


def test_a_dangling_link_is_never_written_through(output_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    target = tmp_path_factory.mktemp("elsewhere") / "victim.safetensors"
    retrace = output_dir / _records.OUTPUT_SUBFOLDER
    retrace.mkdir(parents=True, exist_ok=True)
    (retrace / "inversion_00001.safetensors").symlink_to(target)  # dangling: os.path.exists says False
    record = Record()
    _records.save_record(record, "inversion")
    assert not target.exists()
    assert [os.path.basename(p) for p in record.saved] == ["inversion_00002.safetensors"]


@pytest.mark.parametrize("prefix, message", [("inv\x00ersion", "NUL character"),
                                             ("x" * 300, "300 characters long; at most 200")])
def test_unusable_prefixes_are_refused_before_writing(output_dir: Path, prefix: str, message: str) -> None:
    record = Record()
    with pytest.raises(ValueError, match=message):
        _records.save_record(record, prefix)
    assert record.saved == []
