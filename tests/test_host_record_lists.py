"""Each load node lists only the saved files it can load: inversions, null-text, GAN latents and directions share
output/retrace/, and are told apart by the format their safetensors header names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from paths import ensure_host

pytestmark = pytest.mark.host


def test_each_load_node_lists_only_its_own_kind(output_dir: Path) -> None:
    ensure_host()
    from retrace.editing.directions import DIRECTION_FORMAT
    from retrace.inversion.gan_latent import FORMAT_KEY, LATENT_FORMAT
    from retrace.inversion.record import FORMAT, NULL_TEXT_FORMAT, write_record
    from retrace.nodes.directions import RetraceLoadDirection
    from retrace.nodes._records import OUTPUT_SUBFOLDER
    from retrace.nodes.inversion_io import RetraceLoadInversion, RetraceLoadNullText
    from retrace.nodes.stylegan import RetraceGANLatentLoad

    folder = output_dir / OUTPUT_SUBFOLDER
    tensors = {"x": torch.zeros(2)}
    write_record(folder / "inv.safetensors", FORMAT, tensors, {})
    write_record(folder / "nt.safetensors", NULL_TEXT_FORMAT, tensors, {})
    write_record(folder / "w.safetensors", LATENT_FORMAT, tensors, {}, key=FORMAT_KEY)
    write_record(folder / "dir.safetensors", DIRECTION_FORMAT, tensors, {}, key=FORMAT_KEY)
    save_file(tensors, str(folder / "hf.safetensors"), metadata={"format": "pt"})  # someone else's file
    (folder / "broken.safetensors").write_bytes(b"\xff" * 12)

    def listed(node) -> list[str]:
        return next(i for i in node.define_schema().inputs if i.id.endswith("_file")).options

    assert listed(RetraceLoadInversion) == ["inv.safetensors"]
    assert listed(RetraceLoadNullText) == ["nt.safetensors"]
    assert listed(RetraceGANLatentLoad) == ["w.safetensors"]
    assert listed(RetraceLoadDirection) == ["dir.safetensors"]
    # A file rewritten in place as another kind moves lists (the header cache follows the file).
    (folder / "w.safetensors").unlink()
    write_record(folder / "w.safetensors", DIRECTION_FORMAT, {"x": torch.zeros(3)}, {}, key=FORMAT_KEY)
    assert listed(RetraceGANLatentLoad) == []
    assert listed(RetraceLoadDirection) == ["dir.safetensors", "w.safetensors"]
